"""Channel rules for the ops that own channel tensors or heads: conv (grouped and depthwise
included), transposed conv, linear, ``addmm`` (GPT-2's ``Conv1D``), batch / group / layer norm
and scaled dot-product attention."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch.fx as fx

from graphopt.channels.propagation import _meta_shapes, _Propagation, layer_name
from graphopt.channels.records import Fixed, Labels, Layer, _ArgUpdate
from graphopt.ir import ops


def _conv(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None:
        return p.unknown(node)
    if not isinstance(w[0], np.ndarray):
        return _fixed_outputs(p, node, w[0])
    spatial = len(w) - 2
    cdim = len(x) - spatial - 1
    for row in w[2:]:
        p.freeze(row, node, "kernel extent")
    groups = ops.arg(node, "groups")
    if not isinstance(groups, int):
        p.freeze_inputs(node, f"groups of {node.name} is computed at run time")
        p.set(node, p.fixed_value(node, "conv with computed groups"))
        return
    out_row, in_row = w[0], x[cdim]
    b = p.labels(b_node)
    if b is not None:
        p.unify(out_row, b[0], node)
    if groups == 1:
        p.unify(in_row, w[1], node)
    else:
        p.freeze(w[1], node, "per-group input width of a grouped conv (whole groups are pruned instead)")
        _couple_conv_groups(p, node, in_row, out_row, groups)
    for row in x[cdim + 1:]:
        p.freeze(row, node, "spatial dim read by a conv")
    name = layer_name(w_node, node)
    p.layers.append(Layer(node, "conv", name, w_node, 0, 1, out_row, in_row, x_node, cdim, groups))
    p.set(node, list(x[:cdim]) + [out_row] + [Fixed("spatial extent")] * spatial)


def _fixed_outputs(p: _Propagation, node: fx.Node, row: Fixed) -> None:
    """A layer whose weight's output-channel dim cannot change (a weight computed from a fixed
    shape, e.g. standardized per call as NF-ResNet's ``ScaledStdConv2d`` does): it is not a
    layer pruning can cut, and what it reads and writes stays whole."""
    p.freeze_inputs(node, f"output channels of {node.name}'s weight cannot change ({row.why})")
    p.set(node, p.fixed_value(node, f"output of {node.name}, whose weight's channels cannot change"))


def _couple_conv_groups(p: _Propagation, node: fx.Node, in_row: Any, out_row: np.ndarray, groups: int) -> None:
    """Whole conv groups: inputs and outputs of group k become one unit; ``groups`` follows."""
    per_out = out_row.size // groups
    p.coarsen(out_row, per_out)
    heads = out_row[::per_out]
    if isinstance(in_row, Fixed):
        p.freeze(out_row, node, f"grouped conv on input channels that cannot change ({in_row.why})")
        return
    per_in = in_row.size // groups
    p.coarsen(in_row, per_in)
    p.edges.append((heads, in_row[::per_in]))
    cin = in_row.size

    def apply(kept: Callable[[np.ndarray], int], node=node, in_row=in_row, groups=groups, cin=cin) -> None:
        ops.set_arg(node, "groups", groups * kept(in_row) // cin)

    p.arg_updates.append(_ArgUpdate(node, f"groups of {node.name}", [(f"{node.name}.groups", in_row)], apply))


def _conv_transpose(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None:
        return p.unknown(node)
    if ops.arg(node, "groups") != 1:
        return p.unknown(node)
    if not isinstance(w[1], np.ndarray):
        return _fixed_outputs(p, node, w[1])
    spatial = len(w) - 2
    cdim = len(x) - spatial - 1
    for row in w[2:]:
        p.freeze(row, node, "kernel extent")
    p.unify(x[cdim], w[0], node)
    b = p.labels(b_node)
    if b is not None:
        p.unify(w[1], b[0], node)
    for row in x[cdim + 1:]:
        p.freeze(row, node, "spatial dim read by a transposed conv")
    p.layers.append(Layer(node, "conv_transpose", layer_name(w_node, node), w_node, 1, 0, w[1], x[cdim],
                          x_node, cdim))
    p.set(node, list(x[:cdim]) + [w[1]] + [Fixed("spatial extent")] * spatial)


def _linear(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None or len(w) != 2:
        return p.unknown(node)
    if not isinstance(w[0], np.ndarray):
        return _fixed_outputs(p, node, w[0])
    p.unify(x[-1], w[1], node)
    b = p.labels(b_node)
    if b is not None:
        p.unify(w[0], b[0], node)
    p.layers.append(Layer(node, "linear", layer_name(w_node, node), w_node, 0, 1, w[0], x[-1], x_node, len(x) - 1))
    p.set(node, list(x[:-1]) + [w[0]])


def _addmm(p: _Propagation, node: fx.Node) -> None:
    """``addmm(bias, x, w)``: a linear layer with its weight stored ``(in, out)``, as
    transformers' ``Conv1D`` (GPT-2) computes on ``x`` flattened to 2-D."""
    b_node, x_node, w_node = node.args[:3]
    x, w, b = p.labels(x_node), p.labels(w_node), p.labels(b_node)
    if x is None or w is None or b is None or len(x) != 2 or len(w) != 2 or not b:
        return p.unknown(node)
    if not isinstance(w[1], np.ndarray):
        return _fixed_outputs(p, node, w[1])
    p.unify(x[1], w[0], node)
    p.unify(w[1], b[-1], node)
    if len(b) == 2:
        p.unify(x[0], b[0], node)
    p.layers.append(Layer(node, "addmm", layer_name(w_node, node), w_node, 1, 0, w[1], x[1], x_node, 1))
    p.set(node, [x[0], w[1]])


