"""Backend quantization configurations, as data.

A configuration says which ops run in int8 on a family of kernels and under which rules:

- ``weighted_ops``: ops with a weight (conv, linear). Their activation input and weight are
  quantized (weights symmetric per output channel), their output is observed. A conv or linear
  marked as a fusion unit by ``fuse-conv-bn-relu`` is observed after its activation.
- ``binary_ops``: elementwise ops of two tensors (add, mul) with their own output observer;
  ``binary_activations`` may follow them inside the same unit (ResNet's add + relu).
- ``shared_ops``: ops whose output reuses their input's parameters (reshape, pooling, relu,
  ``interpolate``: nearest copies values, bilinear averages them, ...): no requantization, the backend moves the integers through. They are quantized only
  when their input already is.
- ``fixed_ops``: ops whose output range is known (sigmoid: [0, 1]): fixed parameters, as the
  kernels require. Also only when their input is quantized.
- ``cat``: quantized inputs and output; with ``cat_shares_qparams`` all of them share one set of
  parameters (XNNPACK's concatenate needs that; it costs accuracy when ranges differ), without it
  each input keeps its own and the kernel requantizes (ONNX Runtime's QLinearConcat, torch's
  quantized cat).

Add a configuration with :func:`register_config`; pick one with ``quantize{config=NAME}``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from graphopt.errors import OptionError
from graphopt.quantization.qparams import DEFAULT_SCALE_MIN


@dataclass(frozen=True)
class IntegerType:
    """The integers a quantized tensor is stored in."""

    dtype: torch.dtype
    qmin: int
    qmax: int


@dataclass(frozen=True)
class FixedQParams:
    scale: float
    zero_point: int


_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d", "linear"})
#: Shape-only and max/average ops: integers pass through with the input's parameters. Names
#: are canonical op names or tensor method names (``x.view(...)``).
_SHARED = frozenset({"max_pool1d", "max_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                     "avg_pool1d", "avg_pool2d", "flatten", "reshape", "view", "squeeze", "unsqueeze",
                     "relu", "hardtanh", "interpolate"})
_UINT8 = IntegerType(torch.uint8, 0, 255)
_INT8 = IntegerType(torch.int8, -128, 127)


def _fixed(zero_for_unsigned_unit: int) -> Mapping[str, FixedQParams]:
    """sigmoid-like ops map to [0, 1), tanh to [-1, 1): 256 steps either way."""
    unit = FixedQParams(1.0 / 256.0, zero_for_unsigned_unit)
    return MappingProxyType({
        "sigmoid": unit, "hardsigmoid": unit, "softmax": unit,
        "tanh": FixedQParams(2.0 / 256.0, zero_for_unsigned_unit + 128),
    })


@dataclass(frozen=True)
class BackendConfig:
    """What a family of int8 kernels supports; see the module docstring."""

    name: str
    description: str
    activation: IntegerType
    weight: IntegerType  # symmetric: zero point 0, qmin == -qmax
    weight_scale_min: float = DEFAULT_SCALE_MIN
    activation_scale_min: float = DEFAULT_SCALE_MIN
    weighted_ops: frozenset[str] = _WEIGHTED
    binary_ops: frozenset[str] = frozenset({"add", "mul"})
    binary_activations: frozenset[str] = frozenset({"relu"})
    shared_ops: frozenset[str] = _SHARED
    fixed_ops: Mapping[str, FixedQParams] = field(default_factory=dict)
    cat_shares_qparams: bool = False

    def __post_init__(self) -> None:
        if self.weight.qmin != -self.weight.qmax:
            raise ValueError(f"config {self.name}: weights are symmetric, qmin must be -qmax")

    def summary(self) -> str:
        a, w = self.activation, self.weight
        return (f"config {self.name}: activations {str(a.dtype)[6:]} [{a.qmin}, {a.qmax}] per-tensor affine, "
                f"weights {str(w.dtype)[6:]} [{w.qmin}, {w.qmax}] symmetric per-channel "
                f"(scale >= {self.weight_scale_min:.3g}), cat "
                f"{'shares one scale' if self.cat_shares_qparams else 'requantizes each input'}; "
                f"{self.description}")


_CONFIGS: dict[str, BackendConfig] = {}


def register_config(config: BackendConfig) -> BackendConfig:
    """Make ``config`` selectable by name (``quantize{config=NAME}``)."""
    _CONFIGS[config.name] = config
    return config


def get_config(name: str) -> BackendConfig:
    if name in _CONFIGS:
        return _CONFIGS[name]
    hint = difflib.get_close_matches(name, list(_CONFIGS), n=1)
    raise OptionError(
        f"quantize: unknown config {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" (configs: {', '.join(sorted(_CONFIGS))})"
    )


def available_configs() -> dict[str, BackendConfig]:
    return dict(sorted(_CONFIGS.items()))


X86 = register_config(BackendConfig(
    name="x86",
    description=(
        "for x86 CPUs, fast in ONNX Runtime (U8S8 with reduce_range) and torch's x86/fbgemm engine. "
        "Weights use 7 bits (+-64): without VNNI the AVX2 kernels add pairs of uint8 x int8 products "
        "in int16, which saturates with full-range weights (measured: 248 steps of error in a "
        "QLinearConv); +-64 keeps every pair below 2**15"
    ),
    activation=_UINT8,
    weight=IntegerType(torch.int8, -64, 64),
    fixed_ops=_fixed(0),
))

XNNPACK = register_config(BackendConfig(
    name="xnnpack",
    description=(
        "for ARM phones (XNNPACK, qnnpack) and ONNX Runtime S8S8: XNNPACK's rules, weights in "
        "[-127, 127] with scale >= 2**-12, one scale across a concatenation. On x86 without VNNI "
        "ONNX Runtime runs S8S8 slower than fp32 on some models; prefer config=x86 there"
    ),
    activation=_INT8,
    weight=IntegerType(torch.int8, -127, 127),
    weight_scale_min=2.0**-12,
    fixed_ops=_fixed(-128),
    cat_shares_qparams=True,
))
