"""Channel rules for the ops that move data between dims without computing on it: ``cat``,
``split`` / ``chunk`` and ``getitem``, ``size`` / ``shape`` reads, ``permute`` / ``transpose``,
and ``flatten`` / ``view`` / ``reshape`` / ``squeeze`` / ``unsqueeze`` (with the literal sizes a
cut rewrites)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch.fx as fx

from graphopt.channels.propagation import _meta_shapes, _op_key, _Propagation, _Size
from graphopt.channels.records import Fixed, Labels, _ArgUpdate
from graphopt.ir import ops


def _cat(p: _Propagation, node: fx.Node) -> None:
    tensors, dim = ops.arg(node, "tensors"), ops.arg(node, "dim")
    parts = [p.labels(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
    shapes = [_meta_shapes(t) if isinstance(t, fx.Node) else None for t in tensors or ()]
    if any(x is None for x in parts) or not isinstance(dim, int):
        return p.unknown(node)
    rank = len(parts[0])
    dim = dim % rank
    out: Labels = []
    for d in range(rank):
        if d == dim:
            if all(isinstance(x[d], Fixed) for x in parts):
                out.append(Fixed("concatenation of fixed dims"))
                continue
            pieces = []
            for x, shape in zip(parts, shapes):
                row = x[d]
                if isinstance(row, Fixed):  # a fixed piece keeps its indices
                    row = p.fresh(shape[d])
                    p.freeze(row, node, f"concatenated with a dimension that cannot change ({x[d].why})")
                pieces.append(row)
            out.append(np.concatenate(pieces))
        else:
            row = parts[0][d]
            for x in parts[1:]:
                row = p.unify(row, x[d], node)
            out.append(row)
    p.set(node, out)


def _split(p: _Propagation, node: fx.Node) -> None:
    key = _op_key(node)
    x_node = node.args[0]
    x = p.labels(x_node)
    shapes = _meta_shapes(node)
    size_arg = ops.call_arg(node, "split_size_or_sections" if key == "split" else "chunks", 1)
    if key == "split" and size_arg is None:
        size_arg = node.kwargs.get("split_size")
    dim = ops.call_arg(node, "dim", 2, 0)
    if x is None or not isinstance(dim, int) or not shapes or not isinstance(shapes[0], tuple):
        return p.unknown(node)
    dim = dim % len(x)
    row = x[dim]
    sizes = [s[dim] for s in shapes]
    pieces: list[Any] = []
    if isinstance(row, Fixed):
        pieces = [row] * len(sizes)
    elif key == "split" and isinstance(size_arg, (list, tuple)) and all(isinstance(s, int) for s in size_arg):
        bounds = np.cumsum([0] + sizes)
        pieces = [row[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
        arg_index = 1 if len(node.args) > 1 else None

        def apply(kept: Callable[[np.ndarray], int], node=node, pieces=pieces, arg_index=arg_index) -> None:
            new = [kept(piece) for piece in pieces]
            _set_call_arg(node, arg_index, "split_size_or_sections", new)

        p.arg_updates.append(_ArgUpdate(node, f"split sections of {node.name}",
                                        [(f"{node.name}.section{i}", piece) for i, piece in enumerate(pieces)], apply))
    elif isinstance(size_arg, int) and len(set(sizes)) == 1:
        # chunk / even split: index i of every piece is one unit, so every piece keeps as many
        pieces = [row[i * sizes[0]:(i + 1) * sizes[0]] for i in range(len(sizes))]
        for piece in pieces[1:]:
            p.unify(pieces[0], piece, node)
        if key == "split":
            def apply(kept: Callable[[np.ndarray], int], node=node, first=pieces[0]) -> None:
                _set_call_arg(node, 1 if len(node.args) > 1 else None, "split_size_or_sections", kept(first))

            p.arg_updates.append(_ArgUpdate(node, f"split size of {node.name}",
                                            [(f"{node.name}.split_size", pieces[0])], apply))
    else:
        p.freeze(row, node, f"{key} into uneven or computed pieces")
        pieces = [Fixed(f"uneven {key}")] * len(sizes)
    p.set(node, tuple([*x[:dim], piece, *x[dim + 1:]] for piece in pieces))


def _set_call_arg(node: fx.Node, index: int | None, name: str, value: Any) -> None:
    if index is not None:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        key = name if name in kwargs else next(k for k in ("split_size_or_sections", "split_size") if k in kwargs)
        kwargs[key] = value
        node.kwargs = kwargs


def _getitem(p: _Propagation, node: fx.Node) -> None:
    source, index = node.args[0], node.args[1]
    value = p.values.get(source) if isinstance(source, fx.Node) else None
    if isinstance(value, tuple) and isinstance(index, int):
        p.set(node, value[index])
    elif isinstance(value, _Size) and isinstance(index, int):
        rows = p.labels(value.source)
        if rows is not None:
            p.freeze(rows[index], node, f"the channel count of {value.source.name} is read as a number")
        p.set(node, None)
    elif isinstance(value, list):
        p.unknown(node)  # tensor indexing
    else:
        p.set(node, p.fixed_value(node, f"element of {source}"))


def _size(p: _Propagation, node: fx.Node) -> None:
    source = node.args[0]
    key = _op_key(node)
    if key == "getattr" and node.args[1] != "shape":
        if node.args[1] in ("dtype", "device", "ndim"):
            return p.set(node, None)
        return p.unknown(node)
    dim = ops.call_arg(node, "dim", 1) if key == "size" else None
    rows = p.labels(source)
    if isinstance(dim, int):
        if rows is not None:
            p.freeze(rows[dim], node, f"the channel count of {source.name} is read as a number (size({dim}))")
        p.set(node, None)
    else:
        p.set(node, _Size(source))


def _permute(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0])
    if x is None:
        return p.unknown(node)
    key = _op_key(node)
    if key == "transpose":
        d0, d1 = ops.call_arg(node, "dim0", 1), ops.call_arg(node, "dim1", 2)
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return p.unknown(node)
        perm = list(range(len(x)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = node.args[1:] if node.op == "call_method" else (node.args[1:] or (node.kwargs.get("dims"),))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims) or len(dims) != len(x):
            return p.unknown(node)
        perm = [d % len(x) for d in dims]
    p.set(node, [x[d] for d in perm])


def _reshape(p: _Propagation, node: fx.Node) -> None:
    x_node = node.args[0]
    x, in_shape, out_shape = p.labels(x_node), _meta_shapes(x_node), _meta_shapes(node)
    if x is None or not isinstance(in_shape, tuple) or not isinstance(out_shape, tuple):
        return p.unknown(node)
    segments = _segments(in_shape, out_shape)
    if segments is None:
        return p.unknown(node)
    out: Labels = [Fixed("reshaped dim")] * len(out_shape)
    for in_dims, out_dims in segments:
        labeled = [d for d in in_dims if isinstance(x[d], np.ndarray)]
        if not labeled:
            continue
        if len(labeled) > 1:
            for d in labeled:
                p.freeze(x[d], node, f"{_op_key(node)} merges two channel dims")
            continue
        d = labeled[0]
        mapped = _map_segment(p, x[d], d, in_dims, out_dims, in_shape, out_shape)
        if mapped is None:
            p.freeze(x[d], node, f"{_op_key(node)} {in_shape} -> {out_shape} splits channels in a way "
                                 "that does not map onto whole output indices")
            continue
        j, row = mapped
        out[j] = row
    if _op_key(node) in ("view", "reshape"):
        _reshape_sizes(p, node, out)
    p.set(node, out)


def _segments(ins: Sequence[int], outs: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into runs of input and output dims with equal products."""
    if 0 in ins or 0 in outs:
        return None
    segments, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        si, sj, pi, pj = i, j, 1, 1
        if i < len(ins):
            pi, i = ins[i], i + 1
        if j < len(outs):
            pj, j = outs[j], j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                pi, i = pi * ins[i], i + 1
            elif pj < pi and j < len(outs):
                pj, j = pj * outs[j], j + 1
            else:
                return None
        segments.append((list(range(si, i)), list(range(sj, j))))
    return segments


