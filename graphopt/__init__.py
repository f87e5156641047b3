"""graphopt: capture a PyTorch model into canonical torch.fx, optimize it with verified passes,
lower it to TorchScript mobile (.ptl) or ONNX.

    import graphopt
    result = graphopt.optimize(model, (torch.randn(1, 3, 224, 224),), pipeline="mobile-fp32")
    print(result.report)
    graphopt.lower(result.module, example_inputs, backend="onnx", path="model.onnx")
"""
from __future__ import annotations

import importlib
from typing import Any

from . import errors, graph, ops  # noqa: F401  (graphopt.ops and graphopt.graph for pass authors)
from .errors import *  # noqa: F401,F403
from .pass_infra import (
    Check,
    Constraint,
    Contract,
    Exact,
    Invocation,
    Lossy,
    OneOf,
    Pass,
    PassContext,
    Range,
    available_passes,
    available_presets,
    check_patterns,
    get_pass,
    register_pass,
    register_preset,
    unregister_pass,
)
from .capture import capture  # eager: the submodule of the same name must not shadow the function
from .pass_manager import Hook, PassManager, PassRecord, PrintGraph, Report, Result, Timing, bisect, optimize

__version__ = "0.1.0"

# Imported on first use: they pull in exporters/runtimes a pass author does not need.
_LAZY = {
    "verify": ("graphopt.verify", None),
    "lower": ("graphopt.lowering", "lower"),
    "register_backend": ("graphopt.lowering", "register_backend"),
    "available_backends": ("graphopt.lowering", "available_backends"),
    "unregister_backend": ("graphopt.lowering", "unregister_backend"),
    "Backend": ("graphopt.lowering", "Backend"),
    "Artifact": ("graphopt.lowering", "Artifact"),
    "examples": ("graphopt.examples", None),
    "testing": ("graphopt.testing", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "Contract", "Exact", "Lossy", "Pass", "PassContext", "Invocation", "PassManager", "PassRecord",
    "Report", "Result", "Hook", "PrintGraph", "Timing", "available_passes", "available_presets",
    "capture", "get_pass", "register_pass", "register_preset", "unregister_pass", "optimize", "bisect",
    "Constraint", "Range", "OneOf", "Check", "check_patterns",
    *_LAZY,
]
