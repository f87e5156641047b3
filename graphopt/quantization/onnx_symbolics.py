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
"""
from __future__ import annotations

import torch

from . import qdq  # noqa: F401  (registers the ops)

_DOMAIN = "quantized_decomposed"
_REGISTERED: set[int] = set()
_ONNX_INT = {torch.uint8: 2, torch.int8: 3}  # onnx.TensorProto.UINT8 / INT8
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


def _quantize_per_tensor(g, x, scale, zero_point, qmin, qmax, dtype):
    lo, hi, dt = _scalars(qmin, qmax, dtype)
    s, z = _per_tensor_args(g, scale, zero_point, dt)
    return _clip(g, g.op("QuantizeLinear", x, s, z), lo, hi, dt)


def _dequantize_per_tensor(g, q, scale, zero_point, qmin, qmax, dtype, out_dtype=None):
    _, _, dt = _scalars(qmin, qmax, dtype)
    s, z = _per_tensor_args(g, scale, zero_point, dt)
    return g.op("DequantizeLinear", q, s, z)


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
    """Teach ``torch.onnx.export(dynamo=False)`` the QDQ ops for ``opset`` (13 or later:
    per-axis QuantizeLinear). Idempotent."""
    if opset in _REGISTERED:
        return
    for name, fn in (("quantize_per_tensor", _quantize_per_tensor), ("dequantize_per_tensor", _dequantize_per_tensor),
                     ("quantize_per_channel", _quantize_per_channel), ("dequantize_per_channel", _dequantize_per_channel)):
        torch.onnx.register_custom_op_symbolic(f"{_DOMAIN}::{name}", fn, opset)
    _REGISTERED.add(opset)
