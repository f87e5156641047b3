"""Dynamically quantized linear layers in the integer form ONNX Runtime runs on int8 kernels.

A dynamic linear of the graph (``quantize{mode=dynamic}``, see :mod:`graphopt.quantization.qdq`)::

    s, z = choose_qparams.tensor(x);  xd = dequantize.tensor(quantize.tensor(x, s, z), s, z)
    y = linear(xd, dequantize_per_channel(w_int8, w_scale, w_zero, axis=0), bias)

exported op by op becomes DynamicQuantizeLinear -> DequantizeLinear -> Gemm or MatMul, and ONNX
Runtime (1.32, all optimizations) does not turn that into an integer kernel: the Gemm stays
float, and on 3-D inputs the weight's DequantizeLinear is turned into MatMulNBits, which
requantizes the activations its own way (measured: outputs 1% of their range away from the
graph). :func:`integer_linears` therefore writes each such layer as::

    xq, xs, xz = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(xq, transpose(w_int8), xz, w_zero), float) * (xs * w_scale) + bias

ONNX Runtime's own dynamic quantization's form, which it fuses into DynamicQuantizeMatMul. It
computes what the graph computes: DynamicQuantizeLinear chooses the parameters
``choose_qparams`` chooses for the 8-bit range (int8 activations are the same real values as
uint8 with the zero point moved by 128), the integer products are exact, and only the float
scaling is reassociated.

Both exporters write that form: the TorchScript one through :class:`_IntegerLinear`'s symbolic,
the dynamo one (which keeps sizes symbolic where a trace bakes them in, as in transformers'
attention reshapes) through the custom op ``graphopt::integer_linear`` and its entry in
:data:`DYNAMO_TRANSLATIONS`; without it torch.export would see the ``quantized_decomposed``
ops, which have no ONNX function.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.ir import ops
from graphopt.ir.graph import add_constant
from graphopt.quantization import qdq

_ONNX_FLOAT, _ONNX_INT8 = 1, 3  # onnx.TensorProto.FLOAT / INT8


class _IntegerLinear(torch.autograd.Function):
    """Runs the graph's ops; exported (TorchScript exporter) as the integer form above."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                bias: torch.Tensor | None, act: tuple[Any, ...], w_range: tuple[int, int]) -> torch.Tensor:
        weight = qdq.DEQUANTIZE_PER_CHANNEL(w_int8, w_scale, w_zero, 0, *w_range, torch.int8)
        return F.linear(qdq.fake_quantize_dynamic(x, *act), weight, bias)

    @staticmethod
    def symbolic(g: Any, x: Any, w_int8: Any, w_scale: Any, w_zero: Any, bias: Any, act: Any, w_range: Any) -> Any:
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        integers = g.op("MatMulInteger", xq, g.op("Transpose", w_int8, perm_i=[1, 0]), xz,
                        g.op("Cast", w_zero, to_i=_ONNX_INT8))
        y = g.op("Mul", g.op("Cast", integers, to_i=_ONNX_FLOAT), g.op("Mul", xs, w_scale))
        return y if bias is None or bias.node().mustBeNone() else g.op("Add", y, bias)


def integer_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                   bias: torch.Tensor | None, act: tuple[Any, ...], w_range: tuple[int, int]) -> torch.Tensor:
    """A dynamically quantized linear layer as one node (``act``: qmin, qmax, dtype, eps of the
    activation; ``w_range``: the weight's qmin, qmax)."""
    return _IntegerLinear.apply(x, w_int8, w_scale, w_zero, bias, act, w_range)


@torch.library.custom_op("graphopt::integer_linear", mutates_args=())
def integer_linear_op(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                      bias: torch.Tensor | None, qmin: int, qmax: int, dtype: torch.dtype, eps: float,
                      w_qmin: int, w_qmax: int) -> torch.Tensor:
    """:func:`integer_linear` as one op torch.export keeps whole, for the dynamo exporter."""
    return _IntegerLinear.forward(None, x, w_int8, w_scale, w_zero, bias, (qmin, qmax, dtype, eps), (w_qmin, w_qmax))


@integer_linear_op.register_fake
def _(x, w_int8, w_scale, w_zero, bias, qmin, qmax, dtype, eps, w_qmin, w_qmax):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


