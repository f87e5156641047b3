"""Dead channels: units whose removal leaves every output unchanged (:func:`dead_units`), with
the bias compensation that makes removing a constant channel exact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt.channels.records import ChannelAnalysis, Layer
from graphopt.channels.rules import _nonzero
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value


@dataclass(eq=False)
class DeadUnit:
    """A unit whose removal leaves every output unchanged.

    Every layer producing it has all-zero weights for it, so its values are constants (the
    producers' biases pushed through per-channel ops). Where a consumer reads a non-zero
    constant ``k``, removing it is exact once ``k * W_next`` is folded into the consumer's bias:
    ``bias_deltas`` holds that term per consumer, over the consumer's original outputs.
    """

    unit: int
    bias_deltas: dict[fx.Node, torch.Tensor]


def dead_units(analysis: ChannelAnalysis, example_inputs: Any) -> dict[int, DeadUnit]:
    """Units that can be removed exactly (see :class:`DeadUnit`), by unit id.

    A unit qualifies when: it is not frozen; every producer reads its weight from an attribute
    and has all-zero weights for the unit (biases may be anything); every op its values pass
    through is a per-channel op that maps constants to constants (activations, inference batch
    norm, pooling without zero padding averaged in, layout ops, arithmetic with constants or
    with the same unit; not layer/group norm, softmax over channels, or a product with an
    input-dependent value broadcast over channels: ``_Propagation.block``); and every consumer
    is a linear layer, a conv without padding, or reads the constant 0 (zero padding would see
    the constant only inside the border). The constants are read off one run on
    ``example_inputs`` and checked to be constant there, so an analysis gap cannot go unnoticed.
    """
    gm = analysis.gm
    frozen_units = {int(u) for g in analysis.groups if g.frozen for u in g.units}
    zero_units: set[int] = set()
    live_units: set[int] = set()
    for layer in analysis.layers:
        units = analysis.units(layer.out_atoms)
        if layer.weight.op != "get_attr":
            live_units.update(units.tolist())
            continue
        weight = get_attr_value(gm, layer.weight).detach()
        rows = weight.movedim(layer.out_dim, 0).reshape(units.size, -1)
        rows_zero = (torch.linalg.vector_norm(rows, float("inf"), dim=1) == 0).numpy()
        live_units.update(units[~rows_zero].tolist())
        zero_units.update(units[rows_zero].tolist())
    candidates = zero_units - live_units - frozen_units - set(analysis._blocked)
    if not candidates:
        return {}

    consumers: dict[int, list[tuple[Layer, np.ndarray]]] = {}
    for layer in analysis.layers:
        in_units = analysis.units(layer.in_atoms)
        if in_units is None:
            continue
        out_units = set(analysis.units(layer.out_atoms).tolist())
        for u in (set(in_units.tolist()) & candidates) - out_units:
            consumers.setdefault(u, []).append((layer, np.nonzero(in_units == u)[0]))
    values = _values_of(gm, example_inputs, {layer.in_value for rows in consumers.values() for layer, _ in rows})

    dead: dict[int, DeadUnit] = {}
    for u in sorted(candidates):
        deltas: dict[fx.Node, torch.Tensor] = {}
        for layer, positions in consumers.get(u, []):
            delta = _compensation(gm, analysis, layer, positions, values[layer.in_value])
            if delta is None:
                break
            if bool((delta != 0).any()):
                deltas[layer.node] = delta
        else:
            dead[u] = DeadUnit(u, deltas)
    return dead


def _values_of(gm: fx.GraphModule, example_inputs: Any, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of the ``wanted`` nodes on one run of ``gm``."""
    seen: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in wanted:
                seen[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
    return seen


def _compensation(gm: fx.GraphModule, analysis: ChannelAnalysis, layer: Layer, positions: np.ndarray,
                  value: torch.Tensor) -> torch.Tensor | None:
    """``sum_p k_p * W[:, p]`` over ``positions`` for consumer ``layer`` (zeros when every
    constant is 0), or None when removing them from ``layer`` cannot be exact."""
    per_index = value.detach().movedim(layer.in_value_dim, -1)
    per_index = per_index.reshape(-1, per_index.shape[-1])[:, torch.as_tensor(positions)].double()
    k = per_index[0]
    if not bool(torch.isfinite(k).all()):
        return None
    spread = (per_index - k).abs().max().item() if per_index.numel() else 0.0
    if spread > 1e-6 * max(1.0, k.abs().max().item()):
        return None  # not constant after all: keep the unit
    weight_node = layer.weight
    out_size = int(layer.out_atoms.size)
    if not bool((k != 0).any()):
        return torch.zeros(out_size, dtype=torch.float64)
    if layer.kind == "conv_transpose" or (layer.kind == "conv" and _nonzero(ops.arg(layer.node, "padding"))):
        return None
    if (layer.kind == "conv" and layer.groups != 1) or layer.kind == "addmm":  # addmm: bias is its first argument
        return None
    if weight_node.op != "get_attr":
        return None
    bias_node = ops.arg(layer.node, "bias")
    if isinstance(bias_node, fx.Node):
        bias = get_attr_value(gm, bias_node) if bias_node.op == "get_attr" else None
        if bias is None or analysis._tensor_uses.get(id(bias), 0) != 1:
            return None  # a shared or computed bias cannot absorb this layer's compensation
    weight = get_attr_value(gm, weight_node).detach().double()
    columns = weight.index_select(layer.in_dim, torch.as_tensor(positions))
    columns = columns.reshape(columns.shape[0], columns.shape[1], -1).sum(-1)  # over kernel extent
    return columns @ k
