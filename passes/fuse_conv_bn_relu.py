"""Fold inference batch norm into the conv or linear before it, then mark conv+activation units.

Folding. An inference ``F.batch_norm`` (``training=False``, running statistics present) computes,
per channel ``c`` of dim 1::

    y[c] = (x[c] - mean[c]) * s[c] + beta[c],    s[c] = gamma[c] / sqrt(var[c] + eps)

When ``x`` is the output of a convolution or linear layer ``x[c] = W[c] * input + b[c]``, the
batch norm disappears into new parameters of that layer::

    W'[c] = W[c] * s[c]                 (every weight element producing output channel c)
    b'[c] = (b[c] - mean[c]) * s[c] + beta[c]     (b = 0 when the layer has no bias)

``gamma = 1`` and ``beta = 0`` when the batch norm has no affine parameters. The output
channel is dim 0 of the weight for ``conv{1,2,3}d`` (``(Cout, Cin/g, k...)``) and ``linear``
(``(out, in)``); for ``conv_transpose{1,2,3}d`` the weight is ``(Cin, Cout/g, k...)``, so output
channel ``c = group * Cout/g + j`` sits at dim 1 index ``j`` of the rows of its group and the
scale is applied per group. The fold runs in float64 and is cast once to the layer's dtype, so
fp16/bf16 weights get the correctly rounded fused value (batch-norm parameters of another
dtype are read in float64 as well; the result always takes the layer's dtypes).

The fused tensors are new attributes of the graph module, ``<weight target>_folded`` and
``<owner>.bias_folded`` with dots turned into underscores, for example
``layer1_0_conv1_weight_folded``. The originals are never modified nor renamed: their values
changed meaning, and reusing the old names would let an unfused checkpoint load silently into
fused slots. The same choice makes shared and tied weights safe: a conv module called at two
sites (two ``get_attr`` readers of one target) gets fused parameters at the folded site only,
while the other site keeps reading the original. Old attributes left unread are removed later
by dead-code elimination. The fused tensors keep the weight's memory format and are
``nn.Parameter`` with the weight's ``requires_grad`` when the weight was a parameter (buffers
otherwise). The fused conv node takes the batch norm's provenance, since its value is now the
batch norm's, and ``meta["folded_from"]`` lists the provenances folded together (the layer's,
then each batch norm's: ``conv -> bn -> bn`` folds twice in one run).

A batch norm whose output is a graph output folds too (backbones that return their stage
outputs): the fused conv's output takes its place among the graph's outputs, with the same
values. ONNX Runtime declines there because its graph outputs are named by the node that
produces them; an FX graph's outputs are references to nodes, and graphopt names the ONNX
outputs after the model's output structure, not after nodes. A conv whose own output is also
returned (``return bn(conv(x)), conv(x)``) still declines: that value is the conv's, unfused.
The activation of a unit never runs in place when the conv's output is returned as well.

Fusion units. A conv or linear whose only user is a clamp-style activation that mobile
backends fuse into the conv kernel (``relu``; ``hardtanh``, which covers ``relu6``) forms one
unit with it: ``conv.meta["fusion_unit"] = {"activation": act.name, "kind": "relu" | "relu6" |
"hardtanh", "min_val": ..., "max_val": ...}`` (the clamp bounds) and ``act.meta["fused_into"] =
conv.name``. Quantization and lowering treat the unit as one op (no observer between the two).
A unit holds only while the activation is still the conv's sole user: consumers must check
that, since later rewrites may break it. Each unit counts as a rewrite. Other elementwise
activations (silu, hardswish, ...) are not fused by XNNPACK or ONNX Runtime's QLinearConv and
stay separate.

The activation of a unit runs in place, in the conv's output: ``torch.relu_(conv)``,
``F.hardtanh(conv, 0.0, 6.0, inplace=True)``. That is what fusion means for a runtime that
runs the graph op by op (eager PyTorch, the TorchScript interpreter): an out-of-place clamp
allocates a second tensor of the conv's size, and large allocations are fresh pages the
kernel must fault in, which made a fused eager model with out-of-place clamps no faster than
the original (``python -m benchmarks.run --sections latency`` shows eager times beside the peers).
It is sound because the conv's output is a fresh tensor read by the activation alone: nobody,
the caller included, can see the value before the clamp. Only layers whose kernel returns the
tensor it allocated qualify (batched convs, linear on 2-D input). Unbatched convs and linear
on other ranks return a view of an internal result, which an ``autograd.Function`` wrapping
the layer (the ONNX backend's integer linear) refuses to have written, so their units keep an
out-of-place activation. ``torch.jit.script``, both ONNX exporters and ``torch.export``
(functionalized, so XNNPACK still sees conv + clamp) all take the in-place spelling
(:data:`graphopt.ir.ops.FUSED_ACTIVATIONS`). ``canonicalize`` keeps it
(:func:`graphopt.ir.ops.fused_activation_op`), quantization placement reads it as the
activation it replaces, and :mod:`graphopt.ir.purity` counts it as a write into the conv's output:
dead-code elimination removes it with its unit, constant folding never folds the conv.

Declined, with the reason recorded: batch norm in training mode or without running
statistics; batch norm not fed directly by a canonical conv/linear (after an activation, after
an opaque ``call_module`` conv such as a subclass or a parametrized conv); conv output read by
anything else (the graph's output included); batch norm whose dim 1 is not the layer's output
channel axis (linear on 3-D input, unbatched conv), decided from ``meta["tensor_meta"]``;
parameters that are not constant attributes or that the graph mutates; a fold whose result is
not finite (``eps = 0`` with ``var = 0``, where eager gives NaN as well, or a fused value beyond
the range of a low-precision dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import ops
from graphopt.ir.graph import (
    add_constant,
    add_parameter,
    copy_provenance,
    get_attr_value,
    provenance,
    tensor_meta,
)
from graphopt.ir.purity import written_values

_CONVS = ("conv1d", "conv2d", "conv3d")
_TRANSPOSED_CONVS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_LAYERS = _CONVS + _TRANSPOSED_CONVS + ("linear",)
#: output rank of each conv on batched input (N, C, spatial...)
_BATCHED_RANK = {name: int(name[-2]) + 2 for name in _CONVS + _TRANSPOSED_CONVS}


@dataclass(frozen=True)
class _Fold:
    """A batch norm that passed every check, with the tensors its fold reads."""

    layer: fx.Node
    bn: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float


@graphopt.register_pass("fuse-conv-bn-relu", contract=graphopt.Exact(), after=("canonicalize",))
def fuse_conv_bn_relu(gm: fx.GraphModule, ctx: graphopt.PassContext, *, fuse_activations: bool = True) -> int:
    """Fold inference batch norm into the preceding conv/linear and mark conv+relu/relu6 units.

    The activation of a unit then runs in place in the conv's output (one allocation less per
    layer in eager runs; see the module docstring for why that is sound).
    Rewrites counted: one per folded batch norm, one per fusion unit marked.
    ``fuse_activations=false`` only folds batch norms.
    """
    folds = _fold_batch_norms(gm, ctx)
    units = _mark_fusion_units(gm, ctx) if fuse_activations else 0
    ctx.record("batch_norms_folded", folds)
    ctx.record("fusion_units", units)
    return folds + units


# --------------------------------------------------------------------------- folding


def _fold_batch_norms(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    mutated = _mutated_targets(gm)
    folded = 0
    for bn in [n for n in gm.graph.nodes if ops.is_op(n, "batch_norm")]:
        try:
            fold = _match(gm, bn, mutated)
        except _Decline as decline:
            ctx.decline(bn, str(decline))
            continue
        new_weight, new_bias = _fused_tensors(fold)
        if not (torch.isfinite(new_weight).all() and torch.isfinite(new_bias).all()):
            ctx.decline(bn, f"non-finite fold: var + eps is zero or negative for some channel (eager "
                            f"gives NaN/inf too), or the fused values overflow {new_weight.dtype}")
            continue
        if not ctx.may_rewrite(f"fold {bn.name} into {fold.layer.name}"):
            continue
        _rewrite(gm, fold, new_weight, new_bias)
        folded += 1
    return folded


class _Decline(Exception):
    """A candidate cannot be rewritten; the message is the reason recorded with ctx.decline."""


def _match(gm: fx.GraphModule, bn: fx.Node, mutated: set[str]) -> _Fold:
    """The fold for ``bn``; raises _Decline with the reason when it cannot be folded."""
    if ops.arg(bn, "running_mean") is None or ops.arg(bn, "running_var") is None:
        raise _Decline("batch norm without running statistics (track_running_stats=False) "
                       "uses batch statistics")
    if ops.arg(bn, "training") is not False:
        raise _Decline("batch norm in training mode normalizes with batch statistics")
    layer = ops.arg(bn, "input")
    if not isinstance(layer, fx.Node) or not ops.is_op(layer, *_LAYERS):
        raise _Decline(f"input is {_describe(layer)}, not a canonical conv or linear")
    others = [u.name for u in layer.users if u is not bn]
    if others:
        raise _Decline(f"output of {layer.name} is also read by {', '.join(others)}")
    _check_channel_axis(layer, bn)
    eps = ops.arg(bn, "eps")
    if not isinstance(eps, (int, float)):
        raise _Decline("eps is not a constant number")

    def constant(owner: fx.Node, name: str, optional: bool = False) -> torch.Tensor | None:
        value = ops.arg(owner, name)
        if value is None and optional:
            return None
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            raise _Decline(f"{name} of {owner.name} is not a constant attribute")
        if str(value.target) in mutated:
            raise _Decline(f"{name} of {owner.name} ({value.target}) is modified in place by the graph")
        tensor = get_attr_value(gm, value)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _Decline(f"{name} of {owner.name} ({value.target}) is not a floating-point tensor")
        return tensor

    weight = constant(layer, "weight")
    mean = constant(bn, "running_mean")
    assert weight is not None and mean is not None
    channels = _out_channels(layer, weight)
    if mean.numel() != channels:
        raise _Decline(f"batch norm has {mean.numel()} channels but {layer.name} produces {channels}")
    return _Fold(
        layer=layer, bn=bn, weight=weight, bias=constant(layer, "bias", optional=True), mean=mean,
        var=constant(bn, "running_var"), gamma=constant(bn, "weight", optional=True),
        beta=constant(bn, "bias", optional=True),
        eps=float(eps),
    )


def _check_channel_axis(layer: fx.Node, bn: fx.Node) -> None:
    """Decline unless dim 1 (what batch norm normalizes) is ``layer``'s output channel axis."""
    layer_meta, bn_meta = tensor_meta(layer), tensor_meta(bn)
    if layer_meta is None or bn_meta is None:
        raise _Decline(f"no shape metadata on {layer.name}/{bn.name}; "
                       "run graphopt.ir.graph.propagate_shapes first")
    if layer_meta.dtype != bn_meta.dtype:
        raise _Decline(f"batch norm changes the dtype ({layer_meta.dtype} -> {bn_meta.dtype})")
    rank = len(layer_meta.shape)
    if ops.is_op(layer, "linear") and rank != 2:
        raise _Decline(f"linear output is {rank}-D: its features are the last dim but batch norm "
                       "normalizes dim 1 (only (N, C) outputs fold)")
    if not ops.is_op(layer, "linear") and rank != _BATCHED_RANK[ops.op_name(layer)]:
        raise _Decline(f"{layer.name} runs unbatched: its channels are dim 0 but batch norm "
                       "normalizes dim 1")


