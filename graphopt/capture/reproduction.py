"""Whether the captured graph reproduces the model: its outputs compared with the model's,
structure first, then each value."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from graphopt.ir import lazy
from graphopt.errors import CaptureError
from graphopt.capture.messages import _WAYS_OUT


def _plain(value: Any) -> Any:
    """fx's interpreter returns immutable_dict/immutable_list: compare them as dict/list."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _reproduction_problem(reference: Any, got: Any) -> str:
    """How ``got`` differs from the model's outputs ``reference``, or ''."""
    want_leaves, want_spec = pytree.tree_flatten(reference)
    got_leaves, got_spec = pytree.tree_flatten(_plain(got))
    if want_spec != got_spec and not _same_fields(want_spec, got_spec):
        return f"the graph returns {got_spec} where the model returns {want_spec}"
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        problem = _difference(w, g)
        if problem:
            return f"output {i}: {problem}"
    return ""


def _keep_output_container(graph: fx.Graph, reference: Any) -> None:
    """Record the model's output structure on the output node where the graph returns the same
    fields in another container: the graph module then returns the model's type."""
    want = pytree.tree_flatten(reference)[1]
    output = next(iter(reversed(graph.nodes)))
    got = pytree.tree_flatten(output.args[0])[1]
    if want != got and _same_fields(want, got):
        output.meta[lazy.OUTPUT_SPEC_KEY] = want


def _same_fields(want: pytree.TreeSpec, got: pytree.TreeSpec) -> bool:
    """Whether two output structures differ only in the mapping type holding the same fields in
    the same order: torch.export returns a ``ModelOutput``'s fields as a plain dict."""
    if want.num_children != got.num_children:
        return False
    if want.type is not got.type:
        mappings = all(isinstance(t, type) and issubclass(t, dict) for t in (want.type, got.type))
        if not mappings or list(want.context or []) != list(got.context or []):
            return False
    elif want.context != got.context:
        return False
    return all(w == g or _same_fields(w, g) for w, g in zip(want.children(), got.children()))


def _check_reproduces(root: nn.Module, reference: Any, got: Any) -> None:
    problem = _reproduction_problem(reference, got)
    if problem:
        raise CaptureError(
            f"the captured graph of {type(root).__name__} does not reproduce the model on the example "
            f"inputs ({problem}). The model probably depends on something the trace cannot see "
            "(Python state, a branch taken at trace time, an in-place write to an input).\n" + _WAYS_OUT
        )


def _difference(want: Any, got: Any) -> str:
    if not isinstance(want, torch.Tensor):
        return "" if type(want) is type(got) and want == got else f"{got!r} instead of {want!r}"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return f"{_spec(got)} instead of {_spec(want)}"
    if not want.is_floating_point():
        return "" if torch.equal(want, got) else "different values"
    diff = (want.double() - got.double()).abs().nan_to_num(0.0)
    both_nan = torch.isnan(want) == torch.isnan(got)
    scale = want.double().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if want.numel() else 0.0
    if bool(both_nan.all()) and (not diff.numel() or diff.max().item() <= 1e-5 + 1e-4 * scale):
        return ""
    return f"max abs difference {diff.max().item():.3g}"


def _spec(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__
