"""The canonical op table: each operation's one callable and argument layout.

:class:`OpSpec` and :data:`SPECS` (canonical name -> spec), :data:`BY_TARGET` (callable ->
spec, for matching nodes) and :func:`gelu`, the canonical callable of gelu. The layout rules
are described in :mod:`graphopt.ir.ops`, which re-exports these names; the spellings that
capture folds into them are in :mod:`graphopt.ir.aliases` and :mod:`graphopt.ir.lowerings`,
which read this table, so it sits below both.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

_NO_DEFAULT = object()


@dataclass(frozen=True)
class OpSpec:
    """Canonical callable and argument layout of one operation.

    ``params`` lists ``(name, default)`` pairs in call order; ``_NO_DEFAULT`` marks required
    ones. ``tensor_params`` names the parameters that carry tensors (graph values).
    ``pure`` is False for ops with side effects or randomness.
    """

    name: str
    target: Callable[..., Any]
    params: tuple[tuple[str, Any], ...]
    tensor_params: tuple[str, ...] = ("input",)
    pure: bool = True
    random: bool = False
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {n: i for i, (n, _) in enumerate(self.params)})

    def defaults_for(self, given: int) -> tuple[Any, ...]:
        """Defaults of the parameters after the first ``given`` ones."""
        rest = self.params[given:]
        missing = [n for n, d in rest if d is _NO_DEFAULT]
        if missing:
            raise TypeError(f"{self.name}: missing required argument(s) {missing}")
        return tuple(d for _, d in rest)


def _spec(name, target, *params, tensors=("input",), pure=True, random=False) -> OpSpec:
    norm = tuple(p if isinstance(p, tuple) else (p, _NO_DEFAULT) for p in params)
    return OpSpec(name, target, norm, tuple(tensors), pure, random)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` with ``approximate`` positional: F.gelu accepts it only by keyword, and the
    canonical form keeps every argument positional."""
    return F.gelu(input, approximate=approximate)


_CONV = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_CONVT = (("stride", 1), ("padding", 0), ("output_padding", 0), ("groups", 1), ("dilation", 1))
_W = ("input", "weight", "bias")

#: canonical name -> spec
SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        _spec("conv1d", F.conv1d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv2d", F.conv2d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv3d", F.conv3d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv_transpose1d", F.conv_transpose1d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("conv_transpose2d", F.conv_transpose2d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("conv_transpose3d", F.conv_transpose3d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("linear", F.linear, "input", "weight", ("bias", None), tensors=_W),
        _spec(
            "batch_norm", F.batch_norm, "input", "running_mean", "running_var", ("weight", None),
            ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5),
            tensors=("input", "running_mean", "running_var", "weight", "bias"),
        ),
        _spec("layer_norm", F.layer_norm, "input", "normalized_shape", ("weight", None), ("bias", None),
              ("eps", 1e-5), tensors=("input", "weight", "bias")),
        _spec("group_norm", F.group_norm, "input", "num_groups", ("weight", None), ("bias", None),
              ("eps", 1e-5), tensors=("input", "weight", "bias")),
        _spec("relu", torch.relu, "input"),
        _spec("hardtanh", F.hardtanh, "input", ("min_val", -1.0), ("max_val", 1.0)),
        _spec("leaky_relu", F.leaky_relu, "input", ("negative_slope", 0.01)),
        _spec("elu", F.elu, "input", ("alpha", 1.0)),
        _spec("gelu", gelu, "input", ("approximate", "none")),
        _spec("silu", F.silu, "input"),
        _spec("mish", F.mish, "input"),
        _spec("sigmoid", torch.sigmoid, "input"),
        _spec("tanh", torch.tanh, "input"),
        _spec("hardsigmoid", F.hardsigmoid, "input"),
        _spec("hardswish", F.hardswish, "input"),
        _spec("softmax", torch.softmax, "input", "dim"),
        _spec("log_softmax", torch.log_softmax, "input", "dim"),
        _spec("max_pool1d", F.max_pool1d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("dilation", 1), ("ceil_mode", False), ("return_indices", False)),
        _spec("max_pool2d", F.max_pool2d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("dilation", 1), ("ceil_mode", False), ("return_indices", False)),
        _spec("avg_pool1d", F.avg_pool1d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("ceil_mode", False), ("count_include_pad", True)),
        _spec("avg_pool2d", F.avg_pool2d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)),
        _spec("adaptive_avg_pool1d", F.adaptive_avg_pool1d, "input", "output_size"),
        _spec("adaptive_avg_pool2d", F.adaptive_avg_pool2d, "input", "output_size"),
        _spec("adaptive_max_pool2d", F.adaptive_max_pool2d, "input", "output_size", ("return_indices", False)),
        _spec("flatten", torch.flatten, "input", ("start_dim", 0), ("end_dim", -1)),
        _spec("add", operator.add, "input", "other", tensors=("input", "other")),
        _spec("sub", operator.sub, "input", "other", tensors=("input", "other")),
        _spec("mul", operator.mul, "input", "other", tensors=("input", "other")),
        _spec("truediv", operator.truediv, "input", "other", tensors=("input", "other")),
        _spec("matmul", operator.matmul, "input", "other", tensors=("input", "other")),
        _spec("cat", torch.cat, "tensors", ("dim", 0), tensors=("tensors",)),
        _spec("dropout", F.dropout, "input", ("p", 0.5), ("training", True), ("inplace", False),
              pure=False, random=True),
    ]
}

#: canonical callable -> spec, for matching nodes
BY_TARGET: dict[Any, OpSpec] = {s.target: s for s in SPECS.values()}
