"""``equalize-cross-layer``: balance the weight ranges of consecutive conv/linear layers.

Two layers in a row, ``y = W2 * act(W1 * x + b1) + b2``, with ``act`` ReLU or nothing, compute
the same function after any positive per-channel rescaling of the value between them, because
ReLU is positive-homogeneous (``relu(x / s) = relu(x) / s`` for ``s > 0``)::

    W1'[i] = W1[i] / s[i]      b1'[i] = b1[i] / s[i]      W2'[:, i] = W2[:, i] * s[i]

Per-channel int8 weights quantize each output channel of ``W1`` on its own, but every weight
of ``W2`` reading input channel ``i`` shares a scale with the other input channels of its
output row, and the activation between the layers is quantized per tensor: a channel far
wider than its neighbours takes most of both ranges. Choosing ``s`` so that the range of row
``i`` of ``W1`` equals the range of column ``i`` of ``W2``,

    r1[i] / s[i] = r2[i] * s[i]   =>   s[i] = sqrt(r1[i] / r2[i]) = sqrt(r1[i] * r2[i]) / r2[i]

(``r1[i] = max |W1[i]|``, ``r2[i] = max |W2[:, i]|``) balances the two. In a chain (conv ->
depthwise conv -> pointwise conv) the middle layer is in two pairs and equalizing one moves the
other, so the pass sweeps every chain until the scales settle (``rounds`` at most) and writes
each layer once. Column ``i`` of a grouped conv's weight is column ``i % (Cin / g)`` of the rows
of group ``i // (Cin / g)``; for a depthwise conv that is the filter of channel ``i`` itself.
Channels with an all-zero row or column keep ``s = 1``.

ReLU6 (``hardtanh(0, 6)``) is declined: it is not positive-homogeneous, since ``min(x, 6) / s``
is ``min(x / s, 6 / s)``, a per-channel clamp. Kept exact, that clamp is a tensor bound that
no mobile int8 kernel fuses (XNNPACK, ONNX Runtime's QLinearConv and torch's quantized
conv-relu all take scalar bounds): the conv+relu6 unit would split into a conv+relu unit and a
float ``minimum`` that costs one more requantization per layer, which eats the gain. A chain
through ReLU6 is therefore broken at that activation; pairs through ReLU or no activation
(MobileNetV2's linear bottleneck into the next block's expansion) are equalized.

Works on plain graphs and after ``fuse-conv-bn-relu`` (the in-place ReLU of a fusion unit is a
ReLU). New weights are new attributes (``<weight>_equalized``); the originals stay untouched,
so a weight tied to another layer keeps its value there. Computed in float64, cast once.

Declined, with the reason: the value between the layers has other readers or is a graph
output; the activation is ReLU6/hardtanh; the layers' channel counts do not line up (through
groups, or a conv feeding a linear); transposed convs; weights that are not constant
floating-point attributes or that the graph writes; channels the channel analysis freezes
(see :mod:`graphopt.channels`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.fx as fx

import graphopt
from graphopt import channels
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value, rewritten_attr
from graphopt.ir.purity import written_values
from graphopt.pipeline.options import Range

_CONVS = ("conv1d", "conv2d", "conv3d")
_TRANSPOSED = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_LAYERS = _CONVS + ("linear",)
#: a pair whose scales all lie within this factor of 1 (in log) counts as balanced
_BALANCED = 1e-3


@dataclass
class _Pair:
    first: fx.Node
    second: fx.Node
    activation: fx.Node | None


class _Decline(Exception):
    """A candidate pair cannot be equalized; the message is the reason recorded."""


@graphopt.register_pass("equalize-cross-layer", contract=graphopt.Exact(), after=("fuse-conv-bn-relu",),
                        before=("quantize",))
def equalize_cross_layer(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    rounds: Annotated[int, Range(ge=1, why="sweeps over each chain")] = 32,
) -> int:
    """Rescale channels between consecutive conv/linear layers (through ReLU or nothing) so
    their weight ranges match; exact in float.

    rounds: at most this many sweeps over a chain of pairs. Rewrites counted: one per pair
    equalized.
    """
    pairs = _pairs(gm, ctx)
    if not pairs:
        return 0
    weights = {layer: _Weights.read(gm, layer) for p in pairs for layer in (p.first, p.second)}
    equalized = 0
    for chain in _chains(pairs):
        work = {layer: weights[layer].float64() for p in chain for layer in (p.first, p.second)}
        totals = [torch.ones(work[p.first].weight.shape[0], dtype=torch.float64) for p in chain]
        for _ in range(rounds):
            biggest = 0.0
            for pair, total in zip(chain, totals):
                s = _scales(pair, work)
                _apply(pair, work, s)
                total.mul_(s)
                biggest = max(biggest, float(s.log().abs().max()))
            if biggest < _BALANCED / 10:
                break
        moved = [p for p, t in zip(chain, totals) if float(t.log().abs().max()) >= _BALANCED]
        if not moved:
            continue
        names = ", ".join(f"{p.first.name}->{p.second.name}" for p in chain)
        if not ctx.may_rewrite(f"equalize {names}"):
            continue
        for layer, tensors in work.items():
            _write(gm, layer, weights[layer], tensors)
        spread = max(float(t.log().abs().max()) for t in totals)
        ctx.note(f"equalized {names}: largest channel scale factor {math.exp(spread):.3g}")
        equalized += len(chain)
    ctx.record("pairs_equalized", equalized)
    return equalized


# --------------------------------------------------------------------------- matching


def _pairs(gm: fx.GraphModule, ctx: graphopt.PassContext) -> list[_Pair]:
    written = {str(v.target) for v in written_values(gm) if v.op == "get_attr"}
    candidates = []
    for second in gm.graph.nodes:
        if not ops.is_op(second, *_LAYERS, *_TRANSPOSED):
            continue
        pair = _candidate(second)
        if pair is None:
            continue
        try:
            _check(gm, pair, written)
        except _Decline as decline:
            ctx.decline(second, str(decline))
            continue
        candidates.append(pair)
    if candidates:
        frozen = _frozen_channels(gm)
        kept = []
        for pair in candidates:
            reason = frozen.get((pair.first.name, pair.second.name))
            if reason:
                ctx.decline(pair.second, f"channels between {pair.first.name} and {pair.second.name} are frozen: "
                                         f"{reason}")
            else:
                kept.append(pair)
        candidates = kept
    return candidates


def _candidate(second: fx.Node) -> _Pair | None:
    """The pair ending at ``second`` when its input is a layer, directly or through one
    activation (checked later); None when the input is anything else."""
    x = ops.arg(second, "input")
    if not isinstance(x, fx.Node):
        return None
    if ops.is_op(x, "relu", "hardtanh"):
        first = ops.call_arg(x, "input", 0)  # the fused in-place relu_ is not a canonical call
        if isinstance(first, fx.Node) and ops.is_op(first, *_LAYERS, *_TRANSPOSED):
            return _Pair(first, second, x)
        return None
    if ops.is_op(x, *_LAYERS, *_TRANSPOSED):
        return _Pair(x, second, None)
    return None


def _check(gm: fx.GraphModule, pair: _Pair, written: set[str]) -> None:
    first, second, act = pair.first, pair.second, pair.activation
    where = f"{first.name} -> {second.name}"
    if act is not None and ops.is_op(act, "hardtanh"):
        low, high = ops.arg(act, "min_val"), ops.arg(act, "max_val")
        raise _Decline(f"{where} goes through hardtanh({low:g}, {high:g}) ({act.name}): not positive-homogeneous; "
                       "kept exact the clamp would become per-channel, which int8 kernels do not fuse")
    for layer in (first, second):
        if ops.is_op(layer, *_TRANSPOSED):
            raise _Decline(f"{where}: {layer.name} is a transposed conv (its weight is (Cin, Cout/g, ...)); not handled")
    middle = [first] if act is None else [first, act]
    for value, reader in zip(middle, middle[1:] + [second]):
        others = [u for u in value.users if u is not reader]
        if any(u.op == "output" for u in others):
            raise _Decline(f"{where}: {value.name} is a graph output")
        if others:
            raise _Decline(f"{where}: {value.name} is also read by {', '.join(u.name for u in others)}")
    if ops.is_op(first, "linear") != ops.is_op(second, "linear") or (
            not ops.is_op(first, "linear") and ops.op_name(first) != ops.op_name(second)):
        raise _Decline(f"{where}: {ops.op_name(first)} feeds {ops.op_name(second)}, whose channel axis is another dim")
    for layer in (first, second):
        for name in ("weight", "bias"):
            value = ops.arg(layer, name)
            if value is None and name == "bias":
                continue
            if not isinstance(value, fx.Node) or value.op != "get_attr":
                raise _Decline(f"{where}: {name} of {layer.name} is not a constant attribute")
            if str(value.target) in written:
                raise _Decline(f"{where}: {name} of {layer.name} ({value.target}) is modified in place by the graph")
            tensor = get_attr_value(gm, value)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise _Decline(f"{where}: {name} of {layer.name} ({value.target}) is not a floating-point tensor")
    w1, w2 = get_attr_value(gm, ops.arg(first, "weight")), get_attr_value(gm, ops.arg(second, "weight"))
    produced, read = w1.shape[0], w2.shape[1] * _groups(second)
    if produced != read:
        raise _Decline(f"{where}: {first.name} produces {produced} channels but {second.name} reads {read} "
                       "(groups or channel counts do not line up)")


def _frozen_channels(gm: fx.GraphModule) -> dict[tuple[str, str], str]:
    """Reasons the channel analysis freezes the channels between a producer and a consumer."""
    out: dict[tuple[str, str], str] = {}
    for group in channels.analyze(gm).groups:
        if not group.frozen:
            continue
        reason = "; ".join(f"{r} (at {n})" for n, r in group.frozen[:2])
        for producer in group.producers:
            for consumer in group.consumers:
                out[(producer.node.name, consumer.node.name)] = reason
    return out


def _chains(pairs: list[_Pair]) -> list[list[_Pair]]:
    """Pairs grouped into chains: pairs sharing a layer are equalized together."""
    chains: list[list[_Pair]] = []
    for pair in pairs:
        touching = [c for c in chains if any({p.first, p.second} & {pair.first, pair.second} for p in c)]
        merged = [p for c in touching for p in c] + [pair]
        chains = [c for c in chains if c not in touching] + [merged]
    return chains


# --------------------------------------------------------------------------- arithmetic


@dataclass
class _Weights:
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def read(cls, gm: fx.GraphModule, layer: fx.Node) -> "_Weights":
        bias = ops.arg(layer, "bias")
        return cls(get_attr_value(gm, ops.arg(layer, "weight")), get_attr_value(gm, bias) if bias is not None else None)

    def float64(self) -> "_Weights":
        return _Weights(self.weight.detach().double().clone(),
                        self.bias.detach().double().clone() if self.bias is not None else None)


def _groups(layer: fx.Node) -> int:
    return 1 if ops.is_op(layer, "linear") else int(ops.arg(layer, "groups"))


def _by_input_channel(second: fx.Node, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` viewed as (groups, out per group, in per group, rest...): input channel ``i``
    is ``[i // in_per_group, :, i % in_per_group]``."""
    groups = _groups(second)
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def _scales(pair: _Pair, work: dict[fx.Node, _Weights]) -> torch.Tensor:
    w1, w2 = work[pair.first].weight, work[pair.second].weight
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(dim=1)
    r2 = _by_input_channel(pair.second, w2).abs().amax(dim=(1, 3)).reshape(-1)
    usable = (r1 > 0) & (r2 > 0)
    s = torch.where(usable, (r1 / torch.where(usable, r2, 1.0)).sqrt(), torch.ones_like(r1))
    return s


def _apply(pair: _Pair, work: dict[fx.Node, _Weights], s: torch.Tensor) -> None:
    first, second = work[pair.first], work[pair.second]
    first.weight.div_(s.reshape(-1, *[1] * (first.weight.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(s)
    grouped = _by_input_channel(pair.second, second.weight)
    per_group = grouped.shape[2]
    grouped.mul_(s.reshape(grouped.shape[0], 1, per_group, 1))


def _write(gm: fx.GraphModule, layer: fx.Node, original: _Weights, work: _Weights) -> None:
    """Point ``layer`` at new attributes holding ``work`` in the original tensors' dtypes."""
    for name, old_tensor, new64 in (("weight", original.weight, work.weight), ("bias", original.bias, work.bias)):
        if old_tensor is None:
            continue
        old_node = ops.arg(layer, name)
        ops.set_arg(layer, name, rewritten_attr(gm, old_node, old_tensor, new64, "_equalized", before=layer))
        if not old_node.users:
            gm.graph.erase_node(old_node)
