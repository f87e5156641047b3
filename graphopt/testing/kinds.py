"""The op vocabulary: every op kind a model may be drawn from, and the blocks built of them.

:data:`OP_KINDS` (simplest first) and :data:`FEATURES`; the private table ``_KINDS`` saying which
values each kind applies to and how it draws a layer, the families a step draws from with
their weights, and the multi-layer steps (a conv block, a squeeze-excite gate, a module called
again).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from graphopt.testing.builder import _MAX_FEATURES, _Builder, _Value
from graphopt.testing.layers import (
    _activation, _adaptive_avg_pool, _batch_norm, _binary, _cat, _cat_partners, _conv, _conv_transpose2d, _flatten,
    _group_norm, _layer_norm, _linear, _mean, _permute, _pool, _reshape, _reshape_targets, _split,
)
from graphopt.testing.shape_reads import (
    _batch_pairs, _expand_token, _new_tensor, _position, _shape_split, _shape_view, _shape_view_targets,
)


def _reuse(b: _Builder, v: _Value) -> None:
    """Call an existing stateful module again (one module, two call sites)."""
    i = b.begin()
    target = b.pick([r for r in b.reusable if r.in_shape == v.shape])
    b.tag("module_reuse")
    b.assign(i, f"self.{target.attr}({v.name})", target.out_shape, [v])
    b.end(target.kind)


@dataclass(frozen=True)
class _Kind:
    """An op kind: which values it applies to and how it draws one layer."""

    applies: Callable[[_Builder, _Value], bool]
    build: Callable[[_Builder, _Value], None]


def _rank(*ranks: int) -> Callable[[_Builder, _Value], bool]:
    return lambda b, v: len(v.shape) in ranks


def _poolable(b: _Builder, v: _Value) -> bool:
    return len(v.shape) in (3, 4) and min(v.shape[2:]) >= 2


_KINDS: dict[str, _Kind] = {
    "relu": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "relu")),
    "conv2d": _Kind(_rank(4), lambda b, v: _conv(b, v, 2)),
    "batch_norm": _Kind(_rank(2, 3, 4), _batch_norm),
    "linear": _Kind(_rank(2, 3, 4), _linear),
    "add": _Kind(_rank(2, 3, 4), lambda b, v: _binary(b, v, "add")),
    "mul": _Kind(_rank(2, 3, 4), lambda b, v: _binary(b, v, "mul")),
    "relu6": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "relu6")),
    "hardtanh": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "hardtanh")),
    "silu": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "silu")),
    "sigmoid": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "sigmoid")),
    "tanh": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "tanh")),
    "gelu": _Kind(_rank(2, 3, 4), lambda b, v: _activation(b, v, "gelu")),
    "conv1d": _Kind(_rank(3), lambda b, v: _conv(b, v, 1)),
    "conv_transpose2d": _Kind(lambda b, v: len(v.shape) == 4 and max(v.shape[2:]) <= b.cfg.max_spatial,
                              _conv_transpose2d),
    "layer_norm": _Kind(_rank(2, 3, 4), _layer_norm),
    "group_norm": _Kind(lambda b, v: len(v.shape) in (3, 4) and math.prod(v.shape[1:]) > 1, _group_norm),
    "cat": _Kind(lambda b, v: bool(_cat_partners(b, v)), _cat),
    "split": _Kind(lambda b, v: v.shape[1] >= 2, _split),
    "max_pool": _Kind(_poolable, lambda b, v: _pool(b, v, "max_pool")),
    "avg_pool": _Kind(_poolable, lambda b, v: _pool(b, v, "avg_pool")),
    "adaptive_avg_pool": _Kind(_rank(3, 4), _adaptive_avg_pool),
    "flatten": _Kind(lambda b, v: len(v.shape) in (3, 4) and math.prod(v.shape[1:]) <= _MAX_FEATURES, _flatten),
    "reshape": _Kind(lambda b, v: bool(_reshape_targets(v.shape)), _reshape),
    "permute": _Kind(_rank(3, 4), _permute),
    "mean": _Kind(_rank(3, 4), _mean),
    "shape_view": _Kind(lambda b, v: bool(_shape_view_targets(b, v.shape)), _shape_view),
    "expand_token": _Kind(lambda b, v: v.shape[1] < b.cfg.max_width, _expand_token),
    "new_tensor": _Kind(_rank(2, 3, 4), _new_tensor),
    "position": _Kind(_rank(2, 3, 4), _position),
    "shape_split": _Kind(lambda b, v: v.shape[1] >= 2 or (len(v.shape) > 2 and v.shape[-1] >= 2), _shape_split),
    "batch_pairs": _Kind(_rank(2, 3, 4), _batch_pairs),
}

#: Kinds grouped by family, with the family's weight. A step draws a family first, then a kind
#: in it, so the seven activations do not crowd out the three convolutions.
_WEIGHTED_FAMILIES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("relu", "relu6", "hardtanh", "silu", "sigmoid", "tanh", "gelu"), 2),
    (("conv2d", "conv1d", "conv_transpose2d"), 3),
    (("batch_norm", "layer_norm", "group_norm"), 2),
    (("linear",), 1),
    (("add", "mul"), 2),
    (("cat", "split"), 1),
    (("max_pool", "avg_pool", "adaptive_avg_pool", "mean"), 1),
    (("flatten", "reshape", "permute"), 1),
    # sizes read at run time (x.shape[0], x.size(-1)): what a batch-specializing pass breaks
    (("shape_view", "expand_token", "new_tensor", "position", "shape_split", "batch_pairs"), 3),
)
_FAMILIES = tuple(family for family, _ in _WEIGHTED_FAMILIES)
_CONVS, _NORMS, _ACTS = _FAMILIES[1], _FAMILIES[2], _FAMILIES[0]
_SHAPE_READS = _FAMILIES[-1]

#: Every feature a case may carry (:attr:`Case.features`), for ``models(require=...)``.
FEATURES: tuple[str, ...] = (
    "depthwise", "grouped", "residual", "broadcast", "shared_value", "module_reuse", "tied_weights", "inplace",
    "batch_stats_norm", "multi_output", "dead_value", "module", "functional", "method", "shape_read", "batch_read",
)

#: Every op kind ``models(ops=...)`` accepts, simplest first (the order shrinking prefers).
OP_KINDS: tuple[str, ...] = tuple(k for family in _FAMILIES for k in family)


def _allowed(b: _Builder, names: Iterable[str], v: _Value) -> list[str]:
    return [k for k in names if k in b.cfg.kinds and _KINDS[k].applies(b, v)]


def _block(b: _Builder, v: _Value) -> None:
    """The motif most passes target: a convolution, then optionally a norm and an activation,
    and a residual connection back to the block's input when the shapes allow it."""
    _KINDS[b.pick(_allowed(b, _CONVS, v))].build(b, v)
    for family in (_NORMS, _ACTS):
        out = b.values[-1]
        kind = b.pick([None, *_allowed(b, family, out)])
        if kind is not None:
            _KINDS[kind].build(b, out)
    out = b.values[-1]
    if out.shape == v.shape and v in b.values and "add" in b.cfg.kinds and b.flag():
        _binary(b, out, "add", partner=v)


def _squeeze_excite(b: _Builder, v: _Value) -> None:
    """A gate broadcast over space: ``v * act(adaptive_avg_pool(v, 1))``, shape (N,C,1,1)
    times (N,C,H,W), as in MobileNetV3 and EfficientNet."""
    _adaptive_avg_pool(b, v, size=1)
    gate = b.values[-1]
    act = b.pick([None, *_allowed(b, _ACTS, gate)])
    if act is not None:
        _activation(b, gate, act)
    _binary(b, b.values[-1], "mul", partner=v)


_BLOCK = _Kind(lambda b, v: bool(_allowed(b, _CONVS, v)), _block)
_SQUEEZE_EXCITE = _Kind(lambda b, v: len(v.shape) in (3, 4) and min(v.shape[2:]) > 1
                        and {"adaptive_avg_pool", "mul"} <= set(b.cfg.kinds), _squeeze_excite)
_REUSE = _Kind(lambda b, v: b.cfg.allow_reuse and any(r.in_shape == v.shape for r in b.reusable), _reuse)