def _map_segment(p: _Propagation, row: np.ndarray, d: int, in_dims: list[int], out_dims: list[int],
                 in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, np.ndarray] | None:
    """The output dim carrying input dim ``d``'s channels and its row, or None.

    Flat index f of the segment holds input index ``(f // inner_d) % size_d`` of dim d.
    An output dim j that spans dim d entirely (merge, e.g. flatten) carries
    ``row[((t * inner_j) // inner_d) % size_d]`` at its index t. If dim d is split across
    several output dims, the outermost piece j carries it: every block of ``inner_j // inner_d``
    consecutive indices of d becomes one unit.
    """
    inner_d = math.prod(in_shape[k] for k in in_dims if k > d)
    size_d = in_shape[d]
    span_d = inner_d * size_d
    for j in out_dims:
        inner_j = math.prod(out_shape[k] for k in out_dims if k > j)
        size_j = out_shape[j]
        if size_j == 1 and size_d > 1:
            continue
        if inner_j <= inner_d and inner_d % inner_j == 0 and (inner_j * size_j) % span_d == 0:
            t = np.arange(size_j)
            return j, row[((t * inner_j) // inner_d) % size_d]
        if inner_j * size_j == span_d and inner_j % inner_d == 0:
            block = inner_j // inner_d
            p.coarsen(row, block)
            return j, row[::block]
    return None


def _reshape_sizes(p: _Propagation, node: fx.Node, out: Labels) -> None:
    """Record how to rewrite the literal sizes of a view/reshape whose channel dims shrink."""
    if node.op == "call_method":
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    else:
        sizes, packed = [ops.call_arg(node, "shape", 1)], True
    if packed:
        sizes = list(sizes[0])
    if len(sizes) != len(out):
        for row in out:
            p.freeze(row, node, "reshape sizes do not match the output rank")
        return
    rewrites = []
    for j, row in enumerate(out):
        if not isinstance(row, np.ndarray) or sizes[j] == -1:
            continue
        if isinstance(sizes[j], int):
            rewrites.append((j, row))
        else:
            p.freeze(row, node, f"size {j} of {node.name} is computed at run time; cannot prove it follows "
                                "the pruned channels")
    if not rewrites:
        return

    def apply(kept: Callable[[np.ndarray], int], node=node, rewrites=rewrites) -> None:
        if node.op == "call_method":
            current = list(node.args[1:])
            if len(current) == 1 and isinstance(current[0], (tuple, list)):
                new = list(current[0])
                for j, row in rewrites:
                    new[j] = kept(row)
                node.args = (node.args[0], type(current[0])(new))
            else:
                for j, row in rewrites:
                    current[j] = kept(row)
                node.args = (node.args[0], *current)
        else:
            shape = list(ops.call_arg(node, "shape", 1))
            for j, row in rewrites:
                shape[j] = kept(row)
            _set_call_arg(node, 1 if len(node.args) > 1 else None, "shape", tuple(shape))

    p.arg_updates.append(_ArgUpdate(node, f"sizes of {node.name}",
                                    [(f"{node.name}.size{j}", row) for j, row in rewrites], apply))
