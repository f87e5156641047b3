"""``prune-channels``: structural channel pruning. The result is a smaller dense graph, not a mask.

The coupling structure comes from :mod:`graphopt.channels`: channels that must go together
(a residual stage, a concatenation's consumers, depthwise pairs, a flatten into a linear
layer, ...) form a group, and every group is cut under one ratio. Per group:

1. **How many channels stay** (:func:`units_to_keep`). ``ratio`` is the fraction of channels
   removed; the group keeps ``channels * (1 - ratio)`` rounded to the *nearest* multiple of
   ``round_to`` (ties round up), and never fewer than one multiple of ``round_to`` nor fewer
   than ``min_channels`` (rounded up to a multiple). So 12 channels at ratio 0.5 with
   ``round_to=8`` keep 8 (6 rounds to 8), at ratio 0.2 keep 8 (9.6 rounds to 8), and a layer
   never rounds down to nothing. When the rounded count reaches the group's size the group is
   left whole (a group smaller than ``round_to`` is never cut). ``ratio=0`` cuts no live
   channel. In groups whose units span several channels (whole conv groups, group-norm
   groups) the counts are in channels and move in whole units.
2. **Which channels go.** Exactly dead channels first (:func:`graphopt.channels.dead_units`:
   zero weights in every producer; a non-zero bias is folded into the next layer's bias,
   ``b_next += act(bias) * W_next``), then the least important. Importance: ``l1`` / ``l2``
   norms of each channel's weights in every tensor of the group that scales it: output rows of
   producers, input columns of consumers, norm scales (gamma), one score per tensor, combined
   across the group with ``aggregation`` (``mean`` and ``sum`` rank alike; ``max`` keeps a
   channel the strongest tensor relies on). Input columns usually dominate: they say how much
   the next layers read the channel. ``bn_scale``: ``|gamma|``
   of the group's batch norms (network slimming), L1 where a group has none; or a callable
   ``importance(group, gm) -> scores`` (one score per unit of
   :class:`graphopt.channels.ChannelGroup`, higher is kept) from Python. Ties keep the lower
   index.
3. **The cut**: tensors are sliced into new ones under the same names (``requires_grad``
   kept, so the module can be fine-tuned), op arguments that count channels are rewritten
   (``groups``, ``num_groups``, ``normalized_shape``, split sections, view/reshape sizes).
4. **Batch-norm statistics** (``recalibrate``, only when the pass manager is given
   ``calibration_data``): batch norms downstream of a lossy cut see a different input
   distribution; their running mean and variance are re-estimated on the calibration batches
   (no labels needed). For fine-tuning, :func:`batch_norm_training` puts the graph's batch norms
   in training mode for the duration of a ``with`` block.

Per-layer ratios: ``ratios="layer1.*=0.3;layer4.*=0.6"`` (``fnmatch`` patterns on layer names,
i.e. module paths; ``;`` separates entries so the option fits in a pipeline string). A group's
ratio is that of the first pattern, in the order written, matching one of the layers whose
output channels it holds; otherwise ``ratio``. ``skip="fc;head.*"`` leaves every group touching a
matching layer (its inputs or outputs) whole. A pattern of either option that matches no layer
of the graph is an OptionError (listing layer names that exist), not a silent no-op.

Frozen groups (graph outputs, graph inputs, opaque modules, ops without a channel rule) are
left whole and reported with the reason. Figures recorded: ``groups`` (per group: layers,
channels before/after, dead channels removed, exact or not), and ``parameters``, ``macs`` and
``bytes`` before and after.

Contract: lossy with no numeric budget (pruning live channels changes outputs until the model
is fine-tuned); shapes and dtypes of the outputs never change. The output SQNR of a lossy cut
against the graph before it is measured on the example inputs and recorded (``output_sqnr_db``);
the report says "no budget" rather than "ok". ``min_sqnr=20`` sets a budget: like quantize's,
a cut below it fails (on the example inputs here, and on the manager's in-distribution
verification inputs through the contract, which the option turns into ``sqnr>=20dB``) and is
rolled back. Removing dead channels alone
(``ratio=0``) is exact, which the tests check.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Annotated, Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

import graphopt
from graphopt import channels as C
from graphopt.ir import ops, shapes
from graphopt.ir.costs import costs
from graphopt.errors import OptionError, PassError
from graphopt.ir.graph import as_input_tuple, get_attr_value, propagate_shapes, set_tensor
from graphopt.pipeline.options import Check, Range, check_patterns
from graphopt.quantization.calibration import check_batch

Importance = Callable[[C.ChannelGroup, fx.GraphModule], Any]


@graphopt.register_pass("prune-channels", contract=graphopt.Lossy(min_sqnr_db=None, budget_option="min_sqnr"),
                        after=("canonicalize",),
                        idempotent=False)
def prune_channels(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    ratio: Annotated[float, Range(ge=0, lt=1, why="the fraction of channels removed")] = 0.3,
    ratios: Annotated[str | dict[str, float], Check(
        lambda v: _ratios_ok(v), "'pattern=ratio;...' entries (or a dict {pattern: ratio}) with every ratio in [0, 1)",
    )] = "",
    importance: Literal["l1", "l2", "bn_scale"] | Importance = "l1",
    aggregation: Literal["mean", "sum", "max"] = "mean",
    round_to: Annotated[int, Range(ge=1)] = 1,
    min_channels: Annotated[int, Range(ge=1)] = 1,
    skip: str | tuple[str, ...] = "",
    prune_dead: bool = True,
    recalibrate: bool = True,
    min_sqnr: float | None = None,
) -> int:
    """Remove whole channels (dead ones exactly, then the least important) from coupled groups.

    ratio: fraction of channels removed per group; ratios: per-layer overrides
    "pattern=ratio;..."; importance: l1, l2, bn_scale or a callable(group, gm); aggregation
    across a group: mean, sum, max; round_to: kept counts are multiples of it; min_channels:
    floor per group; skip: layer patterns left whole "a;b.*"; prune_dead: remove exactly dead
    channels even at ratio 0; recalibrate: with calibration data, re-estimate the statistics
    of batch norms whose inputs changed; min_sqnr: budget in dB for the output SQNR against
    the graph before the cut (below it the pass fails and the manager rolls it back; unset: no
    budget, the SQNR is only reported). Rewrites counted: one per group cut.
    """
    per_layer = _parse_ratios(ratio, ratios)
    skipped = _parse_patterns(skip)
    score = _importance_function(importance, aggregation)
    if round_to < 1 or min_channels < 1:
        raise OptionError(f"prune-channels: round_to and min_channels must be >= 1 (got {round_to}, {min_channels})")

    if not _shapes_recorded(gm, ctx.example_inputs):
        propagate_shapes(gm, ctx.example_inputs)
    outputs_before = _output_shapes(gm)
    before = costs(gm)
    analysis = C.analyze(gm)
    layer_names = [layer.name for layer in analysis.layers]
    check_patterns(ctx.pass_name, "skip", skipped, layer_names)
    check_patterns(ctx.pass_name, "ratios", [p for p, _ in per_layer], layer_names)
    dead = C.dead_units(analysis, ctx.example_inputs) if prune_dead else {}

    drop: list[int] = []
    changed: list[fx.Node] = []  # layers whose outputs a lossy cut changes
    bias_deltas: dict[fx.Node, torch.Tensor] = {}
    report = []
    for group in analysis.groups:
        if len(group.units) < 2 or not (group.producers or group.consumers):
            continue
        if group.frozen:
            _decline(ctx, group, "; ".join(f"{reason} (at {node})" for node, reason in group.frozen[:3]))
            continue
        names = [layer.name for layer in group.producers + group.consumers]
        hit = next((p for p in skipped if any(fnmatch.fnmatchcase(n, p) for n in names)), None)
        if hit is not None:
            _decline(ctx, group, f"skipped: a layer matches skip pattern {hit!r}")
            continue
        group_ratio = _ratio_for(group, ratio, per_layer)
        dead_here = [i for i, u in enumerate(group.units.tolist()) if u in dead]
        keep = units_to_keep(len(group.units), group.width, group_ratio, round_to, min_channels, len(dead_here))
        if keep >= len(group.units):
            continue
        scores = np.asarray(score(group, gm), dtype=np.float64)
        if scores.shape != (len(group.units),):
            raise PassError(f"prune-channels: importance returned {scores.shape} scores for group {group.name}, "
                            f"which has {len(group.units)} units; return one score per unit", pass_name=ctx.pass_name)
        scores[dead_here] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))  # best first; ties keep the lower index
        removed = np.sort(order[keep:])
        exact = all(i in dead_here for i in removed.tolist())
        before_ch, after_ch = group.channels, keep * group.width
        if not ctx.may_rewrite(f"prune {group.name}: {before_ch} -> {after_ch} channels"):
            continue
        for i in removed.tolist():
            unit = int(group.units[i])
            drop.append(unit)
            for node, delta in (dead[unit].bias_deltas.items() if unit in dead else ()):
                bias_deltas[node] = bias_deltas.get(node, 0) + delta
        if not exact:
            changed += [layer.node for layer in group.consumers]
        n_dead = sum(1 for i in removed.tolist() if i in dead_here)
        report.append({"group": group.name, "layers": group.layer_names, "channels": [before_ch, after_ch],
                       "ratio": group_ratio, "dead_removed": n_dead * group.width, "exact": exact})
        ctx.note(f"{group.name}: {before_ch} -> {after_ch} channels"
                 + (f" ({n_dead * group.width} dead, removed exactly)" if n_dead else "")
                 + ("" if exact else f" at ratio {group_ratio:g}"))

    reference_outputs = None
    if drop and changed:  # a lossy cut: measure what it costs on the example inputs
        from graphopt import verify

        reference_outputs = verify.run(gm, ctx.example_inputs)
    if drop:
        C.prune(gm, analysis, drop, bias_deltas)
        propagate_shapes(gm, ctx.example_inputs)
        if _output_shapes(gm) != outputs_before:
            raise PassError(f"prune-channels changed the output shapes {outputs_before} -> {_output_shapes(gm)}: "
                            "a bug in the channel analysis; please report it with the model",
                            pass_name=ctx.pass_name)
        if recalibrate and changed and ctx.calibration_data is not None:
            ctx.record("batch_norms_recalibrated", _recalibrate_batch_norms(gm, ctx.calibration_data, changed,
                                                                            ctx.example_inputs))
    if reference_outputs is not None:
        _check_output_sqnr(gm, ctx, reference_outputs, min_sqnr)
    after = costs(gm)
    ctx.record("groups", report)
    for key in ("parameters", "macs", "bytes"):
        ctx.record(key, [getattr(before, key), getattr(after, key)])
    if drop:
        ratios_now = after.ratio(before)
        ctx.note(f"model: parameters {before.parameters} -> {after.parameters} ({ratios_now['parameters']:.2f}x), "
                 f"MACs {before.macs} -> {after.macs} ({ratios_now['macs']:.2f}x), "
                 f"bytes {before.bytes} -> {after.bytes}")
    return len(report)


def _check_output_sqnr(gm: fx.GraphModule, ctx: graphopt.PassContext, reference_outputs: list[torch.Tensor],
                       min_sqnr: float | None) -> None:
    """Record the output SQNR of the cut graph against the graph before it (on the example
    inputs) and fail, like quantize's budget, when it is below ``min_sqnr``."""
    from graphopt import verify

    outputs = verify.run(gm, ctx.example_inputs)
    sqnr = [verify.sqnr_db(r, o) for r, o in zip(reference_outputs, outputs) if r.is_floating_point()]
    ctx.record("output_sqnr_db", sqnr)
    worst = min(sqnr, default=math.inf)
    if min_sqnr is not None and worst < min_sqnr:
        raise PassError(f"prune-channels: output SQNR {worst:.1f} dB on the example inputs is below the min_sqnr "
                        f"budget of {min_sqnr:g} dB. Prune less (a lower ratio, per-layer ratios=..., skip=...), "
                        "or lower min_sqnr", pass_name=ctx.pass_name)
    ctx.note(f"output SQNR {worst:.1f} dB on the example inputs against the graph before the cut; "
             + (f"budget min_sqnr={min_sqnr:g} dB" if min_sqnr is not None
                else "no budget (set min_sqnr=... to roll back cuts that lose more)"))


