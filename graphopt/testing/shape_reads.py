"""Layer kinds that read shapes at run time.

Kinds that compute sizes from the tensors they transform (``x.shape[0]``, ``x.size(-1)``),
as real models do: flatten-for-the-classifier views, channel shuffles, class tokens
expanded to the batch, tensors made to match the batch, position terms, splits by computed
sizes. They tag ``shape_read``, and ``batch_read`` when the batch size itself is read: a
pass that folds such a read into the example's number specializes the batch, which the
graph declares dynamic. Every drawn model runs at any batch size (``_build_case`` checks 1,
3 and 5), so these models test exactly that.

``len(x)`` is left out of the spellings: symbolic tracing refuses ``len`` of a traced tensor,
and torch.export, which capture then falls back to, specializes it, so the batch is kept
static (tests/test_testing_kit.py::test_len_reads_the_batch_without_specializing_it, xfail).
"""
from __future__ import annotations

import math

from graphopt.testing.builder import _MAX_FEATURES, _batch_reads, _Builder, _style, _Value


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
