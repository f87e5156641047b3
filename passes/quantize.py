"""``quantize``: int8 quantization as quantize/dequantize pairs in the graph; static (calibrated)
by default, dynamic for linear layers with ``mode=dynamic``.

What it does (``mode=static``), in order:

1. Plans which ops run in int8 from a backend configuration (``config=x86`` by default: uint8
   activations, 7-bit symmetric per-channel int8 weights, right for ONNX Runtime's U8S8 kernels
   and torch's x86 engine on CPUs without VNNI; ``config=xnnpack`` for ARM phones). Fusion
   units marked by ``fuse-conv-bn-relu`` stay whole. See ``graphopt.quantization.placement``.
2. Calibrates: runs the float graph on ``ctx.calibration_data`` (or synthesized inputs, with a
   warning) and picks each activation range with the chosen method (``auto`` by default: per
   tensor the least-error range of ``minmax``, ``histogram``, ``mse`` and ``entropy``; or one
   of ``minmax``, ``moving_average``, ``histogram`` with ``percentile``, ``mse``, ``entropy``:
   KL-divergence threshold, see ``graphopt.quantization.observers``). A named method's range
   with over 4x min-max's expected squared error falls back to min-max, said in the report
   (``graphopt.quantization.range_choice``). NaN/inf stops it with a QuantizationError naming
   the value.
3. Inserts ``quantize_per_tensor``/``dequantize_per_tensor`` after every int8 value (one
   dequantize per consumer) and ``quantize_per_channel``/``dequantize_per_channel`` on each
   weight (axis 0, axis 1 for transposed convs). Biases stay float: backends store them as
   int32 at scale ``s_in * s_w``, and weight scales are raised where that would overflow.
   ``fold-weight-quantization`` then stores the weights as int8 constants.
4. Measures output SQNR against the float graph on held-out batches and refuses (rolls back)
   below the contract's budget, naming the layers that lose the most.

``mode=dynamic`` quantizes linear layers only (the ops runtimes have dynamic int8 kernels for):
weights int8 per-channel symmetric as above, each activation input quantized at run time per
tensor (every batch gets its own range, from ``choose_qparams``; see
``graphopt.quantization.qdq``), outputs float. No calibration runs, so no calibration data is
needed (and none is warned about); given batches only measure the error. Lowered, it becomes
DynamicQuantizeLinear + MatMulInteger in ONNX (fused by ONNX Runtime into
DynamicQuantizeMatMul) and ``quantized::linear_dynamic`` in torchscript-mobile. Right for
models dominated by linear layers whose activation ranges vary from input to input
(transformers, RNN heads); convolutions stay float.

Options: ``mode`` (static | dynamic), ``config``, ``calibration`` (static only); ``skip`` (glob
patterns on node names, module paths or weight names) and ``keep_float_worst=N`` (the N weighted
layers with the worst isolated SQNR) keep layers float (a skip pattern matching nothing is an
OptionError); ``per_layer_report=true`` records per-layer SQNR in the report (isolated, cumulative,
and the output SQNR with only the layer's weights, only its input, or both in int8: see
``graphopt.quantization.sensitivity``). ``min_sqnr=DB`` keeps the fewest layers float to reach DB dB
output SQNR, and raises the budget below to DB; from Python, ``metric=fn`` (``fn(model_outputs,
batch) -> score``, higher is better) with ``max_drop=D`` keeps layers float until the score is
within D of the float graph's (see ``graphopt.quantization.mixed_precision``). Calibration
batches (held-out ones included) must match the example inputs in dtype and in shape beyond dim
0 and hold no NaN/inf; a batch that does not is a CalibrationDataError (an InputError) naming it.

Budget (both modes): outputs must keep an SQNR of at least 15 dB (noise power 3% of the signal,
about 18% RMS relative error) on in-distribution held-out inputs. Measured int8 SQNR with good
calibration is 25-35 dB on trained CNNs and 18-25 dB on randomly initialized ResNet/MobileNet shapes; under
15 dB top-1 agreement with float drops visibly, which is a quantization bug or a layer that
must stay float, not something to ship silently.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from collections import Counter
from typing import Annotated, Any, Callable, Literal

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import ops, shapes
from graphopt.errors import QuantizationError
from graphopt.ir.graph import add_constant, copy_provenance, get_attr_value, provenance
from graphopt.quantization import calibration as calib
from graphopt.quantization.calibration import Calibrator
from graphopt.quantization import evaluation, kernels, mixed_precision, qdq, range_choice
from graphopt.pipeline.options import OneOf, Range, check_patterns
from graphopt.quantization.configs import BackendConfig, available_configs, get_config
from graphopt.quantization.sensitivity import LayerSensitivity, layer_sensitivity
from graphopt.quantization.placement import Plan, Unit, plan_dynamic_quantization, plan_quantization, weight_axis
from graphopt.quantization.qparams import TensorQParams, symmetric_per_channel_scales

#: the share of a layer's held-out outputs outside its calibrated range from which the budget
#: error blames the calibration data's coverage rather than the ranges' resolution
CLIPPED_SHARE = 0.01

CONTRACT = graphopt.Lossy(min_sqnr_db=15.0, budget_option="min_sqnr", budget_option_raises_only=True)

@graphopt.register_pass("quantize", contract=CONTRACT, after=("fuse-conv-bn-relu",))
def quantize(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    mode: Literal["static", "dynamic"] = "static",
    config: Annotated[str, OneOf(available_configs, why="registered quantization configs")] = "x86",
    calibration: Literal["auto", "minmax", "moving_average", "histogram", "mse", "entropy"] = "auto",
    percentile: Annotated[float, Range(gt=50, le=100, why="percent of values inside the range")] = 99.99,
    bins: Annotated[int, Range(ge=1)] = 2048,
    max_calibration_batches: Annotated[int, Range(ge=1)] = 64,
    held_out_batches: Annotated[int, Range(ge=0)] = 1,
    skip: tuple[str, ...] = (),
    keep_float_worst: Annotated[int, Range(ge=0)] = 0,
    per_layer_report: bool = False,
    min_sqnr: Annotated[float, Range(gt=0, why="output SQNR in dB")] | None = None,
    metric: Callable[[Any, tuple], float] | None = None,
    max_drop: Annotated[float, Range(ge=0, why="score below the float model's")] | None = None,
) -> int:
    """Int8 quantization: calibrated QDQ pairs, or linears quantizing inputs at run time (mode=dynamic).

    Static: calibrate, then insert quantize/dequantize pairs (QDQ). Dynamic: int8 linear layers
    whose inputs are quantized at run time, per tensor; no calibration.

    Options: mode (static | dynamic), config (x86 | xnnpack), calibration (auto | minmax |
    moving_average | histogram | mse | entropy; static only), percentile (histogram), bins (the
    histogram every method's range is checked on), skip (glob patterns), keep_float_worst (N layers),
    per_layer_report, max_calibration_batches, held_out_batches; min_sqnr (dB: keep the fewest
    layers float to reach it), metric + max_drop (Python only: fn(outputs, batch) -> score).
    """
    if qdq.has_qdq(gm):
        ctx.note("the graph already holds quantize/dequantize nodes; left as it is")
        return 0
    check_patterns(ctx.pass_name, "skip", skip, _layer_names(gm))
    mixed_precision.check_options(metric, max_drop)
    floor = max(CONTRACT.min_sqnr_db, min_sqnr or 0.0)
    if min_sqnr is not None and min_sqnr < CONTRACT.min_sqnr_db:
        ctx.note(f"min_sqnr={min_sqnr:g} dB is below the pass's {CONTRACT.min_sqnr_db:g} dB budget, which still holds")
    cfg = get_config(config)
    if mode == "dynamic":
        data = calib.measurement_data(ctx.example_inputs, ctx.calibration_data, batches=held_out_batches,
                                      dynamic=shapes.dynamic_dims_of_inputs(gm))
        measure: Calibrator | _WeightScales = _WeightScales(gm, cfg)
        planner = plan_dynamic_quantization
    else:
        data = calib.collect(ctx.example_inputs, ctx.calibration_data, max_batches=max_calibration_batches,
                             held_out=held_out_batches, dynamic=shapes.dynamic_dims_of_inputs(gm))
        measure = Calibrator(gm, cfg, calibration, bins, percentile, data.batches)
        planner = plan_quantization
    veto = _Veto(ctx, skip)

    if keep_float_worst > 0:
        probe = planner(gm, cfg, veto.without_budget, lambda n, r: None)
        params, scales, _ = measure.params(probe)
        isolated = evaluation.isolated_layer_sqnr(gm, probe, params, scales, data.held_out)
        worst_first = sorted(isolated, key=isolated.get)[:keep_float_worst]
        veto.kept_float = {name: f"one of the {keep_float_worst} worst layers (isolated SQNR {isolated[name]:.1f} dB)"
                           for name in worst_first}
    if min_sqnr is not None or metric is not None:
        target = mixed_precision.Target(floor, metric, max_drop)
        choice = mixed_precision.fewest_float(gm, veto.keeping_float(planner, gm, cfg), measure.params,
                                              data.held_out, target)
        veto.kept_float.update({s.name: f"needed for {target.describe()} (alone in int8 it leaves "
                                        f"{s.sqnr_db:.1f} dB at the outputs; weights {s.weight_sqnr_db:.1f}, "
                                        f"input {s.activation_sqnr_db:.1f})" for s in choice.kept})
        veto.kept_float.update({p: f"its output feeds {layer}, kept float for {target.describe()} because its "
                                   "input's int8 range loses the most; an int8 producer would hand it integers"
                                   for p, layer in choice.producers.items()})
        ctx.record("mixed_precision", {"target": target.describe(), "layers": choice.layers,
                                       "probes": [p.to_dict() for p in choice.probes]})
        ctx.note(f"mixed precision: {len(choice.kept)} of {choice.layers} layers kept float for {target.describe()} "
                 f"(simulated: {choice.reached.sqnr_db:.1f} dB; {len(choice.probes)} plans tried)")

    plan = planner(gm, cfg, veto, ctx.decline)
    params, scales, missing = measure.params(plan)
    if missing:  # values no calibration batch reached: their units stay float
        veto.no_data = missing
        plan = planner(gm, cfg, veto, ctx.decline)
        params, scales, _ = measure.params(plan)
    if not plan.units:
        where = " in dynamic mode (linear layers only)" if plan.dynamic else ""
        ctx.note(f"nothing to quantize under config {cfg.name}{where}")
        return 0

    isolated = evaluation.isolated_layer_sqnr(gm, plan, params, scales, data.held_out)
    sensitivity = {s.name: s for s in layer_sensitivity(gm, plan, params, scales, data.held_out)} \
        if per_layer_report else {}
    reference = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    _insert(gm, plan, params, scales)
    gm.graph.lint()
    gm.recompile()

    sqnr = evaluation.output_sqnr(reference, gm, data.held_out)
    _report(ctx, cfg, plan, data, calibration, percentile, sqnr, measure.raised, veto)
    if isinstance(measure, Calibrator):
        range_choice.report(ctx, calibration, measure.choices)
    if per_layer_report:
        cumulative = evaluation.cumulative_layer_sqnr(reference, gm, plan, data.held_out)
        ctx.record("per_layer", [
            {"layer": u.node.name, "op": u.op, "provenance": provenance(u.node),
             "isolated_sqnr_db": isolated.get(u.node.name), "cumulative_sqnr_db": cumulative[u.node.name],
             **_sensitivity_row(sensitivity.get(u.node.name))}
            for u in plan.units if u.kind != "shared"
        ])
    if metric is not None:
        drop = (mixed_precision.score(metric, mixed_precision.outputs_of(reference, data.held_out), data.held_out)
                - mixed_precision.score(metric, mixed_precision.outputs_of(gm, data.held_out), data.held_out))
        ctx.record("metric_drop", drop)
        if drop > max_drop:
            raise QuantizationError(f"int8 loses {drop:.3g} of the metric on held-out inputs, more than max_drop="
                                    f"{max_drop:g}; the layers kept float were chosen on a simulation that met it. "
                                    "Allow a larger drop, or skip=[...] more layers")
    worst = min(sqnr) if sqnr else math.inf
    if worst < floor:
        worst_layers = sorted(isolated, key=isolated.get)[:3]
        where = {u.node.name: provenance(u.node) for u in plan.units}
        culprits = ", ".join(f"{where.get(n, n)} ({isolated[n]:.1f} dB)" for n in worst_layers)
        # the layer losing the most, when its held-out outputs overflow its range: a few values past it are
        # normal, a share this large is what lost the budget (a layer further down the list is not the cause)
        clipped = {} if plan.dynamic or not worst_layers else \
            evaluation.out_of_range(reference, plan, params, data.held_out, {worst_layers[0]})
        clipped = {n: share for n, share in clipped.items() if share >= CLIPPED_SHARE}
        if clipped:  # narrower ranges (mse, entropy) would clip more: the data must cover these values
            name = worst_layers[0]
            advice = (f"{clipped[name]:.1%} of {where.get(name, name)}'s held-out outputs fall outside the range "
                      f"calibrated for it, and int8 clips them: pass more, or more representative, calibration "
                      f"batches, or keep it float with skip=[{where.get(name, name)!r}]")
        elif plan.dynamic:
            advice = ("A range chosen at run time follows each batch's largest value, so outliers coarsen every "
                      "step: try skip=[...] or keep_float_worst=N, or mode=static with calibration=entropy or mse")
        else:
            advice = ("Try min_sqnr=DB (keeps the fewest layers float that reach it), the mobile-int8-accurate "
                      "preset (equalization and bias correction), more representative calibration data, or skip=[...]")
        raise QuantizationError(
            f"int8 output SQNR {worst:.1f} dB on held-out inputs is below the {floor:g} dB budget"
            f"{' (min_sqnr)' if min_sqnr is not None and min_sqnr > CONTRACT.min_sqnr_db else ''}"
            f"{' (mode=dynamic)' if plan.dynamic else ''}; layers losing the most alone: "
            f"{culprits or 'none measured'}. {advice}"
        )
    return len(plan.units)


# ------------------------------------------------------------------------- vetoes


def _layer_names(gm: fx.GraphModule) -> list[str]:
    """Every name a skip pattern may match (see ``_Veto``): node names, module paths, the names
    of folded nodes, weight names and their modules. Module paths of weighted layers come first
    (they are what the error message lists)."""
    first, rest = [], []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            rest += [str(node.target), str(node.target).rpartition(".")[0]]
        elif node.op not in ("placeholder", "output"):
            names = [provenance(node), node.name, *node.meta.get("folded_from", ())]
            (first if ops.is_op(node, *_WEIGHTED_OPS) else rest).extend(names)
    return [n for n in dict.fromkeys(first + rest) if n]


_WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")



class _Veto:
    """Why a unit stays float: skip patterns, worst layers kept float, values calibration never
    reached, and the rewrite budget (asked once per node so re-planning does not re-ask)."""

    def __init__(self, ctx: graphopt.PassContext, skip: tuple[str, ...]):
        self.ctx, self.skip = ctx, tuple(skip)
        self.kept_float: dict[str, str] = {}  # node name -> why
        self.no_data: set[fx.Node] = set()
        self.granted: dict[fx.Node, bool] = {}

    def without_budget(self, unit: Unit) -> str | None:
        names = [unit.node.name, provenance(unit.node), *unit.node.meta.get("folded_from", ())]
        weight = unit.node.args[1] if unit.kind == "weighted" else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            names += [str(weight.target), str(weight.target).rpartition(".")[0]]
        for pattern in self.skip:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names if n):
                return f"skipped by pattern {pattern!r}"
        if unit.node.name in self.kept_float:
            return f"kept float: {self.kept_float[unit.node.name]}"
        untouched = [v.name for v in (unit.output, *unit.inputs) if v in self.no_data]
        if untouched:
            return f"no calibration data reached {', '.join(untouched)}; left float"
        return None

    def keeping_float(self, planner, gm: fx.GraphModule, cfg: BackendConfig):
        """``names -> plan`` with those layers float as well, for the mixed-precision search."""
        def plan(names: set[str]) -> Plan:
            return planner(gm, cfg, lambda u: "kept float" if u.node.name in names else self.without_budget(u),
                           lambda n, r: None)
        return plan

    def __call__(self, unit: Unit) -> str | None:
        reason = self.without_budget(unit)
        if reason is not None:
            return reason
        if unit.node not in self.granted:
            self.granted[unit.node] = self.ctx.may_rewrite(f"quantize {unit.kind} {unit.node.name} ({unit.op})")
        return None if self.granted[unit.node] else "rewrite budget exhausted (bisection)"


# ------------------------------------------------------------------------- dynamic mode


class _WeightScales:
    """Dynamic mode's parameters: weight scales only. Activations get theirs at run time, and
    every runtime's dynamic kernel adds the bias in float after scaling the int32 accumulator
    back, so there is no range to calibrate and no int32 bias to guard."""

    raised = 0

    def __init__(self, gm: fx.GraphModule, cfg: BackendConfig):
        self.gm, self.cfg = gm, cfg

    def params(self, plan: Plan) -> tuple[dict[fx.Node, TensorQParams], dict[fx.Node, torch.Tensor], set[fx.Node]]:
        w = self.cfg.weight
        scales = {
            unit.node: symmetric_per_channel_scales(get_attr_value(self.gm, ops.arg(unit.node, "weight")),
                                                    weight_axis(unit.node), w.qmax, self.cfg.weight_scale_min)
            for unit in plan.units if unit.kind == "weighted"
        }
        return {}, scales, set()


# ------------------------------------------------------------------------- insertion


def _insert(gm: fx.GraphModule, plan: Plan, params: dict[fx.Node, TensorQParams],
            scales: dict[fx.Node, torch.Tensor]) -> None:
    """Put the QDQ nodes of ``plan`` into ``gm``."""
    graph = gm.graph
    act = plan.config.activation
    for value, qv in plan.values.items():
        readers = qv.readers()
        if plan.dynamic:
            for reader in readers:
                chain = qdq.insert_dynamic_qdq(graph, value, reader, act.qmin, act.qmax, act.dtype,
                                               plan.config.activation_scale_min)
                for new in chain:
                    copy_provenance(new, value)
                reader.replace_input_with(value, chain[-1])
            continue
        q = qdq.insert_quantize(graph, value, params[value])
        copy_provenance(q, value)
        for reader in readers:
            dq = qdq.insert_dequantize(graph, q, before=reader)
            copy_provenance(dq, value)
            reader.replace_input_with(value, dq)

    attrs: dict[tuple[str, bytes], tuple[str, str]] = {}
    wq = plan.config.weight
    for unit in plan.units:
        if unit.kind != "weighted":
            continue
        node = unit.node
        w_node = ops.arg(node, "weight")
        s = scales[node]
        key = (str(w_node.target), s.numpy().tobytes())
        if key not in attrs:
            axis_len = s.numel()
            attrs[key] = (add_constant(gm, f"{w_node.target}_scale", s),
                          add_constant(gm, f"{w_node.target}_zero_point", torch.zeros(axis_len, dtype=wq.dtype)))
        scale_name, zp_name = attrs[key]
        axis = weight_axis(node)
        with graph.inserting_before(node):
            s_node, z_node = graph.get_attr(scale_name), graph.get_attr(zp_name)
            q = graph.call_function(qdq.QUANTIZE_PER_CHANNEL, (w_node, s_node, z_node, axis, wq.qmin, wq.qmax, wq.dtype))
            dq = graph.call_function(qdq.DEQUANTIZE_PER_CHANNEL, (q, s_node, z_node, axis, wq.qmin, wq.qmax, wq.dtype))
        for new in (s_node, z_node, q, dq):
            copy_provenance(new, w_node)
        ops.set_arg(node, "weight", dq)


# ------------------------------------------------------------------------- report


def _sensitivity_row(s: LayerSensitivity | None) -> dict[str, float | None]:
    """The per-layer report's sensitivity columns: output SQNR with only the layer's weights,
    only its input, or both in int8 (weighted layers; None for the others)."""
    return {"weight_sqnr_db": s.weight_sqnr_db if s else None,
            "activation_sqnr_db": s.activation_sqnr_db if s else None,
            "sensitivity_sqnr_db": s.sqnr_db if s else None}


def _report(ctx: graphopt.PassContext, cfg: BackendConfig, plan: Plan, data: calib.CalibrationData,
            method: str, percentile: float, sqnr: list[float], raised: int, veto: _Veto) -> None:
    ctx.note(cfg.summary())
    if not kernels.has_vnni() and cfg.weight.qmax > kernels.NON_VNNI_WEIGHT_LIMIT:
        ctx.note(f"this CPU has no VNNI: x86 int8 kernels (ONNX Runtime, torch x86) saturate on weights beyond "
                 f"+-{kernels.NON_VNNI_WEIGHT_LIMIT}; run this graph on ARM/XNNPACK or quantize with config=x86 here")
    if plan.dynamic:
        ctx.note(f"mode dynamic: linear layers only, activation ranges chosen at run time per tensor and batch; "
                 f"{data.description}")
    else:
        how = f"{method} (percentile {percentile:g})" if method == "histogram" else method
        ctx.note(f"calibration: {how} over {data.description}")
    if raised:
        ctx.note(f"{raised} weight channel(s) got a larger scale so their bias fits int32 at s_in * s_w")
    ctx.record("mode", "dynamic" if plan.dynamic else "static")
    ctx.record("config", cfg.name)
    ctx.record("units_by_op", dict(Counter(u.op for u in plan.units)))
    ctx.record("quantized_values", len(plan.values))
    ctx.record("held_out_sqnr_db", sqnr)
    ctx.record("bias_guard_raised_channels", raised)
    if veto.kept_float:
        ctx.record("kept_float", dict(veto.kept_float))
    weighted = [u for u in plan.units if u.kind == "weighted"]
    graph_nodes = plan.units[0].node.graph.nodes if plan.units else ()
    float_weighted = [n for n in graph_nodes if n.name in veto.kept_float and ops.is_op(n, *_WEIGHTED_OPS)]
    ctx.record("float_fraction", len(float_weighted) / max(len(weighted) + len(float_weighted), 1))
