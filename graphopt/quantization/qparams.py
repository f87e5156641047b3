"""Quantization parameter math: affine per-tensor, symmetric per-channel, the int32 bias guard.

A real value ``x`` is stored as the integer ``q = clamp(round_half_even(x / scale) + zero_point,
qmin, qmax)`` and read back as ``(q - zero_point) * scale``. Conventions kept everywhere:

- Scales are float32 numbers (ONNX Runtime and torch store them as float32; a float64 scale
  would be rounded differently by each runtime).
- The range is widened to contain 0 before the scale is chosen, and the zero point is an
  integer in ``[qmin, qmax]``, so 0.0 is exactly representable: zero padding, ReLU's zeros
  and pruned channels stay exactly zero.
- A scale never falls below a floor (``scale_min``): an all-zero tensor or weight channel
  would otherwise get scale 0 and divide by zero in every runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Largest bias magnitude, in units of ``s_in * s_w``, that graphopt lets a backend store as
#: int32. Half of int32's range, so rounding and a backend's own arithmetic keep headroom.
INT32_BIAS_LIMIT = 2.0**30

#: Default scale floor: float32's machine epsilon, torch's own choice.
DEFAULT_SCALE_MIN = float(torch.finfo(torch.float32).eps)


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(value))


@dataclass(frozen=True)
class TensorQParams:
    """Per-tensor affine parameters of one quantized value."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    def lowest(self) -> float:
        """The smallest real value representable."""
        return (self.qmin - self.zero_point) * self.scale

    def highest(self) -> float:
        """The largest real value representable."""
        return (self.qmax - self.zero_point) * self.scale


def affine_qparams(low: float, high: float, qmin: int, qmax: int, dtype: torch.dtype,
                   scale_min: float = DEFAULT_SCALE_MIN) -> TensorQParams:
    """Affine parameters covering ``[low, high]`` (widened to contain 0).

    The scale is rounded to float32 first and the zero point is chosen for that scale.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"range [{low}, {high}] is not finite")
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = float32(max((high - low) / (qmax - qmin), scale_min))
    zero_point = int(np.clip(qmin - np.round(low / scale), qmin, qmax))
    return TensorQParams(scale, zero_point, qmin, qmax, dtype)


def symmetric_per_channel_scales(weight: torch.Tensor, axis: int, qmax: int,
                                 scale_min: float = DEFAULT_SCALE_MIN) -> torch.Tensor:
    """float32 scales, one per slice of ``weight`` along ``axis``: ``max|w| / qmax``, at least
    ``scale_min`` (an all-zero channel gets the floor, never 0)."""
    moved = weight.detach().movedim(axis, 0).reshape(weight.shape[axis], -1).double()
    amax = moved.abs().amax(dim=1) if moved.shape[1] else torch.zeros(moved.shape[0], dtype=torch.float64)
    return (amax / qmax).clamp_min(scale_min).float()


def guard_bias_scales(weight_scales: torch.Tensor, bias: torch.Tensor | None, input_scale: float) -> tuple[torch.Tensor, int]:
    """Raise weight scales where the bias would not fit int32 at scale ``input_scale * w_scale``.

    Backends store the bias as ``round(b / (s_in * s_w))`` in int32 (ONNX Runtime's QLinearConv,
    torch's quantized conv). A channel whose weights are tiny next to its bias (a dead channel
    kept alive by its bias, an over-regularized filter) would overflow. Such channels get
    ``s_w = |b| / (s_in * INT32_BIAS_LIMIT)``: their weights lose resolution, the bias stays
    exact. Returns the new scales and how many channels were raised.
    """
    if bias is None:
        return weight_scales, 0
    b = bias.detach().double().abs().reshape(-1)
    if b.numel() != weight_scales.numel():
        return weight_scales, 0
    needed = (b / (input_scale * INT32_BIAS_LIMIT)).float()
    raised = needed > weight_scales
    return torch.maximum(weight_scales, needed), int(raised.sum())


def fake_quantize(x: torch.Tensor, qp: TensorQParams) -> torch.Tensor:
    """``x`` quantized and dequantized with ``qp`` (round half to even), in ``x``'s dtype."""
    q = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
    return ((q - qp.zero_point) * qp.scale).to(x.dtype)


def fake_quantize_per_channel(w: torch.Tensor, scales: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """Symmetric per-channel fake quantization of ``w`` along ``axis``."""
    shape = [1] * w.dim()
    shape[axis] = -1
    s = scales.reshape(shape).to(w.dtype)
    return torch.clamp(torch.round(w / s), qmin, qmax) * s
