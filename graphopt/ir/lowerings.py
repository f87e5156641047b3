"""Module lowerings: standard nn layers as the functional calls their forward makes.

:data:`MODULE_LOWERINGS` maps an exact module type to its lowering, a function returning the
:class:`Step` calls that replace a call of the module (:data:`INPUT` marks the value flowing
in, :class:`Attr` a parameter or buffer); :func:`lowering_for` applies it unless the module is
opaque (:func:`is_opaque`: hooks or parametrized weights). Capture inlines these while tracing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from graphopt.ir.specs import gelu

class _Input:
    """Marks where the value flowing into the module call goes in a lowered call."""

    def __repr__(self) -> str:
        return "INPUT"


INPUT = _Input()


@dataclass(frozen=True)
class Attr:
    """A parameter or buffer of the lowered module; becomes ``get_attr <module path>.<name>``."""

    name: str


@dataclass(frozen=True)
class Step:
    """One call a lowered module makes: ``target`` is a callable (``call_function``) or a method
    name (``call_method``). The result of each step feeds the next through :data:`INPUT`, unless
    ``effect_only`` (a state update such as ``num_batches_tracked.add_(1)``)."""

    target: Callable[..., Any] | str
    args: tuple[Any, ...]
    effect_only: bool = False


Lowering = Callable[[nn.Module], "tuple[Step, ...] | None"]


def _ref(module: nn.Module, name: str) -> Attr | None:
    return Attr(name) if getattr(module, name) is not None else None


def _functional(fn: Callable[..., Any], *params: str | Attr) -> Lowering:
    """Lower to ``fn(input, *params)``: a str is read off the module as a Python value, an
    :class:`Attr` refers to a parameter/buffer (``None`` when the module has none)."""

    def lower(module: nn.Module) -> tuple[Step, ...]:
        args = [_ref(module, p.name) if isinstance(p, Attr) else getattr(module, p) for p in params]
        return (Step(fn, (INPUT, *args)),)

    return lower


def _conv(fn: Callable[..., Any]) -> Lowering:
    """Conv forward: non-zero padding modes pad explicitly, then convolve with padding 0."""

    def lower(m: nn.Module) -> tuple[Step, ...]:
        w, b = Attr("weight"), _ref(m, "bias")
        if m.padding_mode == "zeros":
            return (Step(fn, (INPUT, w, b, m.stride, m.padding, m.dilation, m.groups)),)
        zero = (0,) * len(m.stride)
        return (
            Step(F.pad, (INPUT, tuple(m._reversed_padding_repeated_twice), m.padding_mode, None)),
            Step(fn, (INPUT, w, b, m.stride, zero, m.dilation, m.groups)),
        )

    return lower


def _batch_norm(m: nn.Module) -> tuple[Step, ...] | None:
    """Exactly what ``_BatchNorm.forward`` does.

    A training-mode BN that tracks statistics stays a BN in training mode: the counter update
    is an explicit in-place step and ``batch_norm(training=True)`` updates the running stats.
    With ``momentum=None`` its factor is ``1/num_batches_tracked`` read at run time, which a
    constant argument cannot express, so that case stays an opaque module call.
    """
    tracking = m.training and m.track_running_stats
    if tracking and m.momentum is None:
        return None
    steps: list[Step] = []
    if tracking and m.num_batches_tracked is not None:
        steps.append(Step("add_", (Attr("num_batches_tracked"), 1), effect_only=True))
    pass_stats = not m.training or m.track_running_stats
    mean = _ref(m, "running_mean") if pass_stats else None
    var = _ref(m, "running_var") if pass_stats else None
    batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    factor = 0.0 if m.momentum is None else m.momentum
    steps.append(Step(F.batch_norm, (INPUT, mean, var, _ref(m, "weight"), _ref(m, "bias"), batch_stats, factor, m.eps)))
    return tuple(steps)


def _dropout(m: nn.Module) -> tuple[Step, ...]:
    return (Step(F.dropout, (INPUT, m.p, True, m.inplace)),) if m.training else ()


def _identity_in_eval(m: nn.Module) -> tuple[Step, ...] | None:
    """Feature/alpha dropout: an identity in eval; in training it stays an opaque call."""
    return None if m.training else ()


def _softmax(fn: Callable[..., Any]) -> Lowering:
    def lower(m: nn.Module) -> tuple[Step, ...] | None:
        # dim=None picks a legacy dim from the input rank at run time: keep the module
        return None if m.dim is None else (Step(fn, (INPUT, m.dim)),)

    return lower


_WEIGHT, _BIAS = Attr("weight"), Attr("bias")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONVT_ATTRS = (_WEIGHT, _BIAS, "stride", "padding", "output_padding", "groups", "dilation")

#: exact module type -> lowering (None from a lowering keeps that instance an opaque call)
MODULE_LOWERINGS: dict[type[nn.Module], Lowering] = {
    nn.Conv1d: _conv(F.conv1d),
    nn.Conv2d: _conv(F.conv2d),
    nn.Conv3d: _conv(F.conv3d),
    nn.ConvTranspose1d: _functional(F.conv_transpose1d, *_CONVT_ATTRS),
    nn.ConvTranspose2d: _functional(F.conv_transpose2d, *_CONVT_ATTRS),
    nn.ConvTranspose3d: _functional(F.conv_transpose3d, *_CONVT_ATTRS),
    nn.Linear: _functional(F.linear, _WEIGHT, _BIAS),
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _functional(F.layer_norm, "normalized_shape", _WEIGHT, _BIAS, "eps"),
    nn.GroupNorm: _functional(F.group_norm, "num_groups", _WEIGHT, _BIAS, "eps"),
    nn.ReLU: _functional(F.relu, "inplace"),
    nn.ReLU6: _functional(F.hardtanh, "min_val", "max_val", "inplace"),
    nn.Hardtanh: _functional(F.hardtanh, "min_val", "max_val", "inplace"),
    nn.LeakyReLU: _functional(F.leaky_relu, "negative_slope", "inplace"),
    nn.ELU: _functional(F.elu, "alpha", "inplace"),
    nn.GELU: _functional(gelu, "approximate"),
    nn.SiLU: _functional(F.silu, "inplace"),
    nn.Mish: _functional(F.mish, "inplace"),
    nn.Sigmoid: _functional(torch.sigmoid),
    nn.Tanh: _functional(torch.tanh),
    nn.Hardsigmoid: _functional(F.hardsigmoid, "inplace"),
    nn.Hardswish: _functional(F.hardswish, "inplace"),
    nn.Softmax: _softmax(torch.softmax),
    nn.LogSoftmax: _softmax(torch.log_softmax),
    nn.MaxPool1d: _functional(F.max_pool1d, *_MAX_POOL),
    nn.MaxPool2d: _functional(F.max_pool2d, *_MAX_POOL),
    nn.AvgPool1d: _functional(F.avg_pool1d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AvgPool2d: _functional(F.avg_pool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                              "divisor_override"),
    nn.AdaptiveAvgPool1d: _functional(F.adaptive_avg_pool1d, "output_size"),
    nn.AdaptiveAvgPool2d: _functional(F.adaptive_avg_pool2d, "output_size"),
    nn.Flatten: _functional(torch.flatten, "start_dim", "end_dim"),
    nn.Dropout: _dropout,
    nn.Dropout1d: _identity_in_eval,
    nn.Dropout2d: _identity_in_eval,
    nn.Dropout3d: _identity_in_eval,
    nn.AlphaDropout: _identity_in_eval,
    nn.Identity: lambda m: (),
}

#: types whose instances (and subclasses) capture keeps as leaves while tracing
LOWERABLE_TYPES: tuple[type[nn.Module], ...] = tuple(MODULE_LOWERINGS)


def has_hooks(module: nn.Module) -> bool:
    """True if the module has hooks (which also implement the old ``weight_norm``) that a
    functional call in its place would skip."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


def is_opaque(module: nn.Module) -> bool:
    """True if calling the module does more than its class's forward with its stored weights:
    it has hooks, or parametrized weights computed on each call."""
    return has_hooks(module) or parametrize.is_parametrized(module)


def lowering_for(module: nn.Module) -> tuple[Step, ...] | None:
    """The calls that replace a call of ``module``, or None to keep it an opaque ``call_module``.

    Only exact types are lowered: a subclass may override ``forward``, and parametrized modules
    (``torch.nn.utils.parametrize``, ``weight_norm``'s pre-hook) compute their weight per call.
    """
    lower = MODULE_LOWERINGS.get(type(module))
    if lower is None or is_opaque(module):
        return None
    return lower(module)
