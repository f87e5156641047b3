"""How much quantization costs, measured on held-out inputs: per model output and per layer.

- *Output SQNR*: ``10 log10(sum y^2 / sum (y - y_q)^2)`` of each model output, int8 graph
  against the float graph.
- *Isolated layer SQNR*: one weighted unit quantized alone (its input, weight and output
  fake-quantized, everything before it in float; in a dynamic plan the input is quantized with
  parameters chosen from itself and the output stays float). It ranks layers by the error they
  add, which is what ``keep_float_worst`` uses.
- *Cumulative layer SQNR*: the unit's output value in the int8 graph against the float graph,
  i.e. every error upstream included. Where it drops sharply is where accuracy is lost.
- *Out of range*: the share of a unit's float output values on held-out inputs that fall
  outside the range calibrated for it, which int8 clips. A layer losing for this reason needs
  calibration data that covers its values, not a calibration method that narrows ranges.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from graphopt.verify import sqnr_from_powers
from graphopt.quantization.placement import Plan, Unit, weight_axis
from graphopt.quantization.qdq import fake_quantize_dynamic
from graphopt.quantization.qparams import TensorQParams, fake_quantize, fake_quantize_per_channel


class _Recording(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


def _accumulate(sums: dict[str, list[float]], key: str, ref: torch.Tensor, out: torch.Tensor) -> None:
    r, o = ref.detach().double(), out.detach().double()
    sums[key][0] += float((r * r).sum())
    sums[key][1] += float(((r - o) ** 2).sum())


def isolated_layer_sqnr(gm: fx.GraphModule, plan: Plan, qparams: dict[fx.Node, TensorQParams],
                        weight_scales: dict[fx.Node, torch.Tensor], batches: list[tuple[Any, ...]]) -> dict[str, float]:
    """Isolated SQNR (dB) of every weighted unit, by compute-node name, on the float graph."""
    units = [u for u in plan.units if u.kind == "weighted" and u.node in weight_scales]
    needed = {n.name for u in units for n in (u.node, u.output, *u.inputs, *u.node.all_input_nodes)}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    with torch.no_grad():
        for batch in batches:
            rec = _Recording(gm, needed)
            rec.run(*batch)
            for unit in units:
                _accumulate(sums, unit.node.name, rec.values[unit.output.name],
                            _quantized_unit_output(unit, rec.values, qparams, weight_scales[unit.node], plan))
    return {name: sqnr_from_powers(*s) for name, s in sums.items()}


def _quantized_unit_output(unit: Unit, values: dict[str, Any], qparams: dict[fx.Node, TensorQParams],
                           scales: torch.Tensor, plan: Plan) -> torch.Tensor:
    node, x = unit.node, unit.inputs[0]
    w_node = node.args[1]
    wq, act = plan.config.weight, plan.config.activation

    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a is x and plan.dynamic:
                return fake_quantize_dynamic(values[a.name], act.qmin, act.qmax, act.dtype,
                                             plan.config.activation_scale_min)
            if a is x:
                return fake_quantize(values[a.name], qparams[x])
            if a is w_node:
                return fake_quantize_per_channel(values[a.name], scales, weight_axis(node), wq.qmin, wq.qmax)
            return values[a.name]
        return a

    y = node.target(*[value(a) for a in node.args])
    if unit.activation is not None:
        y = unit.activation.target(y, *unit.activation.args[1:])
    return y if plan.dynamic else fake_quantize(y, qparams[unit.output])


def out_of_range(gm: fx.GraphModule, plan: Plan, qparams: dict[fx.Node, TensorQParams],
                 batches: list[tuple[Any, ...]], names: set[str]) -> dict[str, float]:
    """For the units whose compute node is named in ``names``: the fraction of their float
    output values over ``batches`` outside the range their output parameters represent (those
    with none outside are left out)."""
    units = [u for u in plan.units if u.node.name in names and u.output in qparams]
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with torch.no_grad():
        for batch in batches:
            rec = _Recording(gm, {u.output.name for u in units})
            rec.run(*batch)
            for unit in units:
                value, q = rec.values[unit.output.name], qparams[unit.output]
                counts[unit.node.name][0] += int(((value < q.lowest()) | (value > q.highest())).sum())
                counts[unit.node.name][1] += value.numel()
    return {name: outside / total for name, (outside, total) in counts.items() if outside}


def cumulative_layer_sqnr(reference: fx.GraphModule, quantized: fx.GraphModule, plan: Plan,
                          batches: list[tuple[Any, ...]]) -> dict[str, float]:
    """SQNR (dB) of every unit's output value, int8 graph against float, by compute-node name."""
    names = {u.output.name for u in plan.units}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    with torch.no_grad():
        for batch in batches:
            ref, out = _Recording(reference, names), _Recording(quantized, names)
            ref.run(*batch)
            out.run(*batch)
            for unit in plan.units:
                _accumulate(sums, unit.node.name, ref.values[unit.output.name], out.values[unit.output.name])
    return {name: sqnr_from_powers(*s) for name, s in sums.items()}


def output_sqnr(reference: fx.GraphModule, quantized: fx.GraphModule, batches: list[tuple[Any, ...]]) -> list[float]:
    """SQNR (dB) of each model output over ``batches``."""
    from graphopt import verify

    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    with torch.no_grad():
        for batch in batches:
            for i, (r, o) in enumerate(zip(verify.run(reference, batch), verify.run(quantized, batch))):
                if r.is_floating_point():
                    _accumulate(sums, str(i), r, o)
    return [sqnr_from_powers(*sums[k]) for k in sorted(sums, key=int)]


def output_sqnr_of(reference: list[Any], outputs: list[Any]) -> float:
    """The worst SQNR (dB) over the float outputs, given the outputs of two graphs on the same
    batches (one output structure per batch, flattened as pytrees)."""
    from torch.utils import _pytree as pytree

    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for ref, out in zip(reference, outputs):
        for i, (r, o) in enumerate(zip(pytree.tree_leaves(ref), pytree.tree_leaves(out))):
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                _accumulate(sums, str(i), r, o)
    return min((sqnr_from_powers(*s) for s in sums.values()), default=float("inf"))