@contextlib.contextmanager
def batch_norm_training(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Fine-tune a pruned graph module with its batch norms in training mode.

    Canonical graphs call ``F.batch_norm(..., training=False)``: inference statistics are baked
    into the call, so ``gm.train()`` changes nothing. Inside this block the inference batch norms
    normalize with batch statistics and update their running statistics (in place, like
    ``nn.BatchNorm2d`` in train mode), which lets them re-learn the statistics that pruning
    upstream channels changed; on exit they are inference calls again::

        with batch_norm_training(gm):
            for x, y in loader:
                ...  # forward, loss, backward, step
    """
    nodes = [n for n in gm.graph.nodes if ops.is_op(n, "batch_norm") and ops.arg(n, "training") is False
             and ops.arg(n, "running_mean") is not None]
    for node in nodes:
        ops.set_arg(node, "training", True)
    gm.recompile()
    try:
        yield gm
    finally:
        for node in nodes:
            ops.set_arg(node, "training", False)
        gm.recompile()


def units_to_keep(units: int, width: int, ratio: float, round_to: int = 1, min_channels: int = 1,
                  dead: int = 0) -> int:
    """Units a group of ``units`` units of ``width`` channels keeps (see the module docstring).

    >>> units_to_keep(12, 1, 0.5, round_to=8), units_to_keep(12, 1, 0.2, round_to=8)
    (8, 8)
    >>> units_to_keep(6, 1, 0.9, round_to=8)   # smaller than round_to: left whole
    6
    """
    step = round_to // math.gcd(round_to, width)  # units per multiple of round_to channels
    floor = _ceil_to(max(1, math.ceil(min_channels / width)), step)
    keep = units
    if ratio > 0:
        keep = max(math.floor(units * (1 - ratio) / step + 0.5) * step, floor)
    if dead:
        keep = min(keep, max(_ceil_to(units - dead, step), floor))
    return min(keep, units)


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def _recalibrate_batch_norms(gm: fx.GraphModule, calibration_data: Any, changed: list[fx.Node],
                             example_inputs: tuple[Any, ...] | None = None) -> int:
    """Re-estimate running mean/var of the inference batch norms downstream of ``changed``.

    Pruning live input channels shifts the distribution every later batch norm sees, and its
    stored statistics go stale. Over the calibration batches each such batch norm normalizes
    with batch statistics (as ``nn.BatchNorm`` in train mode does while statistics are
    re-estimated) and accumulates its input's per-channel mean and variance; the results
    (unbiased variance, like ``running_var``) become new buffers. No labels are needed.
    """
    downstream, stack = set(), list(changed)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)
    readers = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[str(node.target)] = readers.get(str(node.target), 0) + 1
    targets = [n for n in gm.graph.nodes if n in downstream and ops.is_op(n, "batch_norm")
               and ops.arg(n, "training") is False
               and all(isinstance(ops.arg(n, k), fx.Node) and ops.arg(n, k).op == "get_attr"
                       and readers[str(ops.arg(n, k).target)] == 1 for k in ("running_mean", "running_var"))]
    if not targets:
        return 0
    sums: dict[fx.Node, list[Any]] = {n: [0, 0.0, 0.0] for n in targets}  # count, sum, sum of squares

    class Estimator(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n not in sums:
                return super().run_node(n)
            args, _ = self.fetch_args_kwargs_from_env(n)
            x, weight, bias, eps = args[0], args[3], args[4], args[7]
            dims = [0, *range(2, x.dim())]
            acc = sums[n]
            acc[0] += x.numel() // x.shape[1]
            acc[1] = acc[1] + x.sum(dims, dtype=torch.float64)
            acc[2] = acc[2] + (x.double() ** 2).sum(dims)
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)

    estimator = Estimator(gm)
    with torch.no_grad():
        for i, batch in enumerate(calibration_data):  # a bad batch: CalibrationDataError naming it
            estimator.run(*(as_input_tuple(batch) if example_inputs is None
                            else check_batch(example_inputs, batch, i, dynamic=shapes.dynamic_dims_of_inputs(gm))))
    for node, (count, total, squares) in sums.items():
        if count < 2:
            continue
        mean = total / count
        var = (squares / count - mean ** 2).clamp_min(0) * (count / (count - 1))
        for key, value in (("running_mean", mean), ("running_var", var)):
            old = get_attr_value(gm, ops.arg(node, key))
            set_tensor(gm, str(ops.arg(node, key).target), value.to(old.dtype))
    return len(targets)


def _decline(ctx: graphopt.PassContext, group: C.ChannelGroup, reason: str) -> None:
    layers = group.producers or group.consumers
    ctx.decline(layers[0].node, f"channels of {group.name} ({group.channels}) left whole: {reason}")


def _shapes_recorded(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> bool:
    """Whether shape metadata is present for these inputs (the manager keeps it fresh)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, inputs):
        tm = node.meta.get("tensor_meta")
        if isinstance(value, torch.Tensor) and (tm is None or tuple(tm.shape) != tuple(value.shape)):
            return False
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if ops.spec_of(n) is not None)