def _integer_linear_onnx(x, w_int8, w_scale, w_zero, bias, qmin, qmax, dtype, eps, w_qmin, w_qmax):  # noqa: ANN001, ANN202
    """The dynamo exporter's translation of ``graphopt::integer_linear`` (onnxscript ops)."""
    from onnxscript import opset18 as op

    xq, xs, xz = op.DynamicQuantizeLinear(x)
    integers = op.MatMulInteger(xq, op.Transpose(w_int8, perm=[1, 0]), xz, op.Cast(w_zero, to=_ONNX_INT8))
    y = op.Mul(op.Cast(integers, to=_ONNX_FLOAT), op.Mul(xs, w_scale))
    return y if bias is None else op.Add(y, bias)


#: ``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` of a graph from
#: ``integer_linears(gm, custom_op=True)``
DYNAMO_TRANSLATIONS = {torch.ops.graphopt.integer_linear.default: _integer_linear_onnx}


def integer_linears(gm: fx.GraphModule, custom_op: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose dynamically quantized linear layers are :func:`integer_linear`
    nodes (``custom_op``: ``graphopt::integer_linear`` nodes, for the dynamo exporter), and how
    many were rewritten. Layers of another shape (an activation range other than 8 bits,
    weights quantized along another axis or not constant) keep their op-by-op form. ``gm`` is
    untouched."""
    module = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    module.meta.update(gm.meta)
    graph, rewritten = module.graph, 0
    for node in list(graph.nodes):
        found = _dynamic_linear(module, node) if ops.is_op(node, "linear") else None
        if found is None:
            continue
        x, integers, scale, zero, w_range, act = found
        with graph.inserting_before(node):
            weights = [graph.get_attr(add_constant(module, f"{node.name}_{hint}", value))
                       for hint, value in (("weight_int8", integers), ("weight_scale", scale), ("weight_zero", zero))]
            bias = ops.arg(node, "bias")
            new = (graph.call_function(torch.ops.graphopt.integer_linear.default, (x, *weights, bias, *act, *w_range))
                   if custom_op else graph.call_function(integer_linear, (x, *weights, bias, act, w_range)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        module.recompile()
    return module, rewritten


def _dynamic_linear(module: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | None:
    """The parts of a dynamically quantized linear layer, or None when ``node`` is not one."""
    x_dq, w_dq = ops.arg(node, "input"), ops.arg(node, "weight")
    x = qdq.dynamic_source(x_dq)
    if x is None or not qdq.is_weight_dequantize(w_dq):
        return None
    qmin, qmax, dtype = x_dq.args[3:6]
    eps = x_dq.args[1].args[0].args[3]  # choose_qparams(x, qmin, qmax, eps, dtype)
    _, _, _, axis, w_qmin, w_qmax, w_dtype = w_dq.args[:7]
    integers, scale, zero = (qdq.constant_value(module, a) for a in w_dq.args[:3])
    if qmax - qmin != 255 or axis != 0 or w_dtype != torch.int8 or integers is None or scale is None or zero is None:
        return None
    if integers.dim() != 2 or integers.dtype != torch.int8:
        return None
    return x, integers, scale.float(), zero, (int(w_qmin), int(w_qmax)), (int(qmin), int(qmax), dtype, float(eps))


#: ops of an optimized ONNX Runtime graph that only carry integers or the QDQ form itself, or
#: read a tensor's shape, not its values
_NOT_COMPUTING = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Shape", "Size"})
#: elementwise float ops an exporter writes one op as (HardSwish as HardSigmoid then Mul)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "Sigmoid", "HardSigmoid", "Tanh"})


def float_between_qdq(model: Any) -> dict[str, int]:
    """Op types (with counts) that ONNX Runtime left computing in float between a
    DequantizeLinear and a QuantizeLinear in the optimized ``model`` (an ``onnx.ModelProto``):
    the int8 ops it has no kernel for (HardSwish, a bilinear Resize)."""
    nodes = model.graph.node
    producer = {out: n for n in nodes for out in n.output}
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    found: dict[str, int] = {}
    for n in nodes:
        if n.op_type in _NOT_COMPUTING:
            continue
        reads_dq = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)
        feeds_q = any(r.op_type == "QuantizeLinear" for out in n.output for r in _float_readers(out, readers))
        if reads_dq and feeds_q:
            found[n.op_type] = found.get(n.op_type, 0) + 1
    return found


def _float_readers(value: str, readers: dict[str, list[Any]], depth: int = 4) -> list[Any]:
    """The nodes reading ``value``, looking through a few float elementwise steps
    (HardSwish written as HardSigmoid then Mul)."""
    found = []
    for r in readers.get(value, []):
        found.append(r)
        if depth and r.op_type in _ELEMENTWISE:
            found += [x for out in r.output for x in _float_readers(out, readers, depth - 1)]
    return found
