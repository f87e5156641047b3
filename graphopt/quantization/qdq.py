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

Dynamic quantization (``quantize{mode=dynamic}``) chooses an activation's parameters at run
time, from the tensor itself, with the ``.tensor`` overloads (the form PT2E's dynamic
quantization emits)::

    s, z = quantized_decomposed.choose_qparams.tensor(x, qmin, qmax, eps, torch.uint8)
    q    = quantized_decomposed.quantize_per_tensor.tensor(x, s, z, qmin, qmax, torch.uint8)
    dq   = quantized_decomposed.dequantize_per_tensor.tensor(q, s, z, qmin, qmax, torch.uint8)
    y    = F.linear(dq, w, bias)

One such chain per consumer, so each runtime's dynamic kernel (ONNX Runtime's
DynamicQuantizeMatMul, torch's ``quantized::linear_dynamic``) owns the quantization of its input.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from graphopt.ir.graph import get_attr_value
from graphopt.quantization.qparams import TensorQParams

_QD = torch.ops.quantized_decomposed
QUANTIZE_PER_TENSOR = _QD.quantize_per_tensor.default
DEQUANTIZE_PER_TENSOR = _QD.dequantize_per_tensor.default
QUANTIZE_PER_CHANNEL = _QD.quantize_per_channel.default
DEQUANTIZE_PER_CHANNEL = _QD.dequantize_per_channel.default
CHOOSE_QPARAMS = _QD.choose_qparams.tensor
QUANTIZE_DYNAMIC = _QD.quantize_per_tensor.tensor
DEQUANTIZE_DYNAMIC = _QD.dequantize_per_tensor.tensor
DYNAMIC_TARGETS = frozenset({CHOOSE_QPARAMS, QUANTIZE_DYNAMIC, DEQUANTIZE_DYNAMIC})
QDQ_TARGETS = frozenset({QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL,
                         *DYNAMIC_TARGETS})


def is_quantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is QUANTIZE_PER_TENSOR


def is_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is DEQUANTIZE_PER_TENSOR


def is_weight_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is DEQUANTIZE_PER_CHANNEL


def is_qdq(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in QDQ_TARGETS


def is_dynamic_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is DEQUANTIZE_DYNAMIC


def has_qdq(gm: fx.GraphModule) -> bool:
    """Does the graph hold quantize/dequantize nodes, static or dynamic (is it a quantized graph)?"""
    return any(is_qdq(n) for n in gm.graph.nodes)


def has_dynamic_qdq(gm: fx.GraphModule) -> bool:
    """Does the graph quantize activations at run time (``choose_qparams`` and friends)?"""
    return any(n.op == "call_function" and n.target in DYNAMIC_TARGETS for n in gm.graph.nodes)


def dynamic_source(dq: fx.Node) -> fx.Node | None:
    """The float value ``x`` a dynamic dequantize reads back, when it ends the chain of
    :func:`insert_dynamic_qdq` (parameters chosen from ``x`` itself, for the same integer range
    as the quantize); else None."""
    if not is_dynamic_dequantize(dq):
        return None
    q = dq.args[0]
    if not (isinstance(q, fx.Node) and q.target is QUANTIZE_DYNAMIC and tuple(q.args[1:6]) == tuple(dq.args[1:6])):
        return None
    x, scale, zero_point, qmin, qmax, dtype = q.args[:6]
    if not all(isinstance(p, fx.Node) and p.target is operator.getitem for p in (scale, zero_point)):
        return None
    choose = scale.args[0]
    if scale.args[1] != 0 or tuple(zero_point.args) != (choose, 1):
        return None
    if not (isinstance(choose, fx.Node) and choose.target is CHOOSE_QPARAMS and choose.args[0] is x
            and (choose.args[1], choose.args[2], choose.args[4]) == (qmin, qmax, dtype)):
        return None
    return x


def constant_value(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The value of a constant attribute, or of per-channel quantize/dequantize nodes over
    constants (a weight before or after ``fold-weight-quantization``); None otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = get_attr_value(gm, node)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_function" and node.target in (QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL):
        values = [constant_value(gm, a) for a in node.args[:3]]
        if any(v is None for v in values):
            return None
        with torch.no_grad():
            return node.target(*values, *node.args[3:])
    return None


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


def insert_dynamic_qdq(graph: fx.Graph, value: fx.Node, reader: fx.Node, qmin: int, qmax: int, dtype: torch.dtype,
                       eps: float) -> list[fx.Node]:
    """The chain choosing parameters from ``value`` at run time, quantizing and dequantizing it,
    placed right before ``reader``; returns the nodes made, the dequantize (for ``reader`` to
    read) last."""
    with graph.inserting_before(reader):
        choose = graph.call_function(CHOOSE_QPARAMS, (value, qmin, qmax, eps, dtype))
        scale = graph.call_function(operator.getitem, (choose, 0))
        zero_point = graph.call_function(operator.getitem, (choose, 1))
        q = graph.call_function(QUANTIZE_DYNAMIC, (value, scale, zero_point, qmin, qmax, dtype))
        dq = graph.call_function(DEQUANTIZE_DYNAMIC, (q, scale, zero_point, qmin, qmax, dtype))
    return [choose, scale, zero_point, q, dq]


def fake_quantize_dynamic(x: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype, eps: float) -> torch.Tensor:
    """What the chain of :func:`insert_dynamic_qdq` computes for ``x``."""
    scale, zero_point = CHOOSE_QPARAMS(x, qmin, qmax, eps, dtype)
    return DEQUANTIZE_DYNAMIC(QUANTIZE_DYNAMIC(x, scale, zero_point, qmin, qmax, dtype), scale, zero_point,
                              qmin, qmax, dtype)
