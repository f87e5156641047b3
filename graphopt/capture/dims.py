"""Dynamic dims: the model and the captured graph run at a second size of each dynamic dim; a
dim either of them cannot vary is kept static, with the reason."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import shapes
from graphopt.errors import first_line
from graphopt.ir.graph import execute, fresh_copies
from graphopt.capture.isolation import _Isolation
from graphopt.capture.messages import _where
from graphopt.capture.reproduction import _plain, _reproduction_problem


def _model_at_second_sizes(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]], kwargs: dict[str, Any],
    isolated: _Isolation, static: dict[str, str],
) -> tuple[dict[str, int], tuple[Any, ...], Any] | None:
    """Run the model with every dynamic dim at its second size; the sizes, inputs and outputs.

    A dim the model cannot run at another size (``view(2, -1)``) is added to ``static`` with
    the model's error, and the others are tried without it.
    """
    recorded = shapes.build(inputs, dims, static)
    sizes = shapes.sizes_for(recorded)
    if not sizes:
        return None
    try:
        resized = shapes.resized_inputs(recorded, inputs, sizes)
        with isolated():
            return sizes, resized, model(*fresh_copies(resized), **kwargs)
    except Exception:  # noqa: BLE001 - find the dims at fault, one at a time
        pass
    for name, size in sizes.items():
        try:
            with isolated():
                model(*fresh_copies(shapes.resized_inputs(recorded, inputs, {name: size})), **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            static[name] = (f"the model raised {type(exc).__name__} at {name}={size}{_where(exc)}: "
                            f"{first_line(exc)[:200]}")
    if len(static) == len(sizes):
        return None
    if not static:  # each dim runs alone but not all together: keep them all static
        for name in sizes:
            static[name] = "the model does not run with all dynamic dims at other sizes together"
        return None
    return _model_at_second_sizes(model, inputs, dims, kwargs, isolated, static)


def _check_generic(
    root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]],
    static: dict[str, str], second: tuple[dict[str, int], tuple[Any, ...], Any] | None, isolated: _Isolation,
) -> None:
    """Check that the graph reproduces the model at the second sizes; a dim at which it does
    not (the front end specialized it) is recorded static with the difference."""
    if second is None or all(name in static for name in second[0]):
        return
    sizes, resized, want = second
    try:
        with isolated():
            got = _plain(execute(root, fresh_copies(resized), graph))
        problem = _reproduction_problem(want, got)
    except Exception as exc:  # noqa: BLE001
        problem = f"{type(exc).__name__}: {first_line(exc)[:200]}"
    if not problem:
        return
    where = ", ".join(f"{k}={v}" for k, v in sizes.items())
    for name in sizes:
        static.setdefault(name, f"the captured graph does not reproduce the model at {where} ({problem})")
    shapes.declare(graph, shapes.build(inputs, dims, static))
