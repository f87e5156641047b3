"""Layer kinds: how one layer of each op kind is drawn and spelled.

Convolutions, linear layers, norms, activations, ``add``/``mul``, ``cat``/``split``, pooling,
``flatten``/``reshape``/``permute`` and ``mean``, each in its module, functional, method and
in-place spellings. Kinds that read sizes at run time are in
:mod:`graphopt.testing.shape_reads`; the table of kinds is :mod:`graphopt.testing.kinds`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from graphopt.testing.builder import (
    _DEFAULTS, _POOL_DEFAULTS, _args, _batch_reads, _below, _broadcastable, _Builder, _conv_out, _conv_t_out,
    _pool_out, _style, _tuple, _Value,
)


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
