"""Mixed precision by budget: the fewest layers to keep float so int8 meets a target.

``quantize{min_sqnr=DB}`` (and, from Python, ``metric=fn, max_drop=D``) ranks the weighted layers
by their sensitivity (:mod:`graphopt.quantization.sensitivity`, both weights and input
quantized), then keeps the ``k`` worst float for the smallest ``k`` whose graph meets the target
on held-out batches. ``k`` is searched by doubling (0, 1, 2, 4, ...) until the target is met,
then by bisection between the last two: a few probes when a handful of layers are at fault, about
``2 log2(n)`` at worst. Each probe re-plans with those layers float, takes the calibrated
parameters of that plan (groups seen before are not calibrated again) and simulates the int8
graph by fake quantization, reading each value quantized where the inserted QDQ pairs would.

Keeping a layer float keeps its weights float, but its input stays int8 as long as the unit
producing that input is int8 (an int8 kernel writes integers). So a layer that loses most to its
*input* quantization (``cause == "activations"``: an activation range stretched by an outlier
channel, say) is kept float together with the units producing its input (through pooling and
other ops that share their input's parameters); its input is then a float value again. Those
producers are listed in :attr:`Choice.producers` with the layer they serve.

The search assumes that keeping more layers float does not lower the SQNR (true in the usual
case, not guaranteed); the pass verifies its choice on the graph it really builds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.errors import OptionError, QuantizationError
from graphopt.ir import ops
from graphopt.quantization.placement import Plan, weight_axis
from graphopt.quantization.qdq import fake_quantize_dynamic
from graphopt.quantization.qparams import TensorQParams, fake_quantize, fake_quantize_per_channel
from graphopt.quantization.sensitivity import LayerSensitivity, layer_sensitivity, worst_first

#: ``fn(model_outputs, batch) -> score``, higher is better
Metric = Callable[[Any, tuple], float]
#: the parameters of a plan: activation qparams, weight scales, values calibration never reached
Params = tuple[dict[fx.Node, TensorQParams], dict[fx.Node, torch.Tensor], set[fx.Node]]


@dataclass(frozen=True)
class Target:
    """What the int8 graph must reach on held-out batches: an output SQNR of ``min_sqnr_db``
    (every output), and with a ``metric`` a score at most ``max_drop`` below the float graph's."""

    min_sqnr_db: float
    metric: Metric | None = None
    max_drop: float | None = None

    def describe(self) -> str:
        text = f"output SQNR >= {self.min_sqnr_db:g} dB"
        return text + (f" and metric drop <= {self.max_drop:g}" if self.metric is not None else "")


@dataclass(frozen=True)
class Probe:
    """One candidate: the ``float_layers`` worst layers kept float, what it reached."""

    float_layers: int
    sqnr_db: float
    drop: float | None
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"float_layers": self.float_layers, "sqnr_db": self.sqnr_db, "metric_drop": self.drop, "ok": self.ok}


@dataclass
class Choice:
    """The layers kept float (worst first, with their sensitivity) and every probe made."""

    kept: list[LayerSensitivity]
    layers: int  #: weighted layers that could be int8
    probes: list[Probe] = field(default_factory=list)
    #: units kept float so that a kept layer's input is float: producer node name -> that layer
    producers: dict[str, str] = field(default_factory=dict)

    @property
    def reached(self) -> Probe:
        return next(p for p in self.probes if p.float_layers == len(self.kept))


def score(metric: Metric, outputs: list[Any], batches: list[tuple[Any, ...]]) -> float:
    """The mean of ``metric`` over held-out batches; a metric that fails or returns no number is
    a QuantizationError saying so."""
    values = []
    for out, batch in zip(outputs, batches):
        try:
            value = float(metric(out, batch))
        except Exception as exc:
            raise QuantizationError(
                f"quantize: metric {getattr(metric, '__name__', metric)!r} failed on a held-out batch "
                f"({type(exc).__name__}: {exc}); it is called as metric(model_outputs, batch) and must return "
                "a number, higher is better"
            ) from exc
        if not math.isfinite(value):
            raise QuantizationError(f"quantize: metric {getattr(metric, '__name__', metric)!r} returned {value} "
                                    "on a held-out batch; it must return a finite number")
        values.append(value)
    return sum(values) / len(values)


def outputs_of(gm: fx.GraphModule, batches: list[tuple[Any, ...]]) -> list[Any]:
    with torch.no_grad():
        return [gm(*batch) for batch in batches]