def _out_channels(layer: fx.Node, weight: torch.Tensor) -> int:
    if ops.is_op(layer, *_TRANSPOSED_CONVS):
        return weight.shape[1] * ops.arg(layer, "groups")
    return weight.shape[0]


def _fused_tensors(fold: _Fold) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` per the module docstring, computed in float64, in the layer's dtypes."""
    weight = fold.weight.detach()
    as64 = {"dtype": torch.float64, "device": weight.device}
    mean, var = fold.mean.detach().to(**as64), fold.var.detach().to(**as64)
    gamma = fold.gamma.detach().to(**as64) if fold.gamma is not None else torch.ones_like(mean)
    beta = fold.beta.detach().to(**as64) if fold.beta is not None else torch.zeros_like(mean)
    bias = fold.bias.detach().to(**as64) if fold.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + fold.eps)

    kernel_dims = [1] * (weight.dim() - 2)
    w64 = weight.to(**as64)
    if ops.is_op(fold.layer, *_TRANSPOSED_CONVS):
        groups = ops.arg(fold.layer, "groups")
        cin, cout_per_group = weight.shape[0], weight.shape[1]
        grouped = w64.reshape(groups, cin // groups, cout_per_group, *weight.shape[2:])
        w64 = (grouped * scale.reshape(groups, 1, cout_per_group, *kernel_dims)).reshape(weight.shape)
    else:
        w64 = w64 * scale.reshape(-1, 1, *kernel_dims)
    b64 = (bias - mean) * scale + beta

    new_weight = torch.empty_like(weight)  # same dtype and memory format (channels_last stays)
    new_weight.copy_(w64)
    bias_dtype = fold.bias.dtype if fold.bias is not None else weight.dtype
    return new_weight, b64.to(bias_dtype)


def _rewrite(
    gm: fx.GraphModule,
    fold: _Fold,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor,
) -> None:
    layer, bn = fold.layer, fold.bn
    old_weight_node = ops.arg(layer, "weight")
    old_bias_node = ops.arg(layer, "bias")
    weight_target = str(old_weight_node.target)
    if old_bias_node is not None:
        bias_hint = str(old_bias_node.target)
    else:
        owner = weight_target.rpartition(".")[0]
        bias_hint = f"{owner}.bias" if owner else f"{weight_target}_bias"

    trainable = isinstance(fold.weight, torch.nn.Parameter)
    requires_grad = fold.weight.requires_grad
    graph = gm.graph
    with graph.inserting_before(layer):
        new_nodes = []
        for hint, value, template in (
            (_folded_name(weight_target), new_weight, old_weight_node),
            (_folded_name(bias_hint), new_bias, old_bias_node or old_weight_node),
        ):
            if trainable:
                name = add_parameter(gm, hint, value, requires_grad=requires_grad)
            else:
                name = add_constant(gm, hint, value)
            node = graph.get_attr(name)
            node.meta["provenance"] = name  # capture's convention for attributes: the target
            copy_provenance(node, template)
            new_nodes.append(node)
    ops.set_arg(layer, "weight", new_nodes[0])
    ops.set_arg(layer, "bias", new_nodes[1])

    layer.meta["folded_from"] = layer.meta.get("folded_from", [provenance(layer)]) + [provenance(bn)]
    layer.meta["provenance"] = provenance(bn)
    bn.replace_all_uses_with(layer)
    dead_inputs = [n for n in bn.all_input_nodes if n is not layer]
    graph.erase_node(bn)
    for node in dead_inputs + [old_weight_node, old_bias_node]:
        if isinstance(node, fx.Node) and node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _folded_name(target: str) -> str:
    """Name hint for the fused version of attribute ``target`` (one suffix, even when refolded)."""
    return target if target.endswith("_folded") else f"{target}_folded"


def _mutated_targets(gm: fx.GraphModule) -> set[str]:
    """Attribute targets the graph may write to, directly, through a view, or as a tied weight."""
    return {str(value.target) for value in written_values(gm) if value.op == "get_attr"}


def _describe(value: object) -> str:
    if not isinstance(value, fx.Node):
        return f"a constant {type(value).__name__}"
    if value.op == "call_module":
        return (f"opaque module call {value.target} (subclassed or parametrized convs stay "
                "call_module after capture)")
    if value.op == "placeholder":
        return f"graph input {value.name}"
    return f"{ops.op_name(value) or value.target} ({value.name})"


# --------------------------------------------------------------------------- fusion units


def _activation_unit(act: fx.Node) -> dict[str, object] | None:
    """The fusion-unit description of a clamp-style activation backends fuse, else None."""
    if ops.is_op(act, "relu"):
        return {"kind": "relu", "min_val": 0.0, "max_val": math.inf}
    if ops.is_op(act, "hardtanh"):
        low, high = ops.arg(act, "min_val"), ops.arg(act, "max_val")
        kind = "relu6" if (low, high) == (0.0, 6.0) else "hardtanh"
        return {"kind": kind, "min_val": float(low), "max_val": float(high)}
    return None


def _mark_fusion_units(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    marked = 0
    for act in list(gm.graph.nodes):
        if ops.fused_activation_op(act) is not None:
            continue  # fused in place by an earlier run
        unit = _activation_unit(act)
        if unit is None:
            continue
        layer = ops.arg(act, "input")
        if not isinstance(layer, fx.Node) or not ops.is_op(layer, *_LAYERS):
            continue
        in_place = _returns_its_own_tensor(layer)
        already = layer.meta.get("fusion_unit", {}).get("activation") == act.name
        if already and act.meta.get("fused_into") == layer.name and not in_place:
            continue  # marked by an earlier run, and it stays out of place
        others = [u.name for u in layer.users if u is not act]
        if others:
            ctx.decline(act, f"{unit['kind']} not fused: output of {layer.name} is also read by "
                             f"{', '.join(others)}")
            continue
        if not ctx.may_rewrite(f"fuse {act.name} into {layer.name}"):
            continue
        layer.meta["fusion_unit"] = {"activation": act.name, **unit}
        act.meta["fused_into"] = layer.name
        if in_place:
            _write_in_place(act, layer)
        marked += 1
    return marked


def _returns_its_own_tensor(layer: fx.Node) -> bool:
    """Whether ``layer``'s kernel returns the tensor it allocated, not a view of it (see the
    module docstring): convs on batched input, linear on 2-D input, from shape metadata."""
    meta = tensor_meta(layer)
    if meta is None:
        return False
    rank = len(meta.shape)
    return rank == 2 if ops.is_op(layer, "linear") else rank == _BATCHED_RANK[ops.op_name(layer)]


def _write_in_place(act: fx.Node, layer: fx.Node) -> None:
    """Make ``act`` clamp ``layer``'s output in place, spelled as
    :func:`graphopt.ir.ops.fused_activation_op` recognizes (see the module docstring)."""
    op, args = ops.op_name(act), ops.normalized_args(act)
    assert op is not None and args[0] is layer
    target, keywords = ops.FUSED_ACTIVATIONS[op]
    act.target, act.args, act.kwargs = target, args, dict(keywords)
