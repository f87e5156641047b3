"""Hypothesis strategies that generate random, valid PyTorch models for testing passes.

A model is drawn as a *spec*: layers over a stack of values whose shapes are tracked while
drawing, so every model is valid by construction (nothing is generated and then thrown away for
a shape error). The spec is rendered to Python source (an ``nn.Module`` class plus the lines that
build it with seeded weights and example inputs) and the case's module is built by executing
that very source, so the code a failure prints *is* the model, not a description of it::

    from hypothesis import given
    from graphopt.testing import models

    @given(models(ops=["conv2d", "batch_norm", "relu"], dtypes=(torch.float32, torch.float64)))
    def test_my_pass(case):
        graphopt.testing.assert_sound("my-pass", case)

Shrinking: each step (one layer, or a small block) is one hypothesis draw that starts with a
"go on?" choice, so the shrinker can drop whole steps, and every list of choices starts with its
simplest option (a plain op, the most recent value, no reuse, no in-place): a failure shrinks
toward a few plain ops. Weights come from a generator seeded by a drawn integer, which shrinks
to 0 like any other choice.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import linecache
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from hypothesis import assume
from hypothesis import strategies as st

from graphopt import verify
from graphopt.errors import PropertyTestError
from graphopt.ir.shapes import resize as _resize

__all__ = ["Case", "ModelSpec", "LayerSpec", "FEATURES", "OP_KINDS", "OTHER_BATCH_SIZES", "models", "model_specs",
           "render", "case_from_code", "inputs_at_batch", "randomize_"]


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True, repr=False, eq=False)  # tensors have no truth value to compare by
class Case:
    """One generated model: what a property test receives.

    ``module`` is in eval mode; ``code`` is paste-able Python that rebuilds exactly this module
    and these inputs (it defines ``model`` and ``example_inputs``); ``ops`` lists the op kind of
    every layer in order (a module called twice appears twice); ``features`` names the
    structural traits present (``depthwise``, ``grouped``, ``residual``, ``broadcast``,
    ``shared_value``, ``module_reuse``, ``tied_weights``, ``inplace``, ``batch_stats_norm``,
    ``multi_output``, ``dead_value``, spelling styles ``module``/``functional``/``method``, and
    ``shape_read``/``batch_read`` for models that read a size at run time / the batch size);
    all are listed in :data:`FEATURES`.
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    code: str
    ops: tuple[str, ...] = ()
    features: frozenset[str] = frozenset()

    @property
    def description(self) -> str:
        """The model as paste-able Python source (same as ``code``)."""
        return self.code

    @property
    def dtype(self) -> torch.dtype:
        return self.example_inputs[0].dtype

    def __repr__(self) -> str:
        # Hypothesis prints this for a falsifying example: make it the paste-able model.
        return f"# graphopt.testing.Case ops={list(self.ops)}\n{self.code}"


def case_from_code(code: str, *, ops: Sequence[str] = (), features: Iterable[str] = ()) -> Case:
    """Build a Case by executing model source that defines ``model`` and ``example_inputs``.

    This is how generated cases are built, and how a failure printed by a property test is
    pinned as a regression test: paste its code into a string and call this.
    """
    filename = f"<graphopt-case-{hashlib.sha1(code.encode()).hexdigest()[:12]}>"
    # Registering the source lets tracebacks and fx stack traces show the model's lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": "graphopt_generated_case"}
    exec(compile(code, filename, "exec"), namespace)
    try:
        model, example_inputs = namespace["model"], namespace["example_inputs"]
    except KeyError as exc:
        raise PropertyTestError(
            f"case code must define `model` and `example_inputs`; {exc.args[0]!r} is missing"
        ) from None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return Case(model.eval(), tuple(example_inputs), code, tuple(ops), frozenset(features))


