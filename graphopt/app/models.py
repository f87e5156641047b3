"""Resolve a model reference from the command line, and save/load optimized graph modules.

A reference is one of:

- a built-in example name (``graphopt models`` lists them), e.g. ``resnet_cnn``;
- ``package.module:factory`` or ``path/to/file.py:factory``: ``factory()`` returns a module, or
  ``(module, example_inputs)``;
- ``torchvision:NAME`` when torchvision is installed (random weights).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import lazy, shapes
from graphopt.errors import ModelLoadError

FORMAT_VERSION = 1


def load_model(ref: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    """Build the model ``ref`` names; returns ``(module, example_inputs or None)``."""
    from graphopt.app import examples

    if ref in examples.EXAMPLES:
        model, inputs = examples.get_example(ref)
        return model, inputs
    if ref.startswith("torchvision:"):
        return _torchvision(ref.split(":", 1)[1]), None
    if ":" not in ref:
        import difflib

        hint = difflib.get_close_matches(ref, list(examples.EXAMPLES), n=1)
        raise ModelLoadError(
            f"cannot resolve model {ref!r}: not a built-in example"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + "; use an example name (`graphopt models`), package.module:factory or path/file.py:factory"
        )
    where, factory_name = ref.rsplit(":", 1)
    module = _import_file(where) if where.endswith(".py") or os.sep in where else _import_module(where)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{where} has no callable {factory_name!r}; define a function returning the model")
    try:
        built = factory()
    except Exception as exc:
        raise ModelLoadError(f"{ref}: calling {factory_name}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        model, inputs = built
        return model, (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not isinstance(built, torch.nn.Module):
        raise ModelLoadError(f"{ref}: {factory_name}() returned {type(built).__name__}, not a torch.nn.Module")
    return built, None


def _import_module(name: str):
    """Import ``name``; a package in the current directory is found even when that directory is
    not on ``sys.path`` (the ``graphopt`` console script, unlike ``python -m``, leaves it out)."""
    try:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name.split(".")[0] or not _put_cwd_on_path():
                raise
            return importlib.import_module(name)
    except Exception as exc:
        raise ModelLoadError(f"cannot import module {name!r}: {type(exc).__name__}: {exc}") from exc


def _put_cwd_on_path() -> bool:
    """Append the current directory to ``sys.path`` (after everything installed, so it shadows
    nothing); False when it is there already."""
    cwd = os.path.realpath(os.getcwd())
    if any(isinstance(p, str) and os.path.realpath(p or os.curdir) == cwd for p in sys.path):
        return False
    sys.path.append(cwd)
    importlib.invalidate_caches()
    return True


def _import_file(path: str):
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"graphopt_user_model_{abs(hash(p.resolve()))}", p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def _torchvision(name: str) -> torch.nn.Module:
    try:
        import torchvision.models as tvm
    except Exception as exc:
        raise ModelLoadError(
            f"torchvision:{name} needs torchvision, which is not importable here ({exc}); "
            "install the optional extra: pip install torch==2.14.1 torchvision==0.29.1"
        ) from exc
    try:
        return tvm.get_model(name, weights=None).eval()
    except Exception as exc:
        raise ModelLoadError(f"torchvision has no model {name!r}: {exc}") from exc


def save(gm: fx.GraphModule, path: str | os.PathLike) -> int:
    """Write ``gm`` (its generated code, the names of the functions that code calls, and its
    tensors) atomically; returns bytes written."""
    from graphopt.fileio import atomic_write

    code = gm.graph.python_code("self")
    payload = {
        "graphopt_format": FORMAT_VERSION,
        "code": code.src,
        "globals": {name: _describe_global(value) for name, value in code.globals.items()},
        "state": dict(gm.state_dict()),
        "requires_grad": [k for k, p in gm.named_parameters() if p.requires_grad],
        # the dynamic and static dims of each input (graphopt.ir.shapes), so the loaded module
        # refuses the sizes the saved one refused
        "input_dims": [None if d is None else dataclasses.asdict(d) for d in shapes.input_dims(gm)],
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return os.path.getsize(path)


def _describe_global(value: Any) -> tuple:
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    if isinstance(value, type(os)):
        return ("module", value.__name__)
    if value is type(None):
        return ("nonetype",)
    return ("attr", value.__module__, value.__qualname__)


def _resolve_global(spec: tuple) -> Any:
    kind = spec[0]
    if kind == "nonetype":
        return type(None)
    if kind == "value":
        return spec[1]
    if kind == "module":
        return importlib.import_module(spec[1])
    obj: Any = importlib.import_module(spec[1])
    for part in spec[2].split("."):
        obj = getattr(obj, part)
    return obj


def load(path: str | os.PathLike, *, trust_code: bool = False) -> fx.GraphModule:
    """Load what :func:`save` wrote. The tensors load with ``weights_only=True``; the graph is
    Python code, so it is executed only with ``trust_code=True`` (never for files you did not
    write yourself)."""
    from torch.fx.graph_module import _forward_from_src

    from graphopt.fileio import load_weights

    payload = load_weights(path)
    if not isinstance(payload, dict) or payload.get("graphopt_format") != FORMAT_VERSION:
        raise ModelLoadError(f"{path} is not a graphopt module file (format {FORMAT_VERSION})")
    if not trust_code:
        raise ModelLoadError(
            f"{path} holds Python code for the graph; load it with trust_code=True only if you wrote it"
        )
    try:
        namespace = {name: _resolve_global(spec) for name, spec in payload["globals"].items()}
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: the graph calls something this environment lacks: {exc}") from exc
    root = torch.nn.Module()
    for key, value in payload["state"].items():
        *owner, field = key.split(".")
        mod = root
        for part in owner:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if key in payload["requires_grad"]:
            mod.register_parameter(field, torch.nn.Parameter(value))
        else:
            mod.register_buffer(field, value)
    loaded_cls = type("GraphoptLoaded", (torch.nn.Module,), {"forward": _forward_from_src(payload["code"], namespace)})
    holder = loaded_cls()
    for name, child in root.named_children():
        holder.add_module(name, child)
    for name, t in root.named_parameters(recurse=False):
        holder.register_parameter(name, t)
    for name, t in root.named_buffers(recurse=False):
        holder.register_buffer(name, t)
    tracer = fx.Tracer()
    tracer.proxy_buffer_attributes = True
    graph = tracer.trace(holder)
    recorded = [None if d is None else shapes.InputDims(**d) for d in payload.get("input_dims", [])]
    shapes.declare(graph, recorded + [None] * (sum(n.op == "placeholder" for n in graph.nodes) - len(recorded)))
    return lazy.graph_module(holder, graph, class_name="GraphoptLoaded")
