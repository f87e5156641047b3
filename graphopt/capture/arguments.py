"""Checks on what the user passed to :func:`graphopt.capture.capture`: the model, the example
inputs, the mode, ``leaf_modules`` and ``concrete_args``."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import lowerings
from graphopt.errors import CaptureError, InputError
from graphopt.ir.graph import as_input_tuple

MODES = ("auto", "symbolic", "export")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture expects a torch.nn.Module instance, got {type(model).__name__}. "
            "Pass the model object (e.g. MyNet()), not its class or a function; wrap a plain "
            "function in an nn.Module whose forward calls it."
        )
    if lowerings.has_hooks(model):
        raise CaptureError(
            f"{type(model).__name__} has hooks on the model itself, which a graph cannot hold (hooks on "
            "submodules are fine: those stay opaque calls). Remove them before capture, or capture a "
            "wrapper module that calls this model, which then stays one opaque call."
        )


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = as_input_tuple(example_inputs)
    for i, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"example_inputs[{i}] is a {type(value).__name__}, not a tensor. example_inputs are "
                "tensors passed positionally to forward; fix non-tensor arguments with "
                "concrete_args={'name': value}."
            )
    return inputs


def _check_options(
    mode: str, leaf_modules: Sequence[Any], concrete_args: dict[str, Any] | None
) -> tuple[tuple[type[nn.Module], ...], frozenset[str]]:
    if mode not in MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; use one of {', '.join(map(repr, MODES))}.")
    if mode == "export" and (leaf_modules or concrete_args):
        raise CaptureError(
            'leaf_modules and concrete_args apply to mode="symbolic" only; torch.export traces '
            "every module and specializes Python arguments itself."
        )
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise CaptureError(f"concrete_args must be a dict of parameter name -> value, got {type(concrete_args).__name__}.")
    types, names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.append(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise CaptureError(
                f"leaf_modules entries must be nn.Module subclasses or qualified names, got {leaf!r}."
            )
    return tuple(types), frozenset(names)


def _fixed_kwargs(concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """Concrete args that are values (not ``fx.PH`` placeholders), passed by name when running."""
    return {k: v for k, v in (concrete_args or {}).items() if v is not fx.PH}
