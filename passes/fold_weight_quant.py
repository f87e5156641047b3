"""``fold-weight-quantization``: store quantized weights as int8 constants.

``quantize`` leaves each weight as ``dequantize_per_channel(quantize_per_channel(w_float))`` so
the float weight stays visible to passes that still want it. This pass evaluates the inner
``quantize_per_channel`` once and reads an int8 constant instead::

    dequantize_per_channel(quantize_per_channel(w, s, z, axis, qmin, qmax, int8), s, z, ...)
        ->  dequantize_per_channel(w_int8, s, z, ...)

The values the graph computes are bit-identical (the same integers are dequantized), and the
weights take a quarter of the bytes once ``eliminate-dead-code`` drops the float originals.
The same float weight quantized with the same scales at several sites is stored once. The
constants are named ``<weight>_int8`` (dots become underscores); the float weights are left
in place (never modified) for dead-code elimination to remove when nothing reads them.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import graphopt
from graphopt.pipeline import rewrite
from graphopt.ir.graph import add_constant, copy_provenance, get_attr_value
from graphopt.quantization import qdq


def _constant(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = get_attr_value(gm, arg)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _weight_quantization(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is qdq.QUANTIZE_PER_CHANNEL


@graphopt.register_pass("fold-weight-quantization", contract=graphopt.Exact(rtol=0.0, atol=0.0), after=("quantize",))
def fold_weight_quantization(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    """Replace quantize_per_channel of constant weights by int8 constants (bit-identical)."""
    stored: dict[tuple[str, str, str], str] = {}

    def constant_operands(match: rewrite.Match) -> str | None:
        if any(_constant(gm, a) is None for a in match.root.args[:3]):
            return "weight, scales or zero points are not constant attributes"
        return None

    def fold(match: rewrite.Match) -> fx.Node:
        node = match.root
        weight, scales, zero_points = node.args[:3]
        key = (str(weight.target), str(scales.target), str(zero_points.target))
        if key not in stored:
            with torch.no_grad():
                integers = node.target(*(_constant(gm, a) for a in node.args[:3]), *node.args[3:])
            stored[key] = add_constant(gm, f"{weight.target}_int8", integers)
        constant = gm.graph.get_attr(stored[key])
        copy_provenance(constant, weight)
        return constant

    folded = rewrite.apply(gm, ctx, rewrite.Rule(_weight_quantization, fold, check=constant_operands,
                                                 name="fold into an int8 constant"))
    # the float weights stay for eliminate-dead-code (attributes are never removed here)
    ctx.record("int8_weights", len(stored))
    return folded
