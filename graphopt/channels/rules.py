"""The op rules of the channel analysis: the table from op name to rule (:data:`_RULES`; an op
missing from it freezes the channels it touches), and the rules for elementwise ops, softmax,
reductions, pooling and padding. The rules of layers, norms and attention are in
:mod:`graphopt.channels.rules_layers`, those of data movement in
:mod:`graphopt.channels.rules_shapes`."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch.fx as fx

from graphopt.channels.propagation import _meta_shapes, _op_key, _Propagation
from graphopt.channels.records import Fixed, Labels
from graphopt.channels.rules_layers import (_addmm, _attention, _batch_norm, _conv, _conv_transpose, _group_norm,
                                            _layer_norm, _linear)
from graphopt.channels.rules_shapes import _cat, _getitem, _permute, _reshape, _size, _split
from graphopt.ir import ops


_UNARY = {
    "relu", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardsigmoid",
    "hardswish", "relu6", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to",
    "abs", "neg", "exp", "clamp", "clip", "square", "sqrt", "rsqrt", "reciprocal", "softplus", "selu", "celu",
}
_BINARY = {"add", "sub", "mul", "truediv", "div", "maximum", "minimum"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_POOLS = {
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "interpolate",
}


def _power(p: _Propagation, node: fx.Node) -> None:
    """``x ** c`` with a number ``c``: elementwise (GPT-2's tanh-approximated gelu cubes)."""
    if len(node.args) < 2 or not isinstance(node.args[1], (int, float)):
        return p.unknown(node)
    _unary(p, node)


def _unary(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0] if node.args else None)
    others = [a for a in node.all_input_nodes if a is not node.args[0] and p.labels(a) is not None]
    if x is None or others:  # e.g. clamp with tensor bounds: not a one-operand op
        return p.unknown(node)
    if ops.is_op(node, "dropout"):
        for row in x:
            p.block(row, "dropout in training mode")
    p.set(node, list(x))


def _softmax(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    dim = ops.arg(node, "dim")
    if x is None or not isinstance(dim, int):
        return p.unknown(node)
    p.block(x[dim], f"{_op_key(node)} normalizes across channels")
    p.set(node, list(x))


def _binary(p: _Propagation, node: fx.Node) -> None:
    out_shape = _meta_shapes(node)
    if not isinstance(out_shape, tuple) or (out_shape and isinstance(out_shape[0], tuple)):
        return p.unknown(node)
    operands = [a for a in list(node.args[:2]) if isinstance(a, fx.Node)]
    if any(p.labels(a) is None and _meta_shapes(a) is not None for a in operands):
        return p.unknown(node)
    rank = len(out_shape)
    out: Labels = []
    for d in range(rank):
        full, broadcast = [], []
        for a in operands:
            rows, shape = p.labels(a), _meta_shapes(a)
            if rows is None or not isinstance(shape, tuple):
                continue  # a Python number
            k = d - (rank - len(rows))
            if k < 0:
                broadcast.append(a)
            elif shape[k] == out_shape[d]:
                full.append(rows[k])
            else:
                broadcast.append(a)
        row: Any = Fixed("broadcast")
        for i, r in enumerate(full):
            row = r if i == 0 else p.unify(row, r, node)
        if isinstance(row, np.ndarray) and any(a in p.input_dependent or a.op == "placeholder" for a in broadcast):
            p.block(row, f"{node.name} combines each channel with a value broadcast over channels")
        out.append(row)
    p.set(node, out)


def _reduction(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0])
    dims = ops.call_arg(node, "dim", 1)
    keepdim = ops.call_arg(node, "keepdim", 2, False)
    if x is None or not isinstance(keepdim, bool):
        return p.unknown(node)
    if dims is None:
        dims = tuple(range(len(x)))
    dims = {d % len(x) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    out: Labels = []
    for d, row in enumerate(x):
        if d in dims:
            p.freeze(row, node, f"{_op_key(node)} reduces over channels")
            if keepdim:
                out.append(Fixed("reduced dim"))
        else:
            out.append(row)
    p.set(node, out)


def _pool(p: _Propagation, node: fx.Node) -> None:
    key = _op_key(node)
    x = p.labels(node.args[0])
    shape = _meta_shapes(node)
    if x is None or not isinstance(shape, tuple) or not shape or isinstance(shape[0], tuple):
        return p.unknown(node)  # e.g. return_indices=True
    spatial = 1 if key.endswith("1d") else 2 if key.endswith("2d") else len(x) - 2
    for row in x[len(x) - spatial:]:
        p.freeze(row, node, f"spatial dim read by {key}")
    if key.startswith("avg_pool") and ops.arg(node, "count_include_pad") and _nonzero(ops.arg(node, "padding")):
        for row in x[:len(x) - spatial]:
            p.block(row, f"{key} averages zero padding into border values")
    p.set(node, list(x[:len(x) - spatial]) + [Fixed("spatial extent")] * spatial)


def _nonzero(value: Any) -> bool:
    """True if a padding argument (int, tuple or string) pads anything."""
    if isinstance(value, str):
        return value != "valid"
    if isinstance(value, (tuple, list)):
        return any(_nonzero(v) for v in value)
    return value != 0


def _pad(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0])
    pad = ops.call_arg(node, "pad", 1)
    if x is None or not isinstance(pad, (tuple, list)):
        return p.unknown(node)
    padded = len(pad) // 2
    for row in x[len(x) - padded:]:
        p.freeze(row, node, "padded dim")
    for row in x[:len(x) - padded]:
        p.block(row, "padding adds values that are not the channel's constant")
    p.set(node, list(x[:len(x) - padded]) + [Fixed("padded extent")] * padded)


_RULES: dict[str, Callable[[_Propagation, fx.Node], None]] = {
    **{k: _conv for k in ("conv1d", "conv2d", "conv3d")},
    **{k: _conv_transpose for k in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    "linear": _linear,
    "addmm": _addmm,
    "pow": _power,
    "batch_norm": _batch_norm,
    "group_norm": _group_norm,
    "layer_norm": _layer_norm,
    **{k: _unary for k in _UNARY | {"dropout"}},
    "softmax": _softmax,
    "log_softmax": _softmax,
    "scaled_dot_product_attention": _attention,
    **{k: _binary for k in _BINARY},
    "cat": _cat,
    "split": _split,
    "chunk": _split,
    "getitem": _getitem,
    "size": _size,
    "getattr": _size,
    "permute": _permute,
    "transpose": _permute,
    **{k: _reduction for k in _REDUCTIONS},
    **{k: _pool for k in _POOLS},
    "pad": _pad,
    **{k: _reshape for k in _RESHAPES},
}