def fewest_float(gm: fx.GraphModule, plan_keeping: Callable[[set[str]], Plan], params_of: Callable[[Plan], Params],
                 batches: list[tuple[Any, ...]], target: Target) -> Choice:
    """Choose the fewest weighted layers of ``gm`` to keep float to meet ``target`` (see the
    module docstring). ``plan_keeping(names)`` plans with those layers float, ``params_of(plan)``
    gives its parameters. Raises QuantizationError when even every ranked layer float misses
    the target with all but one layer float, naming the best reached."""
    from graphopt.quantization.evaluation import output_sqnr_of

    base = plan_keeping(set())
    qparams, scales, _ = params_of(base)
    ranking = worst_first(layer_sensitivity(gm, base, qparams, scales, batches))
    reference = outputs_of(gm, batches)
    float_score = score(target.metric, reference, batches) if target.metric is not None else None
    choice = Choice([], len(ranking))
    probes: dict[int, Probe] = {}
    feeding = {s.name: input_producers(base, s.name) if s.cause == "activations" else [] for s in ranking}

    def float_names(k: int) -> set[str]:
        return {s.name for s in ranking[:k]} | {p for s in ranking[:k] for p in feeding[s.name]}

    def probe(k: int) -> Probe:
        if k not in probes:
            plan = plan_keeping(float_names(k))
            qparams, scales, _ = params_of(plan)
            outputs = [simulate(gm, plan, qparams, scales, batch) for batch in batches]
            sqnr = output_sqnr_of(reference, outputs)
            drop = float_score - score(target.metric, outputs, batches) if target.metric is not None else None
            ok = sqnr >= target.min_sqnr_db and (drop is None or drop <= target.max_drop)
            probes[k] = Probe(k, sqnr, drop, ok)
            choice.probes.append(probes[k])
        return probes[k]

    most = max(len(ranking) - 1, 0)  # every layer float is no int8 model: not a candidate
    k = smallest_passing(most, lambda k: probe(k).ok)
    if k is None:
        best = max(probes.values(), key=lambda p: (p.sqnr_db, -(p.drop or 0.0)))
        reached = (f"the best reached is {best.sqnr_db:.1f} dB"
                   + (f" (metric drop {best.drop:.3g})" if best.drop is not None else "")
                   + f" with {best.float_layers} of {len(ranking)} layers float")
        raise QuantizationError(
            f"quantize: cannot reach {target.describe()} on the held-out batches while keeping any conv or linear "
            f"in int8: {reached}. Lower the target, skip=[...] the regions at fault, or calibrate on more "
            "representative data"
        )
    choice.kept = ranking[:k]
    kept = {s.name for s in choice.kept}
    choice.producers = {p: s.name for s in reversed(choice.kept) for p in feeding[s.name] if p not in kept}
    return choice


def input_producers(plan: Plan, layer: str) -> list[str]:
    """The units of ``plan`` whose int8 output ``layer`` (a unit's node name) reads, found
    through the units that share or fix their input's parameters (pooling, reshapes, sigmoid...):
    keep them float too and ``layer`` reads a float input."""
    by_output = {u.output: u for u in plan.units}
    unit = next((u for u in plan.units if u.node.name == layer), None)
    found: list[str] = []
    pending = list(unit.inputs) if unit is not None else []
    seen: set[fx.Node] = set()
    while pending:
        value = pending.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = by_output.get(value)
        if producer is None:  # a float op's output: quantized for int8 readers only
            continue
        found.append(producer.node.name)
        if producer.kind in ("shared", "fixed"):
            pending.extend(producer.inputs)
    return found


def smallest_passing(most: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest ``k`` in ``[0, most]`` with ``passes(k)``, assuming that once it passes it
    keeps passing; None when ``passes(most)`` fails too. Tries 0, 1, 2, 4, ... up to ``most``,
    then bisects between the last miss and the first pass: ``O(log k)`` calls."""
    if most < 0:
        return None
    low, high = -1, 0  # passes(low) is known to fail; high is the next to try
    while not passes(high):
        if high == most:
            return None
        low, high = high, min(most, max(1, 2 * high))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if passes(mid) else (mid, high)
    return high


def simulate(gm: fx.GraphModule, plan: Plan, qparams: dict[fx.Node, TensorQParams],
             scales: dict[fx.Node, torch.Tensor], batch: tuple[Any, ...]) -> Any:
    """``gm``'s outputs on ``batch`` as the graph with ``plan``'s QDQ pairs computes them: every
    reader of a quantized value reads it fake-quantized, every weighted unit its weight."""
    with torch.no_grad():
        return _Simulated(gm, plan, qparams, scales).run(*batch)


class _Simulated(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, plan: Plan, qparams: dict[fx.Node, TensorQParams],
                 scales: dict[fx.Node, torch.Tensor]):
        super().__init__(gm)
        self.plan, self.qparams = plan, qparams
        self.quantized_reads: dict[fx.Node, set[fx.Node]] = {}
        for value, qv in plan.values.items():
            if plan.dynamic or value in qparams:
                for reader in qv.readers():
                    self.quantized_reads.setdefault(reader, set()).add(value)
        self.weights = {u.node: (ops.arg(u.node, "weight"), scales[u.node])
                        for u in plan.units if u.kind == "weighted" and u.node in scales}

    def run_node(self, n: fx.Node) -> Any:
        reads, weight = self.quantized_reads.get(n, ()), self.weights.get(n)
        if not reads and weight is None:
            return super().run_node(n)
        act, wq = self.plan.config.activation, self.plan.config.weight

        def value(a: fx.Node) -> Any:
            v = self.env[a]
            if a in reads:
                v = (fake_quantize_dynamic(v, act.qmin, act.qmax, act.dtype, self.plan.config.activation_scale_min)
                     if self.plan.dynamic else fake_quantize(v, self.qparams[a]))
            if weight is not None and a is weight[0]:
                v = fake_quantize_per_channel(v, weight[1], weight_axis(n), wq.qmin, wq.qmax)
            return v

        return getattr(self, n.op)(n.target, fx.node.map_arg(n.args, value), fx.node.map_arg(n.kwargs, value))


def check_options(metric: Metric | None, max_drop: float | None) -> None:
    """``metric`` and ``max_drop`` go together; OptionError otherwise."""
    if (metric is None) != (max_drop is None):
        given, missing = ("metric", "max_drop") if metric is not None else ("max_drop", "metric")
        raise OptionError(f"pass 'quantize': option {given} needs {missing} as well (metric=fn scores model outputs, "
                          "higher is better; max_drop is how far below the float model's score int8 may fall)")
