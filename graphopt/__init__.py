"""graphopt: capture a PyTorch model into canonical torch.fx, optimize it with verified passes,
lower it to TorchScript mobile (.ptl), ONNX or ExecuTorch (.pte).

    import graphopt
    result = graphopt.optimize(model, (torch.randn(1, 3, 224, 224),), pipeline="mobile-fp32")
    print(result.report)
    graphopt.lower(result.module, example_inputs, backend="onnx", path="model.onnx")

The rooms of the package:

- ``graphopt.ir``: the canonical form passes work on (ops and their spellings, graphs, shapes,
  purity, input/output structure);
- ``graphopt.capture``: models into canonical graphs (symbolic tracing, torch.export);
- ``graphopt.pipeline``: passes, presets, the PassManager, the rewrite helper, bisection;
- ``graphopt.verify``: tolerances, input synthesis, comparison and localization;
- ``graphopt.lowering``: the backend protocol and registry, ``lower()``;
- ``graphopt.channels`` and ``graphopt.quantization``: the analyses behind pruning and int8;
- ``graphopt.view``: structural diffs by node identity, the HTML report, Model Explorer;
- ``graphopt.testing``: the property-testing kit;
- ``graphopt.app``: the command line, the demo, example models, model references.

Built-in passes are ``graphopt.passes``, built-in backends ``graphopt.backends``.
"""
from __future__ import annotations

import importlib
from typing import Any

from graphopt import errors  # noqa: F401
from graphopt.errors import *  # noqa: F401,F403
from graphopt.ir import graph, ops, shapes  # noqa: F401  (for pass authors: graphopt.ops.is_op, ...)
from graphopt.pipeline import rewrite  # noqa: F401
from graphopt.pipeline.contracts import Contract, Exact, Lossy
from graphopt.pipeline.options import Check, Constraint, OneOf, Range, check_patterns
from graphopt.pipeline.passes import (
    Invocation,
    Pass,
    PassContext,
    available_passes,
    available_presets,
    get_pass,
    register_pass,
    register_preset,
    unregister_pass,
)
from graphopt.capture import capture  # eager: the submodule of the same name must not shadow the function
from graphopt.pipeline.bisect import bisect
from graphopt.pipeline.hooks import Hook, PrintGraph, Timing
from graphopt.pipeline.manager import PassManager, Result, optimize
from graphopt.pipeline.report import PassRecord, Report

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
    "examples": ("graphopt.app.examples", None),
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
