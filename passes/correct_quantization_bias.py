"""``correct-quantization-bias``: remove the mean output error that int8 weights add to each
conv/linear layer (empirical bias correction).

Rounding a weight to int8 moves each output channel by ``(W_q - W) x``. Over real inputs that
error has a non-zero mean per channel whenever the inputs do (after a ReLU they always do), and
a bias shift survives every later layer. This pass measures it on calibration data and moves it
into the bias::

    e[c] = mean over batch and positions of  layer(x, W_q - W)[c]      (x: the layer's input in
                                                                        the quantized graph)
    b'[c] = b[c] - e[c]                                                 (b = 0 when there is none)

It runs on ``quantize``'s QDQ graph, before ``fold-weight-quantization``, while each weight is
still ``dequantize_per_channel(quantize_per_channel(W))`` over the float ``W``. Layers are
corrected in graph order with every batch run in lockstep, so each layer's error is measured on
inputs that already carry the corrections upstream (what the corrected graph will feed it).

The result must not be worse: the output SQNR against the float graph (the same graph with its
quantize/dequantize nodes read as identities) is measured on held-out batches with and without
the corrections, and when any output gets worse every correction is taken back and the pass
declines, saying by how much. Corrected layers are marked (``meta["bias_corrected"]``) and a
second run leaves them alone: the error depends only on the weights, so correcting twice would
subtract it twice.

Biases stay float (backends store them as int32 at ``s_in * s_w`` and ``quantize`` already
raised the weight scales where that could overflow: the correction is smaller than the rounding
error of the weights, so it does not change that margin).
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Annotated, Any

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import ops, shapes
from graphopt.ir.graph import add_constant, copy_provenance, get_attr_value
from graphopt.pipeline.options import Range
from graphopt.quantization import calibration as calib
from graphopt.quantization import evaluation, qdq

_WEIGHTED = ("conv1d", "conv2d", "conv3d", "linear")
#: quantize/dequantize ops the float reference reads as identities
_IDENTITIES = qdq.QDQ_TARGETS - {qdq.CHOOSE_QPARAMS}


@graphopt.register_pass("correct-quantization-bias", contract=graphopt.Lossy(min_sqnr_db=15.0),
                        after=("quantize",), before=("fold-weight-quantization",))
def correct_quantization_bias(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    max_calibration_batches: Annotated[int, Range(ge=1)] = 16,
    held_out_batches: Annotated[int, Range(ge=1)] = 2,
) -> int:
    """Subtract the mean per-channel output error of int8 weights from each conv/linear bias,
    measured on calibration data; taken back if held-out output SQNR gets worse.

    Rewrites counted: one per layer whose bias was corrected.
    """
    layers = _layers(gm, ctx)
    if not layers:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note below says when the data was synthesized
        data = calib.collect(ctx.example_inputs, ctx.calibration_data, max_batches=max_calibration_batches,
                             held_out=held_out_batches, dynamic=shapes.dynamic_dims_of_inputs(gm))
    if data.synthesized:
        ctx.note(f"no calibration data: errors measured on {data.description}; pass calibration_data")

    corrections = _measure(gm, layers, data.batches)
    reference = _float_reference(gm)
    before = evaluation.output_sqnr(reference, gm, data.held_out)
    undo = _rewrite(gm, corrections)  # a trial: taken back whatever it shows
    after = evaluation.output_sqnr(reference, gm, data.held_out)
    undo()
    ctx.record("held_out_sqnr_db", {"before": before, "after": after})
    worse = [i for i, (b, a) in enumerate(zip(before, after)) if a < b]
    if worse:
        figures = ", ".join(f"output {i}: {before[i]:.2f} -> {after[i]:.2f} dB" for i in worse)
        for node in corrections:
            ctx.decline(node, f"bias correction taken back: held-out SQNR got worse ({figures})")
        return 0
    granted = {n: c for n, c in corrections.items() if ctx.may_rewrite(f"correct the bias of {n.name}")}
    _rewrite(gm, granted)
    ctx.note("held-out output SQNR " + ", ".join(f"{b:.2f} -> {a:.2f} dB" for b, a in zip(before, after))
             + f" with {len(corrections)} bias(es) corrected; {data.description}")
    ctx.record("biases_corrected", len(granted))
    return len(granted)


def _layers(gm: fx.GraphModule, ctx: graphopt.PassContext) -> dict[fx.Node, torch.Tensor]:
    """Each quantized conv/linear with the float weight its int8 weight was rounded from."""
    out = {}
    for node in gm.graph.nodes:
        if not ops.is_op(node, *_WEIGHTED):
            continue
        weight = ops.arg(node, "weight")
        if not qdq.is_weight_dequantize(weight):
            continue  # a float layer: quantize kept it float, or the graph is not quantized
        if node.meta.get("bias_corrected"):
            continue
        rounded = weight.args[0]
        source = rounded.args[0] if isinstance(rounded, fx.Node) and rounded.target is qdq.QUANTIZE_PER_CHANNEL else None
        if not (isinstance(source, fx.Node) and source.op == "get_attr"):
            ctx.decline(node, "its float weight is gone (fold-weight-quantization ran): run "
                              "correct-quantization-bias between quantize and fold-weight-quantization")
            continue
        bias = ops.arg(node, "bias")
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            ctx.decline(node, "its bias is not a constant attribute")
            continue
        out[node] = get_attr_value(gm, source)
    return out


def _measure(gm: fx.GraphModule, layers: dict[fx.Node, torch.Tensor],
             batches: list[tuple[Any, ...]]) -> dict[fx.Node, torch.Tensor]:
    """The corrected bias of each layer, measured with every batch run in lockstep (see the
    module docstring)."""
    runs = [fx.Interpreter(gm, garbage_collect_values=False) for _ in batches]
    for run, batch in zip(runs, batches):
        run.args_iter = iter(batch)
    order = list(gm.graph.nodes)
    last_use = {n: i for i, node in enumerate(order) for n in node.all_input_nodes}
    frees: dict[int, list[fx.Node]] = {}
    for n, i in last_use.items():
        frees.setdefault(i, []).append(n)

    corrected: dict[fx.Node, torch.Tensor] = {}
    with torch.no_grad():
        for i, node in enumerate(order):
            if node.op == "output":
                break
            if node in layers:
                corrected[node] = _corrected_bias(gm, node, layers[node], runs)
            for run in runs:
                if node in corrected:
                    args = list(fx.node.map_arg(ops.normalized_args(node), run.env.__getitem__))
                    args[_index(node, "bias")] = corrected[node]
                    run.env[node] = node.target(*args)
                else:
                    run.env[node] = run.run_node(node)
            for done in frees.get(i, ()):
                for run in runs:
                    run.env.pop(done, None)
    return corrected


def _index(node: fx.Node, name: str) -> int:
    spec = ops.spec_of(node)
    assert spec is not None
    return spec.index[name]


def _corrected_bias(gm: fx.GraphModule, node: fx.Node, float_weight: torch.Tensor,
                    runs: list[fx.Interpreter]) -> torch.Tensor:
    total: torch.Tensor | None = None
    count = 0
    for run in runs:
        args = list(fx.node.map_arg(ops.normalized_args(node), run.env.__getitem__))
        weight = args[_index(node, "weight")]
        args[_index(node, "weight")] = weight - float_weight.to(weight.dtype)
        args[_index(node, "bias")] = None
        error = node.target(*args).double()
        axis = error.dim() - 1 if ops.is_op(node, "linear") else (1 if error.dim() == weight.dim() else 0)
        per_channel = error.movedim(axis, 0).reshape(error.shape[axis], -1)
        total = per_channel.sum(dim=1) if total is None else total + per_channel.sum(dim=1)
        count += per_channel.shape[1]
    assert total is not None
    mean_error = total / max(count, 1)
    bias_node = ops.arg(node, "bias")
    bias = get_attr_value(gm, bias_node) if bias_node is not None else torch.zeros(
        float_weight.shape[0], dtype=float_weight.dtype)
    return (bias.detach().double() - mean_error).to(bias.dtype)


def _float_reference(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every quantize/dequantize read as the identity: the float graph it quantizes."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _IDENTITIES:
            node.replace_all_uses_with(node.args[0])
    for node in reversed(list(graph.nodes)):
        chosen = node.target is operator.getitem and getattr(node.args[0], "target", None) is qdq.CHOOSE_QPARAMS
        if not node.users and node.op == "call_function" and (node.target in qdq.QDQ_TARGETS or chosen):
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _rewrite(gm: fx.GraphModule, corrections: dict[fx.Node, torch.Tensor]):
    """Point each layer at its corrected bias; returns a function that takes it all back."""
    graph = gm.graph
    previous = {}
    for node, bias in corrections.items():
        old = ops.arg(node, "bias")
        weight = ops.arg(node, "weight").args[0].args[0]
        hint = f"{old.target}_corrected" if old is not None else f"{weight.target.rpartition('.')[0] or weight.target}.bias_corrected"
        attr = add_constant(gm, hint, bias)
        with graph.inserting_before(node):
            new = graph.get_attr(attr)
        new.meta["provenance"] = attr
        copy_provenance(new, old if old is not None else weight)
        ops.set_arg(node, "bias", new)
        node.meta["bias_corrected"] = True
        previous[node] = (old, new)
    gm.recompile()

    def undo() -> None:
        for node, (old, new) in previous.items():
            ops.set_arg(node, "bias", old)
            node.meta.pop("bias_corrected", None)
            graph.erase_node(new)
            delattr(gm, str(new.target))
        gm.recompile()

    return undo