def _batch_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    if x is None or len(x) < 2:
        return p.unknown(node)
    row = x[1]
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            row = p.unify(row, t[0], node)
    if ops.arg(node, "training") is not False:
        p.block(x[1], "batch norm normalizes with batch statistics")
    p.set(node, list(x))


def _group_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    groups = ops.arg(node, "num_groups")
    if x is None or len(x) < 2 or not isinstance(groups, int):
        return p.unknown(node)
    row = x[1]
    for name in ("weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            p.unify(row, t[0], node)
    if isinstance(row, np.ndarray):
        p.coarsen(row, row.size // groups)
        p.block(row, "group norm normalizes across channels")
        channels = row.size

        def apply(kept: Callable[[np.ndarray], int], node=node, row=row) -> None:
            ops.set_arg(node, "num_groups", groups * kept(row) // channels)

        p.arg_updates.append(_ArgUpdate(node, f"num_groups of {node.name}", [(f"{node.name}.num_groups", row)], apply))
    p.set(node, list(x))


def _layer_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    shape = ops.arg(node, "normalized_shape")
    if x is None or not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
        return p.unknown(node)
    k = len(shape)
    rows = x[len(x) - k:]
    for name in ("weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            for a, b in zip(rows, t):
                p.unify(a, b, node)
    labeled = [(i, r) for i, r in enumerate(rows) if isinstance(r, np.ndarray)]
    for _, r in labeled:
        p.block(r, "layer norm normalizes across channels")
    if labeled:
        def apply(kept: Callable[[np.ndarray], int], node=node, shape=tuple(shape), labeled=labeled) -> None:
            new = list(shape)
            for i, r in labeled:
                new[i] = kept(r)
            ops.set_arg(node, "normalized_shape", tuple(new))

        p.arg_updates.append(_ArgUpdate(node, f"normalized_shape of {node.name}",
                                        [(f"{node.name}.normalized_shape.{i}", r) for i, r in labeled], apply))
    p.set(node, list(x))


def _attention(p: _Propagation, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, attn_mask)`` on ``(..., heads, seq, head_dim)``:
    head ``h`` of q, k, v and the output couple index by index, so a cut removes whole heads
    (the view that splits a projection into ``(B, S, heads, head_dim)`` makes each head one
    unit); q and k's head_dim couple (their dot product), v's is the output's. A head_dim
    that shrinks would change the default scale ``1/sqrt(head_dim)``: it is frozen unless
    ``scale`` is given. A mask couples where it is not broadcast."""
    q, k, v = (p.labels(ops.call_arg(node, name, i)) for i, name in enumerate(("query", "key", "value")))
    mask = ops.call_arg(node, "attn_mask", 3)
    mask_rows, mask_shape = p.labels(mask), _meta_shapes(mask) if isinstance(mask, fx.Node) else None
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) >= 3) or (
            isinstance(mask, fx.Node) and (mask_rows is None or not isinstance(mask_shape, tuple))):
        return p.unknown(node)
    if ops.call_arg(node, "enable_gqa", 6, False):
        return p.unknown(node)
    lead = [p.unify(p.unify(a, b, node), c, node) for a, b, c in zip(q[:-2], k[:-2], v[:-2])]
    key_seq = p.unify(k[-2], v[-2], node)
    head_dim = p.unify(q[-1], k[-1], node)
    if ops.call_arg(node, "scale", 5) is None:
        p.freeze(head_dim, node, "head_dim sets the attention's default scale 1/sqrt(head_dim)")
    out: Labels = [*lead, q[-2], v[-1]]
    if mask_rows is not None:
        scores = [*lead, q[-2], key_seq]
        for j, (row, size) in enumerate(zip(reversed(mask_rows), reversed(mask_shape))):
            target = scores[len(scores) - 1 - j] if j < len(scores) else None
            if target is not None and size != 1:
                p.unify(target, row, node)
    for row in lead:  # a head whose weights are zero still outputs its value bias: not a dead unit
        p.block(row, f"{node.name} mixes each head's values over positions")
    p.set(node, out)