def _output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    out = []
    for node in gm.graph.output_node().all_input_nodes:
        tm = node.meta.get("tensor_meta")
        out.append(tuple(tm.shape) if hasattr(tm, "shape") else None)
    return out


# --------------------------------------------------------------------------- options


def _parse_ratios(ratio: float, ratios: str | dict[str, float]) -> list[tuple[str, float]]:
    _check_ratio("ratio", ratio)
    if isinstance(ratios, dict):
        entries = list(ratios.items())
    else:
        entries = []
        for item in (s.strip() for s in str(ratios).split(";")):
            if not item:
                continue
            pattern, sep, value = item.rpartition("=")
            if not sep or not pattern.strip():
                raise OptionError(f"prune-channels{{ratios=...}}: entry {item!r} needs the form pattern=ratio, "
                                  "entries separated by ';' (e.g. ratios=layer1.*=0.3;layer4.*=0.6)")
            try:
                entries.append((pattern.strip(), float(value)))
            except ValueError:
                raise OptionError(f"prune-channels{{ratios=...}}: {value!r} in {item!r} is not a number") from None
    for pattern, value in entries:
        _check_ratio(f"ratios[{pattern}]", value)
    return [(p, float(v)) for p, v in entries]


def _ratios_ok(ratios: str | dict[str, float]) -> bool:
    """The ``ratios`` check run when the pipeline is built: its OptionError says what is wrong."""
    _parse_ratios(0.0, ratios)
    return True


