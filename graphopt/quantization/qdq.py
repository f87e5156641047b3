"""Quantize/dequantize nodes in FX graphs: the ops, how to recognize them, how to read them.

graphopt represents a quantized graph as a float graph with explicit quantize/dequantize
(QDQ) pairs, using torch's decomposed quantization ops (the ones PT2E quantization emits)::

    q  = quantized_decomposed.quantize_per_tensor(x, scale, zero_point, qmin, qmax, torch.uint8)
    dq = quantized_decomposed.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, torch.uint8)
    w  = quantized_decomposed.dequantize_per_channel(w_int8, scales, zero_points, axis, qmin, qmax, torch.int8)
    y  = F.conv2d(dq, w, bias, ...)

Why this form: the graph still runs in eager PyTorch, so it is its own reference for
verification; ``torch.onnx.export(dynamo=True)`` maps the ops to QuantizeLinear /
DequantizeLinear, which ONNX Runtime fuses into QLinearConv and friends; and it is the form
ExecuTorch's XNNPACK partitioner consumes. Scales and zero points of activations are Python
numbers in the node's arguments; those of weights are constant attributes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from .qparams import TensorQParams

_QD = torch.ops.quantized_decomposed
QUANTIZE_PER_TENSOR = _QD.quantize_per_tensor.default
DEQUANTIZE_PER_TENSOR = _QD.dequantize_per_tensor.default
QUANTIZE_PER_CHANNEL = _QD.quantize_per_channel.default
DEQUANTIZE_PER_CHANNEL = _QD.dequantize_per_channel.default
QDQ_TARGETS = frozenset({QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL})


def is_quantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is QUANTIZE_PER_TENSOR


def is_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is DEQUANTIZE_PER_TENSOR


def is_weight_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is DEQUANTIZE_PER_CHANNEL


def is_qdq(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in QDQ_TARGETS


def has_qdq(gm: fx.GraphModule) -> bool:
    """Does the graph hold quantize/dequantize nodes (is it a quantized graph)?"""
    return any(is_qdq(n) for n in gm.graph.nodes)


def tensor_qparams(node: fx.Node) -> TensorQParams:
    """The parameters of a per-tensor quantize or dequantize node."""
    _, scale, zero_point, qmin, qmax, dtype = node.args[:6]
    return TensorQParams(float(scale), int(zero_point), int(qmin), int(qmax), dtype)


def qdq_args(qp: TensorQParams) -> tuple[Any, ...]:
    """The arguments after the tensor of a per-tensor quantize/dequantize node."""
    return (qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.dtype)


def insert_quantize(graph: fx.Graph, value: fx.Node, qp: TensorQParams) -> fx.Node:
    """``quantize_per_tensor(value)`` placed right after ``value``."""
    with graph.inserting_after(value):
        return graph.call_function(QUANTIZE_PER_TENSOR, (value, *qdq_args(qp)))


def insert_dequantize(graph: fx.Graph, quantized: fx.Node, before: fx.Node) -> fx.Node:
    """A fresh ``dequantize_per_tensor(quantized)`` placed right before ``before``.

    One dequantize per consumer, as ONNX Runtime's QDQ fusion requires (a dequantize shared by
    two consumers blocks both fusions).
    """
    with graph.inserting_before(before):
        return graph.call_function(DEQUANTIZE_PER_TENSOR, (quantized, *quantized.args[1:6]))
