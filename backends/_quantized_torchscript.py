"""Turn a quantize/dequantize (QDQ) graph into a module running torch's int8 kernels.

The lite interpreter cannot run ``quantized_decomposed`` ops (their kernels are Python), and
running them would compute in float anyway. :func:`convert_for_torchscript` rewrites the QDQ
graph into one that passes quantized tensors between torch's quantized kernels, which script,
save for the lite interpreter and load there:

=====================================================  =================================================
QDQ pattern (``DQ``/``Q``: per-tensor dequantize/quantize)  becomes
=====================================================  =================================================
``Q(conv(DQ(q), DQ_per_channel(w_int8), b))``           ``torch.ao.nn.quantized.Conv{1,2,3}d`` on ``q``
``Q(relu(conv(...)))``, ``Q(hardtanh(conv(...)))``      ``ConvReLU{1,2,3}d`` (the clamp must be implied by
                                                        the output range, see below)
``Q(linear(...))``, ``Q(relu(linear(...)))``            ``Linear``, ``LinearReLU``
``Q(add(DQ(a), DQ(b)))``, with relu, and ``mul``        ``quantized::add``/``add_relu``/``mul``/``mul_relu``
``Q(cat([DQ(a), ...]))``                                ``quantized::cat``
``Q(op(DQ(q)))``, same parameters (pooling, reshape...) ``op(q)`` on the integers
``Q(sigmoid(DQ(q)))`` and other fixed-range ops          ``sigmoid(q)`` (torch's fixed output parameters)
``Q(hardswish(DQ(q)))``                                 ``quantized::hardswish`` (requantizes)
any other ``Q(x)``                                      ``torch.quantize_per_tensor(x, ...)``
``DQ(q)``                                               ``q.dequantize()``
``linear(DQd(x), DQ_per_channel(w_int8), b)``           :class:`DynamicLinear` on ``x`` (``DQd``: the
                                                        dynamic chain of ``quantize{mode=dynamic}``)
any other ``DQd(x)``                                    ``torch.quantize_per_tensor_dynamic(x, ...)
                                                        .dequantize()``
=====================================================  =================================================

``interpolate`` (nearest, bilinear) runs on the integers with its input's parameters, like the
pools. Arguments are written as ``torch.jit.script`` types them (a pool's ``stride=None`` as
its kernel size, an integer ``scale_factor`` as a float).

Everything else stays float, so the converted graph computes what the QDQ graph computes,
up to the kernels' rounding (within one quantization step per int8 op). A conv whose
activation clamps inside the output range (``hardtanh(-1, 1)`` with a wider range) stays float
too; relu and relu6 are implied by the range the ``quantize`` pass gives them (zero point at
the bottom, top at most 6). Activations stored as int8 become quint8 with the zero point
moved by 128: the same real values, the type torch's conv kernels take.

The engine (``x86`` or ``qnnpack``) is set process-wide (``torch.backends.quantized.engine``):
torch packs weights for it now and again when the saved file is loaded, so load and run with
the same engine.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import ops
from graphopt.errors import LoweringError
from graphopt.ir.graph import get_attr_value, shape_of
from graphopt.quantization import kernels, qdq
from graphopt.quantization.placement import op_key as _key
from graphopt.quantization.qparams import TensorQParams

_CONV = {"conv1d": (nnq.Conv1d, nniq.ConvReLU1d), "conv2d": (nnq.Conv2d, nniq.ConvReLU2d),
         "conv3d": (nnq.Conv3d, nniq.ConvReLU3d)}
_BINARY = {("add", False): torch.ops.quantized.add, ("add", True): torch.ops.quantized.add_relu,
           ("mul", False): torch.ops.quantized.mul, ("mul", True): torch.ops.quantized.mul_relu}
#: ops that run on quantized tensors and keep the input's parameters
_ON_INTEGERS = frozenset({"max_pool1d", "max_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d",
                          "avg_pool2d", "flatten", "reshape", "view", "squeeze", "unsqueeze", "relu", "hardtanh",
                          "interpolate"})
#: ops with a quantized kernel that requantizes to given output parameters
_REQUANTIZING = {"hardswish": torch.ops.quantized.hardswish}
_POOLS = frozenset({"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d"})
#: ops whose quantized kernel fixes the output parameters, as (scale, zero point) in quint8
_FIXED = {"sigmoid": (1 / 256, 0), "hardsigmoid": (1 / 256, 0), "tanh": (2 / 256, 128)}
_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


class DynamicLinear(nnqd.Linear):
    """torch's dynamically quantized linear layer, quantizing its input to the full 8 bits.

    ``nnqd.Linear`` asks ``quantized::linear_dynamic`` for 7-bit activations (``reduce_range``)
    so that full-range weights cannot saturate the int16 sums of x86 kernels without VNNI;
    graphopt bounds the weights instead (config x86: +-64, and :meth:`_Converter.check_weight_range`
    refuses more), while the graph quantizes activations to 8 bits, which 7 bits would miss by up
    to a step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, False)

    def _get_name(self) -> str:
        return "DynamicLinear"


