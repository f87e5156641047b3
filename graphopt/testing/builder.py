"""The drawing state of one model: values with tracked shapes, and the code emitted so far.

:class:`_Builder` makes every choice (each list of options starts with its simplest one, the
target shrinking moves toward), emits the ``__init__`` and ``forward`` lines of each layer and
tracks the shapes, uses and features of the values; the shape arithmetic (convolution and
pooling output sizes) and argument rendering the layer kinds share are here too. The layer
kinds themselves are in :mod:`graphopt.testing.layers` and :mod:`graphopt.testing.shape_reads`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from hypothesis import strategies as st

from graphopt.testing.cases import LayerSpec


# --------------------------------------------------------------------------- drawing state


@dataclass(eq=False)
class _Value:
    """A value of the forward function while drawing: its variable name and tracked shape.

    ``fresh`` means computed by a non-view op and not read by anything yet, so an in-place op
    may overwrite it without changing what another consumer sees. ``contiguous`` is a
    conservative guess used only to decide whether ``.view`` is a legal spelling.
    """

    name: str
    shape: tuple[int, ...]
    fresh: bool = False
    contiguous: bool = True
    uses: int = 0
    is_input: bool = False


@dataclass(frozen=True)
class _Reusable:
    """A stateful module that may be called again on a value of the same input shape."""

    attr: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class _Weight:
    """A weight that a later layer with the same kind and shape may share (tied weights)."""

    expr: str
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Config:
    kinds: tuple[str, ...]
    max_depth: int
    max_width: int
    dtypes: tuple[torch.dtype, ...]
    spatial: tuple[int, int]
    batch: tuple[int, int]
    allow_reuse: bool
    allow_inplace: bool
    require: frozenset[str] = frozenset()

    @property
    def max_spatial(self) -> int:
        return 2 * self.spatial[1]


#: Flatten only values this small, so a linear layer after it stays small.
_MAX_FEATURES = 1024


@functools.cache
def _below(n: int) -> st.SearchStrategy[int]:
    """Integers in [0, n), shrinking to 0. Cached: building strategies costs more than drawing."""
    return st.integers(0, n - 1)


def _style(expr: str) -> str:
    """Spelling style of a call expression template: ``{x}.relu()`` is a method call."""
    return "method" if expr.startswith("{x}.") else "functional"


def _batch_reads(v: _Value) -> list[str]:
    """Spellings of a read of ``v``'s batch size (see :mod:`graphopt.testing.shape_reads` for
    why ``len(x)`` is not one)."""
    return [f"{v.name}.shape[0]", f"{v.name}.size(0)"]


class _Builder:
    """Accumulates the layers of one model while tracking the values' shapes."""

    def __init__(self, draw: Callable[[st.SearchStrategy], Any], cfg: _Config):
        self.draw, self.cfg = draw, cfg
        self.values: list[_Value] = []
        self.layers: list[LayerSpec] = []
        self.reusable: list[_Reusable] = []
        self.weights: list[_Weight] = []
        self.features: set[str] = set()
        self._count = 0
        self._init: list[str] = []
        self._forward: list[str] = []
        self._layer_features: set[str] = set()

    # -- choices (each list starts with its simplest option, the shrink target)

    def pick(self, options: Sequence[Any]) -> Any:
        options = list(options)
        return options[0] if len(options) == 1 else options[self.draw(_below(len(options)))]

    def weighted(self, options: Sequence[tuple[Any, int]]) -> Any:
        """Draw one of ``(option, weight)`` pairs with probability roughly proportional to weight."""
        r = self.draw(_below(sum(w for _, w in options)))
        for option, w in options:
            if r < w:
                return option
            r -= w
        raise AssertionError("unreachable: r is below the total weight")

    def flag(self) -> bool:
        return self.draw(st.booleans())

    # -- emitting code

    def begin(self) -> int:
        self._count += 1
        self._init, self._forward, self._layer_features = [], [], set()
        return self._count

    def end(self, kind: str) -> None:
        self.layers.append(LayerSpec(kind, tuple(self._init), tuple(self._forward), frozenset(self._layer_features)))
        self.features |= self._layer_features

    def tag(self, *features: str) -> None:
        self._layer_features.update(features)

    def init(self, line: str) -> None:
        self._init.append(line)

    def forward(self, line: str) -> None:
        self._forward.append(line)

    def module(self, attr: str, ctor: str) -> str:
        self.init(f"self.{attr} = {ctor}")
        self.tag("module")
        return f"self.{attr}"

    def parameter(self, attr: str, shape: Sequence[int]) -> str:
        self.init(f"self.{attr} = nn.Parameter(torch.empty({', '.join(map(str, shape))}))")
        return f"self.{attr}"

    def buffer(self, attr: str, shape: Sequence[int]) -> str:
        self.init(f"self.register_buffer({attr!r}, torch.empty({', '.join(map(str, shape))}))")
        return f"self.{attr}"

    def use(self, *values: _Value) -> None:
        for v in values:
            v.uses += 1
            v.fresh = False

    def assign(self, index: int, expr: str, shape: Sequence[int], inputs: Sequence[_Value], *,
               fresh: bool = True, contiguous: bool | None = None) -> _Value:
        """Emit ``v<index> = expr`` reading ``inputs``; push and return the new value."""
        out = _Value(f"v{index}", tuple(shape), fresh=fresh,
                     contiguous=all(v.contiguous for v in inputs) if contiguous is None else contiguous)
        self.forward(f"{out.name} = {expr}")
        self.use(*inputs)
        self.values.append(out)
        return out

    def overwrite(self, v: _Value, statement: str) -> _Value:
        """Emit an in-place statement on fresh ``v``; the old value is gone, the result is fresh.

        The template names the result ``{out}``, or has no assignment (the result is discarded
        and ``v``'s variable now holds the modified tensor).
        """
        out_name = v.name if "{out}" not in statement else f"v{self._count}"
        self.forward(statement.format(x=v.name, out=out_name))
        self.values.remove(v)
        out = _Value(out_name, v.shape, fresh=True, contiguous=v.contiguous)
        self.values.append(out)
        self.tag("inplace")
        return out

    def call_module(self, index: int, kind: str, v: _Value, attr: str, ctor: str, out_shape: Sequence[int],
                    *, reusable: bool = True) -> _Value:
        self.module(attr, ctor)
        if reusable:
            self.reusable.append(_Reusable(attr, kind, v.shape, tuple(out_shape)))
        return self.assign(index, f"self.{attr}({v.name})", out_shape, [v])

    def weight(self, attr_expr: str, kind: str, shape: tuple[int, ...], declare: Callable[[], None]) -> None:
        """Declare a weight, or tie it to an earlier one of the same kind and shape."""
        candidates = [w for w in self.weights if w.kind == kind and w.shape == shape] if self.cfg.allow_reuse else []
        tie = self.pick([None, *candidates]) if candidates else None
        if tie is None:
            declare()
            self.weights.append(_Weight(attr_expr, kind, shape))
        else:
            self.init(f"{attr_expr} = {tie.expr}")
            self.tag("tied_weights")


# --------------------------------------------------------------------------- shape arithmetic


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_t_out(size: int, k: int, s: int, p: int, op: int, d: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def _pool_out(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    out = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:  # the last window must start inside the input
        out -= 1
    return out


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == 1 or y == 1 for x, y in zip(a, b))


#: Keyword values equal to these are left out of rendered calls, to keep the code short.
_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True, "output_padding": 0,
             "eps": 1e-5, "affine": True, "elementwise_affine": True}


#: Pools default their stride to the kernel size, so only padding may be left out.
_POOL_DEFAULTS = {"padding": 0}


def _args(*positional: Any, omit: dict[str, Any] | None = None, **keywords: Any) -> str:
    """Render call arguments: positional reprs, then keywords (strings are already code),
    leaving out keywords whose value equals the one in ``omit``."""
    parts = [p if isinstance(p, str) else repr(p) for p in positional]
    parts += [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in keywords.items()
              if omit is None or k not in omit or omit[k] != v or type(omit[k]) is not type(v)]
    return ", ".join(parts)


def _tuple(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
