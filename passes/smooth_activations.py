"""``smooth-activations``: move activation outliers into the weights of the linear layers reading
them (SmoothQuant), so int8 activations lose less.

Transformer activations have a few channels far wider than the rest; quantized per tensor, those
channels set the step for every other. A linear layer computes ``y = X W^T``, so for any positive
per-input-channel ``s``::

    y = (X / s) (W * s)^T          (column j of W multiplied by s[j])

and with ``X`` the output of a layer norm, ``X / s`` is the same layer norm with its weight and
bias divided by ``s``: the scale costs nothing at run time. The choice

    s[j] = max|X[..., j]| ** alpha / max|W[:, j]| ** (1 - alpha)

(``alpha`` 0.5 by default; ``max|X|`` over the calibration data, ``max|W|`` over every linear
layer reading ``X``) splits the range of channel ``j`` between activation and weight: after
smoothing ``max|X'_j| = max|X_j|^(1-alpha) max|W_j|^(1-alpha)`` and ``max|W'_j| = max|X_j|^alpha
max|W_j|^alpha``. Channels that are zero in either keep ``s = 1``. ``max|X|`` comes from
``ctx.calibration_data``, or from the example inputs plus synthesized ones (said in a note).

Candidates are layer norms over the last dim whose affine weight (when there is one) and bias
are constant attributes, read only by linear layers as their input. In post-norm transformers
(BERT, DistilBERT) every layer norm is also read by a residual ``add``: with the default
``other_readers=decline`` those are declined, with ``other_readers=rescale`` each other reader
reads ``X' * s`` instead (one elementwise multiply by a constant, exact up to rounding), which
smooths the linear layers' inputs at the cost of that multiply.

A layer norm whose output some node writes in place is declined (readers after the write see
another value than the one smoothed).

New tensors are new attributes (``<name>_smoothed``); the originals stay untouched. Computed in
float64, cast once. The contract is exact: the float graph computes the same outputs.
"""
from __future__ import annotations

import operator
import warnings
from typing import Annotated, Literal

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import ops, shapes
from graphopt.ir.graph import add_constant, copy_provenance, get_attr_value, rewritten_attr, tensor_meta
from graphopt.ir.purity import written_values
from graphopt.pipeline.options import Range
from graphopt.quantization import calibration as calib

#: scales within this factor of 1 (in log) leave the layer norm as it is
_NEGLIGIBLE = 1e-3
#: no channel moves by more than this factor either way (keeps float16 weights finite)
_LIMIT = 1e4


class _Decline(Exception):
    """A candidate cannot be smoothed; the message is the reason recorded."""


