"""Context-manager regions that ``torch.export`` wraps in higher-order ops, inlined.

A ``with torch.autocast(..., enabled=False):`` block (timm's EfficientViT attention keeps its
matmuls in float that way) or a ``torch.set_grad_enabled`` block becomes a call of
``wrap_with_autocast`` / ``wrap_with_set_grad_enabled`` on a submodule of the exported program.
For inference in the model's own dtype both are no-ops, so their nodes are copied in place of
the call. An autocast region that is *enabled* changes dtypes inside it: that is refused with
a way out, as is any other higher-order op (``torch.cond`` and the like).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from graphopt.errors import CaptureError

_WAYS_OUT = ('capture with mode="symbolic", or run the region without the context manager for export')


def _kind(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    return str(getattr(node.target, "__name__", node.target))


def is_region_body(program_module: fx.GraphModule, node: fx.Node) -> bool:
    """True for the ``get_attr`` of a region's submodule (it is inlined, not kept)."""
    return node.op == "get_attr" and isinstance(getattr(program_module, str(node.target), None), fx.GraphModule)


def is_region(node: fx.Node) -> bool:
    return _kind(node) is not None


def inline_region(program_module: fx.GraphModule, graph: fx.Graph, node: fx.Node, env: dict[fx.Node, Any],
                  copy_meta: Callable[[fx.Node, fx.Node], None]) -> tuple[Any, ...]:
    """Copy the body of region ``node`` into ``graph`` (its inputs read through ``env``);
    returns the values the region returns, for the ``getitem`` nodes that read them."""
    kind = _kind(node)
    if kind == "wrap_with_autocast":
        enabled, body, args = node.args[2], node.args[4], node.args[5:]
        if enabled:
            raise CaptureError(f"the model runs part of its forward under torch.autocast(enabled=True) (at "
                               f"{node.name}); capture keeps the model's dtypes and cannot drop it: {_WAYS_OUT}")
    elif kind == "wrap_with_set_grad_enabled":
        body, args = node.args[1], node.args[2:]
    else:
        raise CaptureError(f"torch.export wrote a {kind} region ({node.name}), which capture does not inline; "
                           f"{_WAYS_OUT}")
    sub = program_module.get_submodule(str(body.target))
    local: dict[fx.Node, Any] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for placeholder, value in zip(placeholders, args):
        local[placeholder] = map_arg(value, env.__getitem__)
    for inner in sub.graph.nodes:
        if inner.op == "placeholder":
            continue
        if inner.op == "output":
            return tuple(map_arg(inner.args[0], local.__getitem__))
        if inner.op != "call_function" or is_region(inner):
            raise CaptureError(f"the {kind} region {node.name} holds {inner.op} {inner.target}, which capture "
                               f"does not inline; {_WAYS_OUT}")
        local[inner] = graph.node_copy(inner, local.__getitem__)
        copy_meta(inner, local[inner])
    raise CaptureError(f"the {kind} region {node.name} has no output")


def read_of_region(node: fx.Node, regions: dict[fx.Node, tuple[Any, ...]]) -> Any | None:
    """The inlined value a ``getitem`` of a region reads, or None for any other node."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] in regions:
        return regions[node.args[0]][node.args[1]]
    return None