def _check_ratio(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise OptionError(f"prune-channels: {what} must be in [0, 1) (the fraction of channels removed), got {value!r}")


def _parse_patterns(skip: str | tuple[str, ...]) -> list[str]:
    items = skip.split(";") if isinstance(skip, str) else list(skip)
    return [s.strip() for s in items if s and s.strip()]


def _ratio_for(group: C.ChannelGroup, ratio: float, per_layer: list[tuple[str, float]]) -> float:
    for pattern, value in per_layer:
        if any(fnmatch.fnmatchcase(name, pattern) for name in group.layer_names):
            return value
    return ratio


# --------------------------------------------------------------------------- importance


_AGGREGATE = {"mean": np.mean, "sum": np.sum, "max": np.max}


def _importance_function(importance: Any, aggregation: str) -> Callable[[C.ChannelGroup, fx.GraphModule], Any]:
    if aggregation not in _AGGREGATE:
        raise OptionError(f"prune-channels: aggregation must be one of {', '.join(_AGGREGATE)}, got {aggregation!r}")
    if callable(importance):
        return importance
    if importance not in ("l1", "l2", "bn_scale"):
        raise OptionError(f"prune-channels: importance must be l1, l2, bn_scale or a callable(group, gm) -> "
                          f"scores, got {importance!r}")
    reduce = _AGGREGATE[aggregation]

    def score(group: C.ChannelGroup, gm: fx.GraphModule) -> np.ndarray:
        if importance == "bn_scale":
            per_dim = _bn_scores(group, gm)
            if per_dim:
                return reduce(np.stack(per_dim), axis=0)
        per_dim = _magnitude_scores(group, gm, squared=importance == "l2")
        if not per_dim:  # a group without conv/linear weights: every unit alike, lower index kept
            return np.zeros(len(group.units))
        return reduce(np.stack(per_dim), axis=0)

    return score


def _per_unit(tensor: torch.Tensor, dim: C.ParamDim, squared: bool) -> np.ndarray:
    """L1 (or L2) norm of each unit's slices of ``tensor`` along ``dim``."""
    t = tensor.detach()
    others = [d for d in range(t.dim()) if d != dim.dim]
    norms = torch.linalg.vector_norm(t, 2 if squared else 1, dim=others) if others else t.abs()
    per_index = norms.double().numpy()
    if squared:
        return np.sqrt((per_index ** 2)[dim.positions].sum(1))
    return per_index[dim.positions].sum(1)


def _norm_scales(gm: fx.GraphModule, kinds: tuple[str, ...]) -> set[str]:
    """Attribute names of the scale (gamma) of every norm op of the given kinds."""
    names = set()
    for node in gm.graph.nodes:
        weight = ops.arg(node, "weight") if ops.is_op(node, *kinds) else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            names.add(str(weight.target))
    return names


def _magnitude_scores(group: C.ChannelGroup, gm: fx.GraphModule, squared: bool) -> list[np.ndarray]:
    wanted = {(name, 0) for name in _norm_scales(gm, ("batch_norm", "group_norm", "layer_norm"))}
    for layer in group.producers + group.consumers:
        if layer.weight.op == "get_attr":
            wanted |= {(str(layer.weight.target), layer.out_dim), (str(layer.weight.target), layer.in_dim)}
    return [_per_unit(get_attr_value(gm, d.names[0]), d, squared)
            for d in group.dims if any((name, d.dim) in wanted for name in d.names)]


def _bn_scores(group: C.ChannelGroup, gm: fx.GraphModule) -> list[np.ndarray]:
    gammas = _norm_scales(gm, ("batch_norm",))
    return [_per_unit(get_attr_value(gm, d.names[0]), d, squared=False)
            for d in group.dims if d.dim == 0 and gammas.intersection(d.names)]