# --------------------------------------------------------------------------- weights


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every floating-point parameter and buffer of ``model`` from a generator seeded with
    ``seed``, at scales that keep activations of order one; returns ``model``.

    Running variances are in [0.25, 2], running means and biases are centred normals,
    one-dimensional weights (norm scales) are in [0.5, 1.5] in magnitude, negative about one
    time in four (a negative scale flips the order of values: max-pooling and relu do not
    commute with it), and the rest are normal with standard deviation 1/sqrt(fan-in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            uniform = torch.rand(t.shape, generator=gen, dtype=torch.float64)
            normal = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                value = 0.25 + 1.75 * uniform
            elif name.endswith("running_mean"):
                value = 0.5 * normal
            elif t.dim() == 1 and name.endswith("weight"):
                value = (0.5 + uniform) * torch.where(normal < -0.67, -1.0, 1.0)
            elif t.dim() == 1:
                value = 0.2 * normal
            else:
                value = normal / max(1, t[0].numel()) ** 0.5
            t.copy_(value.to(t.dtype))
    return model


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LayerSpec:
    """One drawn layer: its op kind, the lines it adds to ``__init__`` and to ``forward``."""

    kind: str
    init: tuple[str, ...]
    forward: tuple[str, ...]
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ModelSpec:
    """A whole drawn model: inputs, dtype, weight seed, layers, and the returned values."""

    input_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    seed: int
    layers: tuple[LayerSpec, ...]
    outputs: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    features: frozenset[str] = frozenset()

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(layer.kind for layer in self.layers)


def _input_names(count: int) -> list[str]:
    return ["x"] + [f"x{i}" for i in range(2, count + 1)]


@functools.cache
def _randomize_source() -> str:
    return inspect.getsource(randomize_).rstrip()


def render(spec: ModelSpec) -> str:
    """Python source that defines ``GeneratedModel`` and builds ``model`` and ``example_inputs``."""
    init = [line for layer in spec.layers for line in layer.init] or ["pass"]
    forward = [line for layer in spec.layers for line in layer.forward]
    returned = spec.outputs[0] if len(spec.outputs) == 1 else "(" + ", ".join(spec.outputs) + ")"
    args = ", ".join(_input_names(len(spec.input_shapes)))
    dtype = str(spec.dtype)
    inputs = "".join(
        f"torch.randn({', '.join(map(str, shape))}, generator=gen).to({dtype}), " for shape in spec.input_shapes
    )
    lines = [
        "import torch",
        "import torch.nn as nn",
        "import torch.nn.functional as F",
        "",
        "",
        "class GeneratedModel(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        *("        " + line for line in init),
        "",
        f"    def forward(self, {args}):",
        *("        " + line for line in forward),
        f"        return {returned}",
        "",
        "",
        _randomize_source(),
        "",
        "",
        f"model = randomize_(GeneratedModel(), seed={spec.seed}).to({dtype}).eval()",
        f"gen = torch.Generator().manual_seed({spec.seed + 1})",
        f"example_inputs = ({inputs.rstrip()})",
        "",
    ]
    return "\n".join(lines)


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


@functools.cache
def _below(n: int) -> st.SearchStrategy[int]:
    """Integers in [0, n), shrinking to 0. Cached: building strategies costs more than drawing."""
    return st.integers(0, n - 1)


def _style(expr: str) -> str:
    """Spelling style of a call expression template: ``{x}.relu()`` is a method call."""
    return "method" if expr.startswith("{x}.") else "functional"


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


# --------------------------------------------------------------------------- op kinds


def _group_choices(channels: int) -> list[int]:
    """Dense first, then grouped (2 groups), then depthwise."""
    out = [1]
    if channels % 2 == 0 and channels > 2:
        out.append(2)
    if channels > 1:
        out.append(channels)
    return out


def _tag_groups(b: _Builder, groups: int, channels: int) -> None:
    if groups == channels > 1:
        b.tag("depthwise")
    elif groups > 1:
        b.tag("grouped")


def _out_channels(b: _Builder, cin: int, groups: int) -> int:
    """Output channels: same as input first (keeps residuals possible), multiples of groups."""
    if groups == cin:
        return b.pick([cin * m for m in (1, 2) if cin * m <= max(cin, b.cfg.max_width)])
    widths = range(groups, b.cfg.max_width + 1, groups)
    return b.pick(([cin] if cin in widths else []) + [c for c in widths if c != cin])


def _weighted_layer(b: _Builder, i: int, v: _Value, kind: str, prefix: str, out_shape: tuple[int, ...],
                    w_shape: tuple[int, ...], bias_size: int | None, ctor: str | None,
                    call: Callable[[str, str], str]) -> None:
    """Emit a layer that owns a weight (conv, transposed conv, linear): the module ``ctor``,
    or when it is None a functional ``call(weight, bias)`` on parameters of its own (a bias of
    ``bias_size`` elements, or none). Either way the weight may be tied to an earlier one of
    the same kind and shape."""
    if ctor is not None:
        attr = f"{prefix}{i}"
        b.call_module(i, kind, v, attr, ctor, out_shape)
        b.weight(f"self.{attr}.weight", kind, w_shape, declare=lambda: None)
        return
    b.tag("functional")
    weight = f"self.{prefix}{i}_weight"
    b.weight(weight, kind, w_shape, declare=lambda: b.parameter(f"{prefix}{i}_weight", w_shape))
    bias_expr = b.parameter(f"{prefix}{i}_bias", (bias_size,)) if bias_size else "None"
    b.assign(i, call(weight, bias_expr), out_shape, [v])


def _conv(b: _Builder, v: _Value, dims: int) -> None:
    kind = f"conv{dims}d"
    i = b.begin()
    cin, sizes = v.shape[1], v.shape[2:]
    groups = b.pick(_group_choices(cin))
    _tag_groups(b, groups, cin)
    cout = _out_channels(b, cin, groups)
    k = b.pick([1, 3])
    stride = b.pick([1, 2])
    dilation = b.pick([1, 2]) if k > 1 else 1
    same = dilation * (k - 1) // 2
    padding = b.pick([p for p in dict.fromkeys([same, 0])
                      if all(_conv_out(n, k, stride, p, dilation) >= 1 for n in sizes)])
    bias = b.pick([True, False])
    pad_text: Any = padding
    if stride == 1 and padding == same and k > 1:
        pad_text = b.pick([padding, "'same'"])
    out_shape = (v.shape[0], cout, *(_conv_out(n, k, stride, padding, dilation) for n in sizes))
    spelling = b.pick(["module", "functional", "functional-keywords"])
    ctor = f"nn.Conv{dims}d(" + _args(cin, cout, k, omit=_DEFAULTS, stride=stride, padding=pad_text,
                                       dilation=dilation, groups=groups, bias=bias) + ")"

    def call(w: str, bias_expr: str) -> str:
        if spelling == "functional":
            return f"F.conv{dims}d({_args(v.name, w, bias_expr, stride, pad_text, dilation, groups)})"
        return f"F.conv{dims}d(" + _args(v.name, w, omit=_DEFAULTS, bias=bias_expr, stride=stride, padding=pad_text,
                                         groups=groups, dilation=dilation) + ")"

    w_shape = (cout, cin // groups) + (k,) * dims
    _weighted_layer(b, i, v, kind, "conv", out_shape, w_shape, cout if bias else None,
                    ctor if spelling == "module" else None, call)
    b.end(kind)


def _conv_transpose2d(b: _Builder, v: _Value) -> None:
    kind = "conv_transpose2d"
    i = b.begin()
    cin, sizes = v.shape[1], v.shape[2:]
    groups = b.pick(_group_choices(cin))
    _tag_groups(b, groups, cin)
    cout = _out_channels(b, cin, groups)
    def fits(k: int, s: int, p: int, op: int) -> bool:
        return all(1 <= _conv_t_out(n, k, s, p, op, 1) <= b.cfg.max_spatial for n in sizes)

    stride = b.pick([s for s in (1, 2) if fits(1, s, 0, 0)] or [1])
    k = b.pick([k for k in (1, 2, 3) if fits(k, stride, 0, 0) or fits(k, stride, (k - 1) // 2, 0)])
    padding = b.pick([p for p in dict.fromkeys([(k - 1) // 2, 0]) if fits(k, stride, p, 0)])
    output_padding = b.pick([op for op in range(stride) if fits(k, stride, padding, op)])
    bias = b.pick([True, False])
    out_shape = (v.shape[0], cout, *(_conv_t_out(n, k, stride, padding, output_padding, 1) for n in sizes))
    ctor = "nn.ConvTranspose2d(" + _args(cin, cout, k, omit=_DEFAULTS, stride=stride, padding=padding,
                                         output_padding=output_padding, groups=groups, bias=bias) + ")"

    def call(w: str, bias_expr: str) -> str:
        return f"F.conv_transpose2d({_args(v.name, w, bias_expr, stride, padding, output_padding, groups)})"

    as_module = b.pick([True, False])
    _weighted_layer(b, i, v, kind, "convt", out_shape, (cin, cout // groups, k, k), cout if bias else None,
                    ctor if as_module else None, call)
    b.end(kind)


def _linear(b: _Builder, v: _Value) -> None:
    i = b.begin()
    fin = v.shape[-1]
    fout = b.pick([f for f in dict.fromkeys([fin, 1, 2, 4, 8, 16, 32]) if f <= b.cfg.max_width])
    bias = b.pick([True, False])
    out_shape = (*v.shape[:-1], fout)
    ctor = f"nn.Linear({_args(fin, fout, omit=_DEFAULTS, bias=bias)})" if b.pick([True, False]) else None
    _weighted_layer(b, i, v, "linear", "fc", out_shape, (fout, fin), fout if bias else None, ctor,
                    lambda w, bias_expr: f"F.linear({v.name}, {w}, {bias_expr})")
    b.end("linear")


def _batch_norm(b: _Builder, v: _Value) -> None:
    i = b.begin()
    c = v.shape[1]
    eps = b.pick([1e-5, 1e-3])
    affine = b.pick([True, False])
    # One draw in eight keeps no running statistics: eval mode then normalizes with the batch's
    # own statistics, which no pass may fold into constants (only when there are several values
    # per channel to take statistics over at every batch size, batch 1 included).
    values_per_sample = math.prod(v.shape[2:])
    batch_stats = b.draw(_below(8)) == 7 and values_per_sample > 1
    spelling = "module" if batch_stats else b.pick(["module", "functional", "functional-keywords"])
    if spelling == "module":
        cls = "BatchNorm2d" if len(v.shape) == 4 else "BatchNorm1d"
        extra = {"track_running_stats": False} if batch_stats else {}
        ctor = f"nn.{cls}({_args(c, omit=_DEFAULTS, eps=eps, affine=affine, **extra)})"
        b.call_module(i, "batch_norm", v, f"bn{i}", ctor, v.shape)
        if batch_stats:
            b.tag("batch_stats_norm")
    else:
        b.tag("functional")
        mean = b.buffer(f"bn{i}_running_mean", (c,))
        var = b.buffer(f"bn{i}_running_var", (c,))
        weight = b.parameter(f"bn{i}_weight", (c,)) if affine else "None"
        bias = b.parameter(f"bn{i}_bias", (c,)) if affine else "None"
        if spelling == "functional":
            call = f"F.batch_norm({_args(v.name, mean, var, weight, bias, False, 0.1, eps)})"
        else:
            call = "F.batch_norm(" + _args(v.name, mean, var, omit=_DEFAULTS, weight=weight, bias=bias,
                                           training=False, eps=eps) + ")"
        b.assign(i, call, v.shape, [v])
    b.end("batch_norm")


def _layer_norm(b: _Builder, v: _Value) -> None:
    i = b.begin()
    count = b.pick([1, len(v.shape) - 1] if len(v.shape) > 2 else [1])
    normalized = tuple(v.shape[-count:])
    eps = b.pick([1e-5, 1e-3])
    affine = b.pick(["both", "none", "weight-only"])
    if b.pick(["module", "functional"]) == "module":
        extra = {"elementwise_affine": affine != "none"}
        if affine == "weight-only":
            extra["bias"] = False
        ctor = f"nn.LayerNorm({_args(list(normalized), omit=_DEFAULTS, eps=eps, **extra)})"
        b.call_module(i, "layer_norm", v, f"ln{i}", ctor, v.shape)
    else:
        b.tag("functional")
        weight = b.parameter(f"ln{i}_weight", normalized) if affine != "none" else "None"
        bias = b.parameter(f"ln{i}_bias", normalized) if affine == "both" else "None"
        b.assign(i, f"F.layer_norm({_args(v.name, _tuple(normalized), weight, bias, eps)})", v.shape, [v])
    b.end("layer_norm")


def _group_norm(b: _Builder, v: _Value) -> None:
    i = b.begin()
    c = v.shape[1]
    # Statistics need more than one value per group (torch refuses otherwise, even in eval).
    groups = b.pick([g for g in _group_choices(c) if math.prod(v.shape[1:]) // g > 1])
    eps = b.pick([1e-5, 1e-3])
    affine = b.pick([True, False])
    if b.pick(["module", "functional"]) == "module":
        ctor = f"nn.GroupNorm({_args(groups, c, omit=_DEFAULTS, eps=eps, affine=affine)})"
        b.call_module(i, "group_norm", v, f"gn{i}", ctor, v.shape)
    else:
        b.tag("functional")
        weight = b.parameter(f"gn{i}_weight", (c,)) if affine else "None"
        bias = b.parameter(f"gn{i}_bias", (c,)) if affine else "None"
        b.assign(i, f"F.group_norm({_args(v.name, groups, weight, bias, eps)})", v.shape, [v])
    b.end("group_norm")


@dataclass(frozen=True)
class _Activation:
    """Spellings of one activation: module constructor, call expressions, in-place forms."""

    ctor: str
    exprs: tuple[str, ...]
    inplace_ctor: str | None = None
    inplace: tuple[str, ...] = ()


_ACTIVATIONS: dict[str, _Activation] = {
    "relu": _Activation("nn.ReLU()", ("F.relu({x})", "torch.relu({x})", "{x}.relu()"), "nn.ReLU(inplace=True)",
                        ("{out} = torch.relu_({x})", "{out} = F.relu({x}, inplace=True)", "{x}.relu_()")),
    "relu6": _Activation("nn.ReLU6()", ("F.relu6({x})", "F.hardtanh({x}, 0.0, 6.0)"), "nn.ReLU6(inplace=True)",
                         ("{out} = F.relu6({x}, inplace=True)",)),
    "hardtanh": _Activation("nn.Hardtanh({lo}, {hi})", ("F.hardtanh({x}, {lo}, {hi})",),
                            "nn.Hardtanh({lo}, {hi}, inplace=True)", ("{out} = F.hardtanh_({x}, {lo}, {hi})",)),
    "silu": _Activation("nn.SiLU()", ("F.silu({x})",), "nn.SiLU(inplace=True)", ("{out} = F.silu({x}, inplace=True)",)),
    "sigmoid": _Activation("nn.Sigmoid()", ("torch.sigmoid({x})", "{x}.sigmoid()"), None,
                           ("{out} = torch.sigmoid_({x})", "{x}.sigmoid_()")),
    "tanh": _Activation("nn.Tanh()", ("torch.tanh({x})", "{x}.tanh()"), None, ("{x}.tanh_()",)),
    "gelu": _Activation("nn.GELU()", ("F.gelu({x})", "F.gelu({x}, approximate='tanh')")),
}


def _activation(b: _Builder, v: _Value, kind: str) -> None:
    spec = _ACTIVATIONS[kind]
    i = b.begin()
    lo, hi = b.pick([(-1.0, 1.0), (0.0, 6.0), (-0.5, 2.0)]) if kind == "hardtanh" else (None, None)
    fill = lambda text: text.replace("{lo}", repr(lo)).replace("{hi}", repr(hi))  # noqa: E731
    options = [("module", spec.ctor)] + [(_style(e), e) for e in spec.exprs]
    if b.cfg.allow_inplace and v.fresh and not v.is_input:
        if spec.inplace_ctor:
            options.append(("inplace-module", spec.inplace_ctor))
        options += [("inplace", s) for s in spec.inplace]
    style, text = b.pick(options)
    text = fill(text)
    if style == "module":
        b.call_module(i, kind, v, f"act{i}", text, v.shape, reusable=False)
    elif style == "inplace-module":
        attr = b.module(f"act{i}", text)
        b.overwrite(v, f"{{out}} = {attr}({{x}})")
    elif style == "inplace":
        b.overwrite(v, text)
    else:
        b.tag(style)
        b.assign(i, text.format(x=v.name), v.shape, [v])
    b.end(kind)


def _binary(b: _Builder, v: _Value, kind: str, partner: _Value | None = None) -> None:
    """``add``/``mul`` of ``v`` with an earlier value of the same shape (a residual), with
    itself (one value, two reads), with a broadcastable value (``(N,C,1,1) * (N,C,H,W)``), or
    with a scalar; or with ``partner`` when given."""
    i = b.begin()
    same = [u for u in reversed(b.values) if u is not v and u.shape == v.shape]
    broadcast = [u for u in reversed(b.values) if u.shape != v.shape and _broadcastable(u.shape, v.shape)]
    scalars = [1.0, -0.5] if kind == "add" else [0.5, 2.0, -1.0]
    other = partner or b.pick([*same, v, *broadcast, *scalars])
    symbol, fn = ("+", "add") if kind == "add" else ("*", "mul")
    if isinstance(other, _Value):
        out_shape = tuple(torch.broadcast_shapes(v.shape, other.shape))
        b.tag("residual" if other in same else "broadcast" if other is not v else "shared_value")
        first, second = (v, other) if b.pick([True, False]) else (other, v)
        second_text = second.name
    else:
        out_shape, first, second, second_text = v.shape, v, None, repr(other)
    inplace_ok = (b.cfg.allow_inplace and first.fresh and not first.is_input and first is not second
                  and out_shape == first.shape)
    options = [f"{{x}} {symbol} {{y}}", f"torch.{fn}({{x}}, {{y}})", f"{{x}}.{fn}({{y}})"]
    if inplace_ok:
        options += [f"{{x}} {symbol}= {{y}}", f"{{x}}.{fn}_({{y}})"]
    text = b.pick(options)
    if "=" in text or f"{fn}_(" in text:
        if second is not None:
            b.use(second)
        b.overwrite(first, text.format(x="{x}", y=second_text))
    else:
        b.tag(_style(text))
        reads = [first] if second is None else [first, second]
        b.assign(i, text.format(x=first.name, y=second_text), out_shape, reads)
    b.end(kind)


def _cat_partners(b: _Builder, v: _Value) -> list[_Value]:
    return [u for u in reversed(b.values) if len(u.shape) == len(v.shape)
            and u.shape[:1] + u.shape[2:] == v.shape[:1] + v.shape[2:] and u.shape[1] + v.shape[1] <= b.cfg.max_width]


def _cat(b: _Builder, v: _Value) -> None:
    i = b.begin()
    partners = _cat_partners(b, v)
    other = b.pick(partners)
    first, second = (v, other) if b.pick([True, False]) else (other, v)
    dim = b.pick([1, 1 - len(v.shape)])
    text = b.pick(["torch.cat([{a}, {b}], dim={d})", "torch.cat(({a}, {b}), {d})", "torch.concat([{a}, {b}], {d})"])
    shape = (v.shape[0], first.shape[1] + second.shape[1], *v.shape[2:])
    b.assign(i, text.format(a=first.name, b=second.name, d=dim), shape, [first, second])
    b.end("cat")


def _split(b: _Builder, v: _Value) -> None:
    i = b.begin()
    c = v.shape[1]
    first = (c + 1) // 2
    dim = b.pick([1, 1 - len(v.shape)])
    text = b.pick([
        "{x}.chunk(2, dim={d})", "torch.chunk({x}, 2, {d})",
        f"torch.split({{x}}, [{first}, {c - first}], dim={{d}})", f"{{x}}.split({first}, {{d}})",
    ])
    names = (f"v{i}_0", f"v{i}_1")
    b.forward(f"{names[0]}, {names[1]} = " + text.format(x=v.name, d=dim))
    b.use(v)
    b.tag(_style(text))
    for name, size in zip(names, (first, c - first)):
        b.values.append(_Value(name, (v.shape[0], size, *v.shape[2:]), fresh=False, contiguous=False))
    b.end("split")


def _pool(b: _Builder, v: _Value, kind: str) -> None:
    i = b.begin()
    dims = len(v.shape) - 2
    sizes = v.shape[2:]
    k = b.pick([k for k in (2, 3) if k <= min(sizes)])
    stride = b.pick(list(dict.fromkeys([k, 1, 2])))
    padding = b.pick([0, 1])
    ceil = b.pick([False, True])
    out_shape = (*v.shape[:2], *(_pool_out(n, k, stride, padding, ceil) for n in sizes))
    keywords: dict[str, Any] = {}
    if ceil:
        keywords["ceil_mode"] = True
    name = "MaxPool" if kind == "max_pool" else "AvgPool"
    if kind == "avg_pool" and padding and b.flag():
        keywords["count_include_pad"] = False
    if b.pick(["module", "functional"]) == "module":
        ctor = f"nn.{name}{dims}d({_args(k, omit=_POOL_DEFAULTS, stride=stride, padding=padding, **keywords)})"
        b.call_module(i, kind, v, f"pool{i}", ctor, out_shape, reusable=False)
    else:
        b.tag("functional")
        fn = f"F.{'max' if kind == 'max_pool' else 'avg'}_pool{dims}d"
        b.assign(i, f"{fn}({_args(v.name, k, stride, padding, **keywords)})", out_shape, [v])
    b.end(kind)


def _adaptive_avg_pool(b: _Builder, v: _Value, size: int | None = None) -> None:
    i = b.begin()
    dims = len(v.shape) - 2
    size = size or b.pick([s for s in (1, 2) if s <= min(v.shape[2:])])
    out_shape = (*v.shape[:2], *(size,) * dims)
    spelling = b.pick(["module", "functional", "functional-tuple"])
    if spelling == "module":
        b.call_module(i, "adaptive_avg_pool", v, f"gap{i}", f"nn.AdaptiveAvgPool{dims}d({size})", out_shape,
                      reusable=False)
    else:
        b.tag("functional")
        arg = size if spelling == "functional" else _tuple((size,) * dims)
        b.assign(i, f"F.adaptive_avg_pool{dims}d({v.name}, {arg})", out_shape, [v])
    b.end("adaptive_avg_pool")


def _flatten(b: _Builder, v: _Value) -> None:
    i = b.begin()
    out_shape = (v.shape[0], math.prod(v.shape[1:]))
    # every spelling keeps the batch generic: -1 or a read of the batch size, never its number
    options = ["module", "torch.flatten({x}, 1)", "{x}.flatten(1)", "{x}.reshape({x}.shape[0], -1)",
               f"{{x}}.reshape(-1, {out_shape[1]})"]
    if v.contiguous:
        options.append("{x}.view({x}.size(0), -1)")
    text = b.pick(options)
    if text == "module":
        b.module(f"flat{i}", "nn.Flatten()")
        text = f"self.flat{i}({{x}})"
    else:
        b.tag(_style(text))
    if "{x}.shape" in text or "{x}.size" in text:
        b.tag("shape_read", "batch_read")
    # A flattened tensor may be a view of its input: never overwrite it in place.
    b.assign(i, text.format(x=v.name), out_shape, [v], fresh=False, contiguous=True)
    b.end("flatten")


#: Flatten only values this small, so a linear layer after it stays small.
_MAX_FEATURES = 1024


def _reshape_targets(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if len(shape) == 4:
        return [(shape[0], shape[1], shape[2] * shape[3])]
    if len(shape) == 3:
        n, c, length = shape
        return [(n, c, a, length // a) for a in range(2, length) if length % a == 0][:2]
    return [(shape[0], shape[1], 1, 1), (shape[0], shape[1], 1)]


def _reshape(b: _Builder, v: _Value) -> None:
    i = b.begin()
    target = b.pick(_reshape_targets(v.shape))
    rest = ", ".join(map(str, target[1:]))
    options = [f"{{x}}.reshape({{n}}, {rest})", f"torch.reshape({{x}}, ({{n}}, {rest}))"]
    if v.contiguous:
        options.append(f"{{x}}.view({{n}}, {rest})")
    if target[2:] == (1, 1):
        options.append("{x}.unsqueeze(-1).unsqueeze(-1)")
    text = b.pick(options)
    batch = b.pick(["-1", *_batch_reads(v)]) if "{n}" in text else ""
    if batch not in ("", "-1"):
        b.tag("shape_read", "batch_read")
    b.tag(_style(text))
    b.assign(i, text.format(x=v.name, n=batch), target, [v], fresh=False, contiguous=True)
    b.end("reshape")


def _permute(b: _Builder, v: _Value) -> None:
    i = b.begin()
    rank = len(v.shape)
    perms = [(0, *p) for p in itertools.permutations(range(1, rank)) if list(p) != list(range(1, rank))]
    perms.sort(key=lambda p: sum(a != c for a, c in zip(p, range(rank))))  # swaps first
    perm = b.pick(perms)
    swapped = [d for d in range(rank) if perm[d] != d]
    options = ["{x}.permute({p})", "torch.permute({x}, ({p}))"]
    if len(swapped) == 2:
        options.append(f"{{x}}.transpose({swapped[0]}, {swapped[1]})")
    text = b.pick(options)
    contiguous = b.flag()
    if contiguous:
        text += ".contiguous()"
    b.tag(_style(text))
    shape = tuple(v.shape[d] for d in perm)
    b.assign(i, text.format(x=v.name, p=", ".join(map(str, perm))), shape, [v], fresh=False, contiguous=contiguous)
    b.end("permute")


def _mean(b: _Builder, v: _Value) -> None:
    i = b.begin()
    rank = len(v.shape)
    dims = b.pick([tuple(range(2, rank)), (-1,)] if rank == 4 else [(-1,)])
    keepdim = b.pick([False, True])
    dim_text = str(dims[0]) if len(dims) == 1 else _tuple(dims)
    text = b.pick(["{x}.mean({d}, keepdim={k})", "torch.mean({x}, dim={d}, keepdim={k})"])
    shape = tuple(1 if (d in dims or d - rank in dims) else n for d, n in enumerate(v.shape)) if keepdim \
        else tuple(n for d, n in enumerate(v.shape) if not (d in dims or d - rank in dims))
    b.tag(_style(text))
    b.assign(i, text.format(x=v.name, d=dim_text, k=keepdim), shape, [v])
    b.end("mean")


# ------------------------------------------------------------------ shapes read at run time
#
# Kinds that compute sizes from the tensors they transform (``x.shape[0]``, ``x.size(-1)``),
# as real models do: flatten-for-the-classifier views, channel shuffles, class tokens
# expanded to the batch, tensors made to match the batch, position terms, splits by computed
# sizes. They tag ``shape_read``, and ``batch_read`` when the batch size itself is read: a
# pass that folds such a read into the example's number specializes the batch, which the
# graph declares dynamic. Every drawn model runs at any batch size (``_build_case`` checks 1,
# 3 and 5), so these models test exactly that.
#
# ``len(x)`` is left out of the spellings: symbolic tracing refuses ``len`` of a traced tensor,
# and torch.export, which capture then falls back to, specializes it, so the batch is kept
# static (tests/test_testing_kit.py::test_len_reads_the_batch_without_specializing_it, xfail).


def _batch_reads(v: _Value) -> list[str]:
    """Spellings of a read of ``v``'s batch size."""
    return [f"{v.name}.shape[0]", f"{v.name}.size(0)"]


def _dim_read(b: _Builder, v: _Value, dim: int) -> str:
    """A read of ``v``'s size at ``dim`` (dims counted from the end when negative)."""
    return b.pick([f"{v.name}.shape[{dim}]", f"{v.name}.size({dim})"])


def _shape_view_targets(b: _Builder, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Views ``_shape_view`` can draw for a value of ``shape``: (name, resulting shape)."""
    n, c = shape[0], shape[1]
    rest = math.prod(shape[1:])
    out: list[tuple[str, tuple[int, ...]]] = []
    if len(shape) > 2 and rest <= _MAX_FEATURES:
        out.append(("batch-flat", (n, rest)))
    if len(shape) == 4:
        out.append(("flatten-view", (n, c, shape[2] * shape[3])))
        out.append(("merge-spatial", (n, c, shape[2] * shape[3])))
        if c % 2 == 0:
            out.append(("channel-shuffle", shape))
    if len(shape) == 3:
        length = shape[2]
        if length % 2 == 0 and 2 * c <= b.cfg.max_width:
            out.append(("fold-length", (n, 2 * c, length // 2)))
        out += [("unflatten", (n, c, a, length // a)) for a in range(2, length) if length % a == 0][:1]
    if len(shape) == 2:
        out.append(("to-image", (n, c, 1, 1)))
        out += [("to-tokens", (n, c // a, a)) for a in (2, 4) if c % a == 0 and c > a][:1]
    return out


def _shape_view(b: _Builder, v: _Value) -> None:
    """A view or reshape whose sizes are read from the tensor: ``x.reshape(x.shape[0], -1)``,
    ``x.view(x.size(0), x.size(1) * 2, -1)``, ``x.flatten(1).view(x.size(0), C, -1)``, a
    channel shuffle (``view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)``)."""
    i = b.begin()
    target, shape = b.pick(_shape_view_targets(b, v.shape))
    x = v.name
    n = b.pick(_batch_reads(v))
    # .view only where the value is laid out for it; a flatten's result can always be split
    method = b.pick(["reshape", "view"]) if v.contiguous else "reshape"
    if target == "batch-flat":
        text = b.pick([f"{x}.{method}({n}, -1)", f"torch.reshape({x}, ({n}, -1))"])
    elif target == "flatten-view":
        flat = b.pick(["method", "module"])
        if flat == "module":
            flat_text = f"{b.module(f'flat{i}', 'nn.Flatten()')}({x})"
        else:
            flat_text = f"{x}.flatten(1)"
        text = f"{flat_text}.view({n}, {b.pick([_dim_read(b, v, 1), str(v.shape[1])])}, -1)"
    elif target == "merge-spatial":
        text = f"{x}.{method}({n}, {_dim_read(b, v, 1)}, {_dim_read(b, v, 2)} * {_dim_read(b, v, 3)})"
    elif target == "channel-shuffle":
        h, w = _dim_read(b, v, 2), _dim_read(b, v, 3)
        text = (f"{x}.{method}({n}, 2, {_dim_read(b, v, 1)} // 2, {h}, {w}).transpose(1, 2)"
                f".reshape({n}, -1, {h}, {w})")
    elif target == "fold-length":
        text = f"{x}.{method}({n}, {_dim_read(b, v, 1)} * 2, -1)"
    elif target == "unflatten":
        text = f"{x}.{method}({n}, {_dim_read(b, v, 1)}, {shape[2]}, -1)"
    elif target == "to-image":
        text = b.pick([f"{x}.{method}({n}, -1, 1, 1)", f"{x}.{method}({n}, {_dim_read(b, v, -1)}, 1, 1)"])
    else:  # to-tokens
        text = f"{x}.{method}({n}, {_dim_read(b, v, -1)} // {shape[2]}, {shape[2]})"
    b.tag("shape_read", "batch_read", _style(text.replace(x, "{x}", 1)))
    # a view may share its input's memory: never overwrite it in place
    b.assign(i, text, shape, [v], fresh=False, contiguous=v.contiguous or target == "channel-shuffle")
    b.end("shape_view")


def _expand_token(b: _Builder, v: _Value) -> None:
    """A learned token expanded to the batch and concatenated, as ViT's class token:
    ``torch.cat([self.tok.expand(x.shape[0], -1, -1), x], dim=1)``."""
    i = b.begin()
    t = b.pick([k for k in (1, 2) if v.shape[1] + k <= b.cfg.max_width])
    token_shape = (1, t, *v.shape[2:])
    tok = b.parameter(f"tok{i}", token_shape)
    n = b.pick(_batch_reads(v))
    rank = len(v.shape)
    keep = ", ".join(["-1"] * (rank - 1))
    expanded = b.pick([
        f"{tok}.expand({n}, {keep})",
        f"{tok}.expand({n}, {', '.join(map(str, token_shape[1:]))})",
        f"{tok}.repeat({n}, {', '.join(['1'] * (rank - 1))})",
        f"torch.broadcast_to({tok}, ({n}, {', '.join(map(str, token_shape[1:]))}))",
    ])
    first, second = (expanded, v.name) if b.pick([True, False]) else (v.name, expanded)
    text = b.pick(["torch.cat([{a}, {b}], dim=1)", "torch.cat(({a}, {b}), 1)"])
    b.tag("shape_read", "batch_read", "functional" if expanded.startswith("torch.") else "method")
    b.assign(i, text.format(a=first, b=second), (v.shape[0], v.shape[1] + t, *v.shape[2:]), [v])
    b.end("expand_token")


def _new_tensor(b: _Builder, v: _Value) -> None:
    """A tensor made to the input's batch, then concatenated, added or multiplied:
    ``torch.cat([x, x.new_ones(x.shape[0], 1, h, w)], 1)``, ``x * x.new_full((x.size(0), c, 1, 1), 2.0)``."""
    i = b.begin()
    x = v.name
    rank = len(v.shape)
    use = b.pick(["cat", "add", "mul"] if v.shape[1] < b.cfg.max_width else ["add", "mul"])
    if use == "cat":
        k = b.pick([k for k in (1, 2) if v.shape[1] + k <= b.cfg.max_width])
        made_shape = (v.shape[0], k, *v.shape[2:])
        fill = b.pick([1.0, 0.0, 0.5])
    else:
        # broadcast over the spatial dims, or over the channels too
        made_shape = (v.shape[0], b.pick([v.shape[1], 1]), *(1,) * (rank - 2))
        fill = b.pick([0.0, 0.5]) if use == "add" else b.pick([1.0, 2.0])
    n = b.pick(_batch_reads(v))
    dims = [n] + [_dim_read(b, v, d) if b.flag() and size == v.shape[d] else str(size)
                  for d, size in enumerate(made_shape) if d > 0]
    # torch's factories take read sizes as one tuple: fx cannot trace torch.zeros(x.size(0), 1)
    sizes = ", ".join(dims)
    named = {1.0: ("new_ones", "ones"), 0.0: ("new_zeros", "zeros")}.get(fill)
    options = [f"{x}.new_full(({sizes}), {fill!r})", f"torch.full(({sizes}), {fill!r}, dtype={x}.dtype)"]
    if named is not None:
        options = [f"{x}.{named[0]}({sizes})", f"{x}.{named[0]}(({sizes}))",
                   f"torch.{named[1]}(({sizes}), dtype={x}.dtype)", *options]
    made = b.pick(options)
    if use == "cat":
        first, second = (x, made) if b.pick([True, False]) else (made, x)
        text, shape = f"torch.cat([{first}, {second}], dim=1)", (v.shape[0], v.shape[1] + made_shape[1], *v.shape[2:])
    else:
        symbol = "+" if use == "add" else "*"
        text, shape = f"{x} {symbol} {made}", v.shape
    b.tag("shape_read", "batch_read", "functional" if made.startswith("torch.") else "method")
    b.assign(i, text, shape, [v])
    b.end("new_tensor")


def _position(b: _Builder, v: _Value) -> None:
    """A position term from ``torch.arange`` over a dim's size, cast to the value's dtype and
    added: ``x + torch.arange(x.shape[-1]).to(x.dtype) * 0.1`` (the last dim, static), or one
    per sample, ``torch.arange(x.size(0)).to(x.dtype).view(-1, 1, 1, 1)`` (the batch)."""
    i = b.begin()
    x = v.name
    rank = len(v.shape)
    over = b.pick([-1, 0])
    size = _dim_read(b, v, over)
    positions = b.pick([f"torch.arange({size}).to({x}.dtype)", f"torch.arange({size}, dtype={x}.dtype)",
                        f"torch.arange({size}, device={x}.device).type_as({x})"])
    if over == 0:
        positions += f".view(-1{', 1' * (rank - 1)})"
        b.tag("batch_read")
    scale = b.pick(["* 0.1", f"/ {_dim_read(b, v, over)}", "module"])
    if scale == "module":
        # a learned scale per position of the last dim (a weight: randomize_ keeps it near +-1)
        weight = b.parameter(f"pos{i}_weight", (v.shape[-1],))
        term = f"{positions} * 0.1 * {weight}"
    else:
        term = f"{positions} {scale}"
    first, second = (x, term) if b.pick([True, False]) else (f"({term})", x)
    b.tag("shape_read", "functional")
    b.assign(i, f"{first} + {second}", v.shape, [v])
    b.end("position")


def _shape_split(b: _Builder, v: _Value) -> None:
    """A split or chunk by sizes computed from the shape: halves
    (``torch.split(x, [x.size(1) // 2, x.size(1) - x.size(1) // 2], 1)``), a leading token and
    the rest (``x.split([1, x.shape[1] - 1], dim=1)``), the last position and the rest."""
    i = b.begin()
    x = v.name
    c = v.shape[1]
    options = ["halves", "first"] if c >= 2 else []
    if c % 2 == 0:
        options += ["split-half", "chunk"]
    if len(v.shape) > 2 and v.shape[-1] >= 2:
        options.append("last")
    how = b.pick(options)
    ch = _dim_read(b, v, 1)
    dim = 1
    if how == "halves":
        text, sizes = f"torch.split({x}, [{ch} // 2, {ch} - {ch} // 2], dim=1)", (c // 2, c - c // 2)
    elif how == "first":
        text, sizes = f"{x}.split([1, {ch} - 1], dim=1)", (1, c - 1)
    elif how == "split-half":
        text, sizes = f"{x}.split({ch} // 2, 1)", (c // 2, c // 2)
    elif how == "chunk":
        text, sizes = b.pick([f"{x}.chunk({ch} // {c // 2}, 1)", f"torch.chunk({x}, {ch} // {c // 2}, dim=1)"]), \
            (c // 2, c // 2)
    else:
        last = _dim_read(b, v, -1)
        text, sizes, dim = f"torch.split({x}, [{last} - 1, 1], dim=-1)", (v.shape[-1] - 1, 1), len(v.shape) - 1
    names = (f"v{i}_0", f"v{i}_1")
    b.forward(f"{names[0]}, {names[1]} = {text}")
    b.use(v)
    b.tag("shape_read", _style(text.replace(x, "{x}", 1)))
    for name, size in zip(names, sizes):
        shape = tuple(size if d == dim else s for d, s in enumerate(v.shape))
        b.values.append(_Value(name, shape, fresh=False, contiguous=False))
    b.end("shape_split")


def _batch_pairs(b: _Builder, v: _Value) -> None:
    """Rows mixed in pairs, with the batch padded to an even size and cut back: arithmetic on
    the batch size (``x.shape[0] % 2``, ``p.shape[0] // 2``) feeding ``pad`` and ``view``::

        p = F.pad(x, (0, 0, 0, x.shape[0] % 2))
        g = p.view(p.shape[0] // 2, 2, c)
        v = (g - g.mean(1, keepdim=True)).reshape(-1, c)[:x.shape[0]]

    ``p``'s batch is the same at batch 1 and 2 (both pad to 2): a dim that depends on the
    batch need not change between two batch sizes."""
    i = b.begin()
    x, rest = v.name, v.shape[1:]
    rest_text = ", ".join(map(str, rest))
    n = b.pick(_batch_reads(v))
    padded, groups = f"v{i}_p", f"v{i}_g"
    if b.pick(["pad", "cat"]) == "pad":
        b.forward(f"{padded} = F.pad({x}, ({'0, 0, ' * len(rest)}0, {n} % 2))")
    else:
        b.forward(f"{padded} = torch.cat([{x}, {x}.new_zeros(({n} % 2, {rest_text}))])")
    b.forward(f"{groups} = {padded}.{b.pick(['view', 'reshape'])}"
              f"({b.pick([f'{padded}.shape[0]', f'{padded}.size(0)'])} // 2, 2, {rest_text})")
    keep = ", ".join(["-1"] * len(rest))
    mixed = b.pick([f"({groups} - {groups}.mean(1, keepdim=True))", f"{groups}.flip(1)",
                    f"{groups}.amax(1, keepdim=True).expand(-1, 2, {keep})"])
    b.tag("shape_read", "batch_read", "functional")
    b.assign(i, f"{mixed}.reshape(-1, {rest_text})[:{n}]", v.shape, [v], fresh=False, contiguous=False)
    b.end("batch_pairs")


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


# --------------------------------------------------------------------------- strategies


def _input_ranks(kinds: Sequence[str]) -> list[int]:
    """Ranks (4: images, 3: sequences, 2: features) on which some allowed kind can start."""
    probe = _Builder(lambda s: None, _Config(tuple(kinds), 1, 16, (torch.float32,), (4, 4), (1, 1), False, False))
    out = []
    for rank in (4, 3, 2):
        v = _Value("x", (1, 4, 4, 4)[:rank], is_input=True)
        probe.values = [v]
        if any(_KINDS[k].applies(probe, v) for k in kinds):
            out.append(rank)
    return out


#: Whether to add another step: three in four, shrinking toward "stop".
_MORE = st.sampled_from((False, True, True, True))


@st.composite
def _step(draw: Callable[[st.SearchStrategy], Any], b: _Builder, first: bool) -> bool:
    """One step: whether to go on (ignored for the first step), then one layer or block.

    Each step is a single hypothesis draw, so the shrinker can delete a whole step and the
    steps after it still line up; returns False when the model is complete.
    """
    if not draw(_MORE) and not first:
        return False
    outer, b.draw = b.draw, draw
    try:
        # The value to transform: the most recent one by default; earlier ones give branches.
        v = b.values[-1 - draw(_below(min(4, len(b.values))))]
        # models required to read shapes draw those kinds four times as often (fewer rejected)
        boost = 4 if b.cfg.require & {"shape_read", "batch_read"} else 1
        families = [([_KINDS[k] for k in kinds], w * boost if f is _SHAPE_READS else w) for kinds, f, w in
                    ((_allowed(b, f, v), f, w) for f, w in _WEIGHTED_FAMILIES) if kinds]
        families += [([extra], w) for extra, w in ((_BLOCK, 3), (_SQUEEZE_EXCITE, 1), (_REUSE, 1))
                     if extra.applies(b, v)]
        if families:
            b.pick(b.weighted(families)).build(b, v)
    finally:
        b.draw = outer
    return True


@st.composite
def _specs(draw: Callable[[st.SearchStrategy], Any], cfg: _Config) -> ModelSpec:
    b = _Builder(draw, cfg)
    dtype = draw(st.sampled_from(cfg.dtypes))
    # Mostly images: the models graphopt compiles are mostly convolutional.
    rank = b.weighted([(r, {4: 6, 3: 2, 2: 2}[r]) for r in _input_ranks(cfg.kinds)])
    batch = draw(st.integers(*cfg.batch))
    shape = (batch, draw(st.integers(1, cfg.max_width)),
             *(draw(st.integers(*cfg.spatial)) for _ in range(rank - 2)))
    input_count = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    b.values = [_Value(name, shape, is_input=True) for name in _input_names(input_count)]
    for index in range(cfg.max_depth):
        if not draw(_step(b, first=index == 0)):
            break
    assume(b.layers)  # e.g. only "split" allowed and a single input channel

    leaves = [v for v in b.values if v.uses == 0 and not v.is_input]
    outputs = leaves if len(leaves) > 1 and draw(st.booleans()) else [b.values[-1]]
    features = set(b.features)
    if len(outputs) > 1:
        features.add("multi_output")
    if any(v not in outputs for v in leaves):
        features.add("dead_value")
    if any(v.uses > 1 for v in b.values):
        features.add("shared_value")
    assume(cfg.require <= features)
    return ModelSpec(
        input_shapes=(shape,) * input_count, dtype=dtype, seed=seed, layers=tuple(b.layers),
        outputs=tuple(v.name for v in outputs), output_shapes=tuple(v.shape for v in outputs),
        features=frozenset(features),
    )


def _check_kinds(ops: Iterable[str] | None) -> tuple[str, ...]:
    if ops is None:
        return OP_KINDS
    kinds = tuple(dict.fromkeys(ops))
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise PropertyTestError(
            f"models(ops=...): unknown op kind(s) {unknown}; choose from {', '.join(OP_KINDS)}"
            if unknown else "models(ops=...) needs at least one op kind"
        )
    return kinds


def model_specs(
    ops: Iterable[str] | None = None,
    max_depth: int = 6,
    max_width: int = 16,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    spatial: tuple[int, int] = (4, 12),
    batch: tuple[int, int] = (1, 2),
    allow_reuse: bool = True,
    allow_inplace: bool = True,
    require: Iterable[str] = (),
) -> st.SearchStrategy[ModelSpec]:
    """Strategy of :class:`ModelSpec` (the drawn structure, before rendering); see :func:`models`."""
    kinds = _check_kinds(ops)
    required = frozenset(require)
    if not required <= set(FEATURES):
        raise PropertyTestError(f"models(require=...): unknown feature(s) {sorted(required - set(FEATURES))}; "
                                f"choose from {', '.join(FEATURES)}")
    if max_depth < 1 or max_width < 1 or not dtypes or not (1 <= spatial[0] <= spatial[1]) \
            or not (1 <= batch[0] <= batch[1]):
        raise PropertyTestError(
            "models(): need max_depth >= 1, max_width >= 1, at least one dtype, and "
            f"1 <= low <= high for spatial and batch; got max_depth={max_depth}, max_width={max_width}, "
            f"dtypes={tuple(dtypes)}, spatial={spatial}, batch={batch}"
        )
    cfg = _Config(kinds, max_depth, max_width, tuple(dtypes), tuple(spatial), tuple(batch), allow_reuse, allow_inplace,
                  required)
    return _specs(cfg)


#: Batch sizes every drawn model also runs at, besides its example's: models are generic over
#: the batch, which graphopt declares dynamic by default (:mod:`graphopt.ir.shapes`).
OTHER_BATCH_SIZES: tuple[int, ...] = (1, 3, 5)


def inputs_at_batch(example_inputs: Sequence[Any], size: int) -> tuple[Any, ...]:
    """``example_inputs`` at batch ``size``: rows repeated or cut (:func:`graphopt.ir.shapes.resize`)
    in every tensor whose dim 0 is the first tensor's, the inputs ``dynamic_shapes="batch"``
    makes dynamic; other inputs as they are."""
    batched = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not batched:
        return tuple(example_inputs)
    batch = batched[0].shape[0]
    return tuple(_resize(x, {0: size}) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch
                 else x for x in example_inputs)


def _build_case(spec: ModelSpec) -> Case:
    case = case_from_code(render(spec), ops=spec.ops, features=spec.features)
    for size in OTHER_BATCH_SIZES:
        try:
            with torch.no_grad():
                outputs = case.module(*inputs_at_batch(case.example_inputs, size))
        except Exception as exc:
            raise _kit_bug(f"raises {type(exc).__name__} at batch {size}: {exc}", case) from exc
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        got = tuple(tuple(o.shape) for o in outputs)
        want = tuple((size, *s[1:]) for s in spec.output_shapes)
        if got != want:
            raise _kit_bug(f"returns shapes {got} at batch {size}, not {want}", case)
    for inputs in verify.verification_inputs(case.example_inputs, synthesize=len(verify.DISTRIBUTIONS)):
        try:
            with torch.no_grad():
                outputs = case.module(*inputs)
        except Exception as exc:
            raise _kit_bug(f"raises {type(exc).__name__}: {exc}", case) from exc
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        shapes = tuple(tuple(o.shape) for o in outputs)
        if shapes != spec.output_shapes:
            raise _kit_bug(f"returns shapes {shapes}, not the tracked {spec.output_shapes}", case)
        # Weights are scaled to keep values of order one, but products of products can still
        # overflow (float16 first) on the inputs verification synthesizes (up to 100x larger);
        # such models test overflow, not passes.
        assume(all(bool(torch.isfinite(o).all()) for o in outputs))
    return case


def _kit_bug(what: str, case: Case) -> PropertyTestError:
    return PropertyTestError(
        f"graphopt.testing generated a model that {what}: models are valid by construction, so this "
        f"is a bug in the testing kit; please report it with this model:\n{case.code}"
    )


def models(
    ops: Iterable[str] | None = None,
    max_depth: int = 6,
    max_width: int = 16,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    spatial: tuple[int, int] = (4, 12),
    batch: tuple[int, int] = (1, 2),
    allow_reuse: bool = True,
    allow_inplace: bool = True,
    require: Iterable[str] = (),
) -> st.SearchStrategy[Case]:
    """Strategy of :class:`Case`: random valid models with seeded weights and finite inputs.

    ``ops``: op kinds to draw from (default all of :data:`OP_KINDS`); ``max_depth``: at most
    this many steps, each adding one layer or a small block (conv[-norm][-activation][+residual],
    or a squeeze-excite gate); ``max_width``: at most this many channels/features per value;
    ``dtypes``: model dtypes to draw from (float16 works on CPU for every kind here);
    ``spatial``: range of input heights/widths/lengths; ``batch``: range of the example's batch
    size (1 and 2 by default, so the second size graphopt checks a dynamic batch at is drawn
    both above and below it);
    ``allow_reuse``: a module called at two sites and weights tied between layers;
    ``allow_inplace``: in-place spellings (``torch.relu_``, ``x += y``, ``nn.ReLU(inplace=True)``)
    on values nothing else reads; ``require``: only models with all these :data:`FEATURES`,
    e.g. ``("batch_read",)`` for models that read their batch size (``x.reshape(x.shape[0], -1)``).

    Every model runs at every batch size (checked at 1, 3 and 5): nothing spells the example's
    batch as a number, and about a third of the models read shapes at run time
    (``x.view(x.size(0), x.size(1) * 2, -1)``, a class token ``expand``-ed to ``x.shape[0]``,
    ``x.new_ones(x.shape[0], k)``, ``torch.arange(x.shape[-1])``, splits by computed sizes),
    features ``shape_read`` and ``batch_read``.
    """
    specs = model_specs(ops, max_depth, max_width, dtypes, spatial, batch, allow_reuse, allow_inplace, require)
    return specs.map(_build_case)