class _ChannelMax:
    """Largest magnitude of each channel of the last dim over every batch it sees (the
    ``observe`` interface of :func:`graphopt.quantization.calibration.calibrate`)."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def observe(self, value: torch.Tensor, where: str) -> None:
        data = value.detach().double().abs().reshape(-1, value.shape[-1])
        if data.shape[0] == 0:
            return
        seen = data.amax(dim=0)
        self.amax = seen if self.amax is None else torch.maximum(self.amax, seen)


@graphopt.register_pass("smooth-activations", contract=graphopt.Exact(), after=("fuse-conv-bn-relu",),
                        before=("quantize",))
def smooth_activations(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    alpha: Annotated[float, Range(ge=0, le=1, why="share of a channel's range moved into the weights")] = 0.5,
    other_readers: Literal["decline", "rescale"] = "decline",
    max_calibration_batches: Annotated[int, Range(ge=1)] = 16,
) -> int:
    """Divide layer-norm outputs by per-channel scales and multiply the reading linear layers'
    weight columns by them (SmoothQuant); exact in float.

    alpha: s = max|X|^alpha / max|W|^(1-alpha). other_readers: decline a layer norm also read by
    something other than a linear layer, or rescale that reader's input by s. Rewrites counted:
    one per layer norm smoothed.
    """
    writes = written_values(gm)
    written = {str(v.target) for v in writes if v.op == "get_attr"}
    candidates = []
    for norm in [n for n in gm.graph.nodes if ops.is_op(n, "layer_norm")]:
        try:
            if norm in writes:
                raise _Decline(f"its output is written in place by {writes[norm].name}: the readers after that "
                               "write see other values")
            candidates.append((norm, _readers(gm, norm, written, other_readers)))
        except _Decline as decline:
            ctx.decline(norm, str(decline))
    if not candidates:
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note below says when the data was synthesized
        data = calib.collect(ctx.example_inputs, ctx.calibration_data, max_batches=max_calibration_batches,
                             held_out=0, dynamic=shapes.dynamic_dims_of_inputs(gm))
    if data.synthesized:
        ctx.note(f"no calibration data: activation ranges from {data.description}; pass calibration_data "
                 "for scales that fit real inputs")
    watch = {norm: _ChannelMax() for norm, _ in candidates}
    calib.calibrate(gm, watch, data.batches)

    smoothed = 0
    for norm, (linears, others) in candidates:
        x_max = watch[norm].amax
        if x_max is None:
            ctx.decline(norm, "no calibration batch reached it")
            continue
        weights = [get_attr_value(gm, ops.arg(lin, "weight")).detach().double() for lin in linears]
        w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        usable = (x_max > 0) & (w_max > 0)
        s = torch.where(usable, x_max.pow(alpha) / torch.where(usable, w_max, 1.0).pow(1 - alpha), 1.0)
        s = s.clamp(1 / _LIMIT, _LIMIT)
        if float(s.log().abs().max()) < _NEGLIGIBLE:
            continue
        if not ctx.may_rewrite(f"smooth {norm.name} into {', '.join(lin.name for lin in linears)}"):
            continue
        _rewrite(gm, norm, linears, others, s)
        ctx.note(f"smoothed {norm.name} into {', '.join(lin.name for lin in linears)}"
                 + (f" (rescaled for {', '.join(o.name for o in others)})" if others else "")
                 + f": channel scales {float(s.min()):.3g}..{float(s.max()):.3g}")
        smoothed += 1
    ctx.record("layer_norms_smoothed", smoothed)
    return smoothed


def _readers(gm: fx.GraphModule, norm: fx.Node, written: set[str],
             other_readers: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """The linear layers reading ``norm`` and its other readers; raises _Decline."""
    width = ops.arg(norm, "normalized_shape")
    if len(tuple(width)) != 1:
        raise _Decline(f"normalizes {len(tuple(width))} dims; only a layer norm over the last dim is smoothed")
    for name in ("weight", "bias"):
        value = ops.arg(norm, name)
        if value is None:
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            raise _Decline(f"its {name} is not a constant attribute")
        if str(value.target) in written:
            raise _Decline(f"its {name} ({value.target}) is modified in place by the graph")
        if not get_attr_value(gm, value).is_floating_point():
            raise _Decline(f"its {name} ({value.target}) is not a floating-point tensor")
    linears, others = [], []
    for user in norm.users:
        weight = ops.arg(user, "weight") if ops.is_op(user, "linear") else None
        if weight is not None and ops.arg(user, "input") is norm and weight is not norm:
            if not isinstance(weight, fx.Node) or weight.op != "get_attr" or str(weight.target) in written:
                raise _Decline(f"weight of {user.name} is not a constant attribute the graph leaves alone")
            if not get_attr_value(gm, weight).is_floating_point():
                raise _Decline(f"weight of {user.name} is not a floating-point tensor")
            linears.append(user)
        else:
            others.append(user)
    if not linears:
        raise _Decline("no linear layer reads it")
    if others and other_readers == "decline":
        what = ", ".join("the graph output" if u.op == "output" else f"{u.name} ({ops.op_name(u) or u.target})"
                         for u in others)
        raise _Decline(f"also read by {what}; other_readers=rescale multiplies their input back by the scales")
    if any(u.op == "output" for u in others):
        raise _Decline("it is a graph output, whose values must not change")
    return linears, others


def _rewrite(gm: fx.GraphModule, norm: fx.Node, linears: list[fx.Node], others: list[fx.Node],
             s: torch.Tensor) -> None:
    graph = gm.graph
    weight, bias = ops.arg(norm, "weight"), ops.arg(norm, "bias")
    if weight is None:  # an affine weight of ones, divided by s, in the dtype the norm computes in
        meta = tensor_meta(norm)
        dtype = meta.dtype if meta is not None else get_attr_value(gm, ops.arg(linears[0], "weight")).dtype
        attr = add_constant(gm, f"{norm.name}_weight_smoothed", (1.0 / s).to(dtype))
        with graph.inserting_before(norm):
            node = graph.get_attr(attr)
        node.meta["provenance"] = attr
        ops.set_arg(norm, "weight", node)
    else:
        _replace(gm, norm, "weight", lambda w: w / s)
    if bias is not None:
        _replace(gm, norm, "bias", lambda b: b / s)
    for lin in linears:
        _replace(gm, lin, "weight", lambda w: w * s)
    if others:
        dtype = get_attr_value(gm, ops.arg(norm, "weight")).dtype
        attr = add_constant(gm, f"{norm.name}_smoothing", s.to(dtype))
        with graph.inserting_after(norm):
            scale = graph.get_attr(attr)
        with graph.inserting_after(scale):
            restored = graph.call_function(operator.mul, (norm, scale))
        scale.meta["provenance"] = attr
        copy_provenance(restored, norm)
        for user in others:
            user.replace_input_with(norm, restored)


def _replace(gm: fx.GraphModule, layer: fx.Node, name: str, change) -> None:
    """Point argument ``name`` of ``layer`` at a new attribute holding ``change(old)``, computed
    in float64 and stored in the old tensor's dtype and kind (parameter or buffer)."""
    old_node = ops.arg(layer, name)
    old = get_attr_value(gm, old_node)
    ops.set_arg(layer, name, rewritten_attr(gm, old_node, old, change(old.detach().double()), "_smoothed", before=layer))
    if not old_node.users:
        gm.graph.erase_node(old_node)

