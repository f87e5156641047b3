"""ONNX symbolics for the QDQ ops, so the TorchScript-based ONNX exporter can write them.

``torch.onnx.export(dynamo=True)`` maps ``quantized_decomposed`` ops to QuantizeLinear /
DequantizeLinear by itself, but it is 10-100x slower than the TorchScript-based exporter, which
does not know these ops ("unrecognized namespace quantized_decomposed"). After
:func:`register_torchscript_symbolics` it writes them as:

- ``quantize_per_tensor(x, s, z, qmin, qmax, dtype)`` -> ``QuantizeLinear(x, s, z)`` with a
  scalar float32 scale and a zero point of the integer type; when ``[qmin, qmax]`` is narrower
  than the type, a ``Clip`` in the integer domain follows;
- ``dequantize_per_tensor`` -> ``DequantizeLinear``;
- ``quantize_per_channel`` / ``dequantize_per_channel`` -> the same with ``axis`` set, reading
  the scale and zero-point initializers (zero points cast to the integer type if needed).

Scales and zero points become constants, as ONNX Runtime's QDQ fusion requires.

Dynamic quantization's ops (see :mod:`graphopt.quantization.qdq`) are written with
``DynamicQuantizeLinear``, which chooses uint8 parameters at run time exactly as
``choose_qparams.tensor`` does for the 8-bit range:

- ``choose_qparams.tensor`` -> ``DynamicQuantizeLinear``'s scale and zero point (for int8 the
  zero point moved down by 128: the same real values);
- ``quantize_per_tensor.tensor`` of the tensor those parameters came from -> that node's
  integers, otherwise ``QuantizeLinear``; ``dequantize_per_tensor.tensor`` -> ``DequantizeLinear``.

That form is correct but ONNX Runtime runs the matrix product in float after it; the onnx
backend writes dynamically quantized linear layers in the integer form ONNX Runtime fuses
(``graphopt.backends._quantized_onnx``).
"""
from __future__ import annotations

import torch

from graphopt.quantization import qdq  # noqa: F401  (registers the ops)

_DOMAIN = "quantized_decomposed"
_REGISTERED: set[int] = set()
_ONNX_INT = {torch.uint8: 2, torch.int8: 3}  # onnx.TensorProto.UINT8 / INT8
_ONNX_INT32 = 6
_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _const(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


def _scalars(qmin, qmax, dtype):
    from torch.onnx import symbolic_helper as sh

    return int(sh._maybe_get_const(qmin, "i")), int(sh._maybe_get_const(qmax, "i")), _torch_dtype(dtype)


def _torch_dtype(dtype) -> torch.dtype:
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import _type_utils

    code = sh._maybe_get_const(dtype, "i")
    return _type_utils.JitScalarType(code).dtype()


def _clip(g, q, qmin: int, qmax: int, dtype: torch.dtype):
    if (qmin, qmax) == _RANGE[dtype]:
        return q
    return g.op("Clip", q, _const(g, torch.tensor(qmin, dtype=dtype)), _const(g, torch.tensor(qmax, dtype=dtype)))


def _per_tensor_args(g, scale, zero_point, dtype: torch.dtype):
    from torch.onnx import symbolic_helper as sh

    s = float(sh._maybe_get_const(scale, "f"))
    z = int(sh._maybe_get_const(zero_point, "i"))
    return _const(g, torch.tensor(s, dtype=torch.float32)), _const(g, torch.tensor(z, dtype=dtype))


def _chosen_at_run_time(scale) -> bool:
    from torch.onnx import symbolic_helper as sh

    return not sh._is_constant(scale)


def _dynamic_quantizer(value):
    """The DynamicQuantizeLinear node producing ``value``, or None."""
    node = value.node()
    return node if node.kind() == "onnx::DynamicQuantizeLinear" else None


def _quantize_per_tensor(g, x, scale, zero_point, qmin, qmax, dtype):
    lo, hi, dt = _scalars(qmin, qmax, dtype)
    if _chosen_at_run_time(scale):
        chooser = _dynamic_quantizer(scale)
        if chooser is not None and chooser.inputsAt(0).unique() == x.unique():
            return chooser.outputsAt(0)  # the integers DynamicQuantizeLinear computed with these parameters
        return _clip(g, g.op("QuantizeLinear", x, scale, zero_point), lo, hi, dt)
    s, z = _per_tensor_args(g, scale, zero_point, dt)
    return _clip(g, g.op("QuantizeLinear", x, s, z), lo, hi, dt)


def _dequantize_per_tensor(g, q, scale, zero_point, qmin, qmax, dtype, out_dtype=None):
    _, _, dt = _scalars(qmin, qmax, dtype)
    if _chosen_at_run_time(scale):
        chooser = _dynamic_quantizer(q)
        if chooser is not None:  # uint8 integers: read them with DynamicQuantizeLinear's own zero point
            return g.op("DequantizeLinear", q, chooser.outputsAt(1), chooser.outputsAt(2))
        return g.op("DequantizeLinear", q, scale, zero_point)
    s, z = _per_tensor_args(g, scale, zero_point, dt)
    return g.op("DequantizeLinear", q, s, z)


def _choose_qparams(g, x, qmin, qmax, eps, dtype):
    lo, hi, dt = _scalars(qmin, qmax, dtype)
    if hi - lo != 255 or dt not in _ONNX_INT:
        raise ValueError(f"choose_qparams for [{lo}, {hi}] ({dt}): ONNX's DynamicQuantizeLinear chooses 8-bit "
                         "parameters over the full range only")
    _, scale, zero_point = g.op("DynamicQuantizeLinear", x, outputs=3)
    if dt == torch.int8:
        wide = g.op("Sub", g.op("Cast", zero_point, to_i=_ONNX_INT32), _const(g, torch.tensor(128, dtype=torch.int32)))
        zero_point = g.op("Cast", wide, to_i=_ONNX_INT[torch.int8])
    return scale, zero_point


def _zero_points(g, zero_points, dtype: torch.dtype):
    return g.op("Cast", zero_points, to_i=_ONNX_INT[dtype])


def _quantize_per_channel(g, x, scales, zero_points, axis, qmin, qmax, dtype):
    from torch.onnx import symbolic_helper as sh

    lo, hi, dt = _scalars(qmin, qmax, dtype)
    q = g.op("QuantizeLinear", x, scales, _zero_points(g, zero_points, dt), axis_i=int(sh._maybe_get_const(axis, "i")))
    return _clip(g, q, lo, hi, dt)


def _dequantize_per_channel(g, q, scales, zero_points, axis, qmin, qmax, dtype, out_dtype=None):
    from torch.onnx import symbolic_helper as sh

    _, _, dt = _scalars(qmin, qmax, dtype)
    return g.op("DequantizeLinear", q, scales, _zero_points(g, zero_points, dt), axis_i=int(sh._maybe_get_const(axis, "i")))


def register_torchscript_symbolics(opset: int) -> None:
    """Teach ``torch.onnx.export(dynamo=False)`` the QDQ ops, static and dynamic, for ``opset``
    (13 or later: per-axis QuantizeLinear). Idempotent."""
    if opset in _REGISTERED:
        return
    for name, fn in (("quantize_per_tensor", _quantize_per_tensor), ("dequantize_per_tensor", _dequantize_per_tensor),
                     ("quantize_per_channel", _quantize_per_channel),
                     ("dequantize_per_channel", _dequantize_per_channel), ("choose_qparams", _choose_qparams)):
        torch.onnx.register_custom_op_symbolic(f"{_DOMAIN}::{name}", fn, opset)
    _REGISTERED.add(opset)