def _as_quint8(qp: TensorQParams, where: fx.Node) -> tuple[float, int]:
    """Scale and quint8 zero point holding the same real values as ``qp``."""
    if (qp.qmin, qp.qmax) != _FULL_RANGE.get(qp.dtype):
        raise LoweringError(
            f"torchscript-mobile: {where.name} quantizes to [{qp.qmin}, {qp.qmax}] ({qp.dtype}); torch's kernels take "
            "the full uint8/int8 range only. Quantize with config=x86 or config=xnnpack"
        )
    return qp.scale, qp.zero_point + (128 if qp.dtype == torch.int8 else 0)


class _Converter:
    def __init__(self, gm: fx.GraphModule, engine: str):
        self.gm, self.engine = gm, engine
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, Any] = {}
        self.quantized: dict[fx.Node, tuple[float, int]] = {}  # new node -> quint8 (scale, zero point)
        self.lowered: list[str] = []
        self.float_ops: list[str] = []  # ops computed in float between a dequantize and a quantize

    # ------------------------------------------------------------- helpers

    def attr(self, hint: str, value: Any) -> fx.Node:
        name = hint.replace(".", "_")
        while name in self.attrs:
            name += "_"
        self.attrs[name] = value
        return self.graph.get_attr(name)

    def constant(self, node: Any) -> torch.Tensor | None:
        """The value of a constant attribute or of per-channel QDQ nodes over constants."""
        return qdq.constant_value(self.gm, node)

    def integers(self, value: Any) -> fx.Node | None:
        """The quantized tensor behind ``DQ(Q(...))`` in the new graph, else None."""
        if qdq.is_dequantize(value) and value.args[0] in self.env:
            new = self.env[value.args[0]]
            return new if new in self.quantized else None
        return None

    def copy(self, node: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            return self.attr(str(node.target), get_attr_value(self.gm, node))
        if node.op == "call_module":
            self.attrs[str(node.target)] = self.gm.get_submodule(str(node.target))
        new = self.graph.node_copy(node, lambda n: self.env[n])
        new.type = None  # fx would annotate torch.Tensor as an alias TorchScript cannot parse
        new.args, new.kwargs = _scriptable(_key(node), new.args, new.kwargs)
        return new

    # ------------------------------------------------------------- patterns

    def weighted(self, value: fx.Node, scale: float, zero_point: int) -> fx.Node | None:
        layer, act = value, None
        if _key(value) in ("relu", "hardtanh"):
            layer, act = value.args[0], value
            if not isinstance(layer, fx.Node) or len(layer.users) != 1:
                return None
        kind = ops.op_name(layer) if isinstance(layer, fx.Node) else None
        if kind not in _CONV and kind != "linear":
            return None
        q_in = self.integers(ops.arg(layer, "input"))
        weight_node = ops.arg(layer, "weight")
        if q_in is None or not qdq.is_weight_dequantize(weight_node):
            return None
        qweight = self.per_channel_weight(weight_node)
        bias = ops.arg(layer, "bias")
        bias_value = self.constant(bias) if bias is not None else None
        if qweight is None or (bias is not None and bias_value is None):
            return None
        self.check_weight_range(layer, qweight)
        relu = act is not None
        if act is not None and _key(act) == "hardtanh" and not self.clamp_implied(act, scale, zero_point):
            return None
        try:
            module = self.quantized_layer(kind, layer, qweight, bias_value, relu)
        except (RuntimeError, ValueError, TypeError, AssertionError):
            return None  # a configuration these kernels do not take: it stays float
        module.scale, module.zero_point = float(scale), int(zero_point)
        name = f"{layer.name}_int8"
        self.attrs[name] = module
        self.lowered.append(f"{layer.name} -> {type(module).__name__}")
        return self.graph.call_module(name, (q_in,))

    def check_weight_range(self, layer: fx.Node, qweight: torch.Tensor) -> None:
        largest = int(qweight.int_repr().abs().max()) if qweight.numel() else 0
        if self.engine == "x86" and largest > kernels.NON_VNNI_WEIGHT_LIMIT and not kernels.has_vnni():
            raise LoweringError(
                f"torchscript-mobile: {layer.name} has int8 weights up to {largest}; this CPU has no VNNI, so the "
                f"x86 engine saturates above {kernels.NON_VNNI_WEIGHT_LIMIT} and gives wrong results. Quantize with "
                "config=x86 (7-bit weights) for the x86 engine, or lower with engine='qnnpack'"
            )

    @staticmethod
    def clamp_implied(act: fx.Node, scale: float, zero_point: int) -> bool:
        """Is ``hardtanh(lo, hi)`` a no-op after requantization: zero point at the bottom with
        ``lo == 0`` and the top of the range no higher than ``hi`` (ONNX Runtime's rule)?"""
        low, high = ops.arg(act, "min_val"), ops.arg(act, "max_val")
        return low == 0.0 and zero_point == 0 and (255 - zero_point) * scale <= high * (1 + 1e-6)

    def per_channel_weight(self, dq: fx.Node) -> torch.Tensor | None:
        integers = self.constant(dq.args[0])
        scales, zero_points = self.constant(dq.args[1]), dq.args[2]
        zp = self.constant(zero_points) if zero_points is not None else None
        if integers is None or scales is None or integers.dtype != torch.int8:
            return None
        zp = torch.zeros(scales.numel(), dtype=torch.int64) if zp is None else zp.to(torch.int64)
        with warnings.catch_warnings():  # torch deprecates quantized dtypes (#184982); they are what runs here
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            return torch._make_per_channel_quantized_tensor(integers, scales.double(), zp, int(dq.args[3]))

    @staticmethod
    def quantized_layer(kind: str, layer: fx.Node, qweight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> nn.Module:
        if kind == "linear":
            if qweight.q_per_channel_axis() != 0:
                raise ValueError("linear weights are quantized along the output axis")
            cls = nniq.LinearReLU if relu else nnq.Linear
            module = cls(qweight.shape[1], qweight.shape[0], bias_=bias is not None)
        else:
            plain, fused = _CONV[kind]
            cls = fused if relu else plain
            stride, padding, dilation, groups = (ops.arg(layer, n) for n in ("stride", "padding", "dilation", "groups"))
            out_channels, in_per_group, *kernel = qweight.shape
            module = cls(in_per_group * groups, out_channels, tuple(kernel), stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias is not None)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float())
        return module

    def dynamic_linear(self, layer: fx.Node) -> fx.Node | None:
        """:class:`DynamicLinear` for a linear layer reading a dynamically quantized input and a
        per-channel int8 weight, else None (it stays float)."""
        source = qdq.dynamic_source(ops.arg(layer, "input"))
        weight_node = ops.arg(layer, "weight")
        if source is None or not qdq.is_weight_dequantize(weight_node):
            return None
        qmin, qmax = ops.arg(layer, "input").args[3:5]
        qweight = self.per_channel_weight(weight_node)
        bias = ops.arg(layer, "bias")
        bias_value = self.constant(bias) if bias is not None else None
        if qmax - qmin != 255 or qweight is None or qweight.q_per_channel_axis() != 0:
            return None  # torch's kernel quantizes to the full 8 bits, with weights per output channel
        if bias is not None and bias_value is None:
            return None
        self.check_weight_range(layer, qweight)
        module = DynamicLinear(qweight.shape[1], qweight.shape[0], bias_=bias is not None)
        module.set_weight_bias(qweight, None if bias is None else bias_value.detach().float())
        name = f"{layer.name}_int8"
        self.attrs[name] = module
        self.lowered.append(f"{layer.name} -> DynamicLinear")
        return self.graph.call_module(name, (self.env[source],))

    def binary(self, value: fx.Node, scale: float, zero_point: int) -> fx.Node | None:
        op, relu = value, False
        if _key(value) == "relu" and isinstance(value.args[0], fx.Node) and len(value.args[0].users) == 1:
            op, relu = value.args[0], True
        kind = _key(op)
        if kind not in ("add", "mul") or len(op.args) != 2:
            return None
        shapes = [shape_of(x) if isinstance(x, fx.Node) else None for x in op.args]
        if shapes[0] is None or shapes[0] != shapes[1]:
            return None  # torch's quantized add/mul do not broadcast: stays float
        a, b = (self.integers(x) for x in op.args)
        if a is None or b is None:
            return None
        return self.graph.call_function(_BINARY[(kind, relu)], (a, b, float(scale), int(zero_point)))

    def cat(self, value: fx.Node, scale: float, zero_point: int) -> fx.Node | None:
        if _key(value) != "cat":
            return None
        tensors = [self.integers(t) for t in ops.arg(value, "tensors")]
        if any(t is None for t in tensors):
            return None
        return self.graph.call_function(torch.ops.quantized.cat, (tensors, ops.arg(value, "dim"), float(scale), int(zero_point)))

    def on_integers(self, value: fx.Node, scale: float, zero_point: int) -> fx.Node | None:
        key = _key(value)
        if key not in _ON_INTEGERS and key not in _FIXED:
            return None
        source = self.integers(value.args[0]) if value.args else None
        if source is None:
            return None
        expected = _FIXED.get(key, self.quantized[source])
        if abs(expected[0] - scale) > 1e-9 * scale or expected[1] != zero_point:
            return None  # requantizes: stays float
        rest = fx.map_arg(tuple(value.args[1:]), lambda n: self.env[n])
        kwargs = fx.map_arg(dict(value.kwargs), lambda n: self.env[n])
        rest, kwargs = _scriptable(key, rest, kwargs, offset=1)
        if value.op == "call_method":
            # int8 kernels write NHWC: a view by sizes read at run time may not fit their
            # strides; reshape is the same view where it fits and a copy where not
            method = "reshape" if value.target == "view" else str(value.target)
            return self.graph.call_method(method, (source, *rest), kwargs)
        return self.graph.call_function(value.target, (source, *rest), kwargs)

    def requantizing(self, value: fx.Node, scale: float, zero_point: int) -> fx.Node | None:
        """``Q(hardswish(DQ(q)))`` -> torch's quantized kernel writing the output parameters."""
        kernel = _REQUANTIZING.get(_key(value))
        source = self.integers(value.args[0]) if kernel is not None and value.args else None
        if source is None:
            return None
        self.lowered.append(f"{value.name} -> quantized::{_key(value)}")
        return self.graph.call_function(kernel, (source, float(scale), int(zero_point)))

    def dynamic_fake_quantize(self, dq: fx.Node) -> fx.Node:
        """The dynamic chain ending at ``dq`` on aten ops the lite interpreter has (its
        parameters chosen by torch's own rule: the same up to the widening of tiny ranges)."""
        source = qdq.dynamic_source(dq)
        dtype = torch.qint8 if dq.args[5] == torch.int8 else torch.quint8
        q = self.graph.call_function(torch.quantize_per_tensor_dynamic, (self.env[source], dtype, False))
        return self.graph.call_method("dequantize", (q,))

    # ------------------------------------------------------------- driver

    def quantize(self, node: fx.Node) -> fx.Node:
        scale, zero_point = _as_quint8(qdq.tensor_qparams(node), node)
        value = node.args[0]
        new = None
        if isinstance(value, fx.Node):
            for pattern in (self.weighted, self.binary, self.cat, self.on_integers, self.requantizing):
                new = pattern(value, scale, zero_point)
                if new is not None:
                    break
        if new is None:
            if isinstance(value, fx.Node) and any(qdq.is_dequantize(a) for a in value.all_input_nodes):
                self.float_ops.append(f"{value.name} ({_key(value) or value.target})")
            new = self.graph.call_function(torch.quantize_per_tensor, (self.env[value], scale, zero_point, torch.quint8))
        self.quantized[new] = (scale, zero_point)
        return new

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if qdq.is_quantize(node):
                self.env[node] = self.quantize(node)
            elif qdq.is_dequantize(node):
                self.env[node] = self.graph.call_method("dequantize", (self.env[node.args[0]],))
            elif ops.is_op(node, "linear") and (lowered := self.dynamic_linear(node)) is not None:
                self.env[node] = lowered
            elif qdq.dynamic_source(node) is not None:
                self.env[node] = self.dynamic_fake_quantize(node)
            elif node.op == "call_function" and node.target in (qdq.QUANTIZE_PER_CHANNEL, qdq.DEQUANTIZE_PER_CHANNEL):
                value = self.constant(node)
                if value is None:
                    raise LoweringError(f"torchscript-mobile: weight quantization {node.name} does not read constants")
                self.env[node] = self.attr(f"{node.name}_value", value.float() if node.target is qdq.DEQUANTIZE_PER_CHANNEL else value)
            else:
                self.env[node] = self.copy(node)
        draft = fx.GraphModule(self.attrs, self.graph, "QuantizedGraph")
        draft.graph.eliminate_dead_code()  # the float ops the int8 kernels replaced
        # rebuilt so only what the graph still reads is kept (float copies of weights are not)
        module = fx.GraphModule(self.attrs, draft.graph, "QuantizedGraph")
        module.meta["int8_layers"] = list(self.lowered)
        module.meta["float_between_qdq"] = list(self.float_ops)
        return module


def _scriptable(key: str | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                offset: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments ``torch.jit.script`` types as the schema wants: a pool's ``stride=None``
    (canonical for "the kernel size") as the kernel size, ``interpolate``'s integer
    ``scale_factor`` as a float. ``offset``: how many leading arguments ``args`` lacks."""
    args = list(args)
    if key in _POOLS and ops.SPECS[key].index["stride"] - offset < len(args):
        at = ops.SPECS[key].index["stride"] - offset
        if args[at] is None:
            args[at] = args[ops.SPECS[key].index["kernel_size"] - offset]
    if key == "interpolate":
        factor = kwargs.get("scale_factor")
        if isinstance(factor, int):
            kwargs = {**kwargs, "scale_factor": float(factor)}
        elif isinstance(factor, (tuple, list)):
            kwargs = {**kwargs, "scale_factor": [float(f) for f in factor]}
    return tuple(args), kwargs


def convert_for_torchscript(gm: fx.GraphModule, example_inputs: tuple[Any, ...], *, engine: str = "x86") -> nn.Module:
    """A module computing what the QDQ graph ``gm`` computes, on torch's int8 kernels.

    ``engine``: ``"x86"`` (fbgemm; the default on x86) or ``"qnnpack"`` (ARM). The result is an
    ``fx.GraphModule`` that ``torch.jit.script`` accepts; ``.meta["int8_layers"]`` lists the
    layers that run on int8 kernels, ``.meta["float_between_qdq"]`` the ops torch has no int8
    kernel for (computed in float between dequantize and quantize). It is run once on
    ``example_inputs`` so kernel errors surface here.
    """
    if engine not in torch.backends.quantized.supported_engines:
        raise LoweringError(
            f"torchscript-mobile: quantized engine {engine!r} is not in this torch build "
            f"(available: {', '.join(torch.backends.quantized.supported_engines)})"
        )
    torch.backends.quantized.engine = engine
    converted = _Converter(gm, engine).run().eval()
    try:
        with torch.no_grad():
            converted(*example_inputs)
    except Exception as exc:
        raise LoweringError(
            f"torchscript-mobile: the int8 module converted from the QDQ graph fails on the example inputs "
            f"with engine {engine!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return converted


__all__ = ["convert_for_torchscript"]
