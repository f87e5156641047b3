"""Dynamic dimensions: which input dims a graph must stay generic over, and the inputs that prove it.

A captured graph is meant to equal its model at every input shape the model accepts, not only
at the example's. The dims allowed to vary are declared at capture (``dynamic_shapes=``):

- ``"batch"`` (the default): dim 0 of the first tensor input, and of every other tensor input
  whose dim 0 has the same size, all one dim named ``batch``;
- ``"static"`` (or ``None``): no dim varies; passes may specialize on every size and the graph
  refuses other shapes;
- per input, as ``torch.export`` reads them: a sequence with one entry per positional input, or
  a dict by ``forward`` parameter name, each entry ``None`` (static) or a dict
  ``{dim: name}``, where the name is a string or a ``torch.export.Dim`` (whose ``min``/``max``
  are respected). Dims that share a name always have the same size.

The declaration is recorded on the graph's placeholders (``node.meta["graphopt_dims"]``: the
example's shape with ``None`` at dynamic dims, the dims' names, and the reasons for dims that
were asked to be dynamic but could not be), so it travels with every copy of the graph and
every pass sees it. :func:`resized_inputs` builds the second-size inputs that capture, each
verification and lowering check the graph on; :func:`check_call` is the guard a graph module
runs on each call, refusing a static dim of another size with an :class:`InputError` that
names the dim instead of answering wrongly.

The second size of a dim is 1 when the example's is larger, else 2 (so batch-1 examples are
checked at batch 2), kept inside a ``Dim``'s bounds.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.errors import InputError

META_KEY = "graphopt_dims"
BATCH = "batch"


@dataclasses.dataclass(frozen=True)
class InputDims:
    """What one graph input accepts: its example shape, the names of its dynamic dims
    (dim -> name) and, for dims asked to be dynamic that could not be, the reason."""

    shape: tuple[int, ...]
    dynamic: dict[int, str]
    bounds: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    static_reasons: dict[int, str] = dataclasses.field(default_factory=dict)

    def expected(self) -> tuple[int | None, ...]:
        return tuple(None if d in self.dynamic else s for d, s in enumerate(self.shape))


# ------------------------------------------------------------------------------ declaring


def normalize(spec: Any, inputs: Sequence[Any], names: Sequence[str] = ()) -> list[dict[int, Any]]:
    """The user's ``dynamic_shapes`` as one ``{dim: name or Dim}`` per positional input.

    ``names`` are the forward's parameter names of the inputs, for a spec given as a dict.
    Raises :class:`InputError` for a spec that does not fit the inputs.
    """
    if isinstance(spec, str) and spec not in (BATCH, "static"):
        raise InputError(f"dynamic_shapes={spec!r}: use 'batch' (the default), 'static', or per-input dims "
                         "such as ({0: 'batch', 1: 'seq'},)")
    if spec == BATCH:
        batched = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
        size = batched[0].shape[0] if batched else None
        return [{0: BATCH} if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == size else {}
                for x in inputs]
    if spec is None or spec == "static":
        return [{} for _ in inputs]
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise InputError(f"dynamic_shapes names {', '.join(map(repr, unknown))}, which are not inputs of the "
                             f"model (its inputs: {', '.join(names) or 'none'}); key the dict by forward's parameter names")
        entries = [spec.get(name) for name in list(names)[:len(inputs)]]
        entries += [None] * (len(inputs) - len(entries))
    elif isinstance(spec, (list, tuple)):
        if len(spec) != len(inputs):
            raise InputError(f"dynamic_shapes has {len(spec)} entries for {len(inputs)} inputs; give one per "
                             "positional input (None for an input with no dynamic dim)")
        entries = list(spec)
    else:
        raise InputError(f"dynamic_shapes must be 'batch', 'static', a sequence or a dict, not {type(spec).__name__}")
    out = []
    for i, (entry, x) in enumerate(zip(entries, inputs)):
        where = f"dynamic_shapes entry {names[i] if i < len(names) else i}"
        if entry is None:
            out.append({})
            continue
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected None or a dict {{dim: name}}, got {type(entry).__name__}")
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{where}: the input is a {type(x).__name__}, not a tensor; it has no dims")
        dims = {}
        for dim, name in entry.items():
            if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
                raise InputError(f"{where}: dim {dim!r} is not a dim of a {x.dim()}-d input")
            if not isinstance(name, str) and not _is_export_dim(name):
                raise InputError(f"{where}: dim {dim} must be named by a string or a torch.export.Dim, not {name!r}")
            dims[dim % x.dim()] = name
        out.append(dims)
    return out


def _is_export_dim(value: Any) -> bool:
    return hasattr(value, "__name__") and hasattr(value, "min") and hasattr(value, "max")


def _dim_name(value: Any) -> str:
    return value if isinstance(value, str) else str(value.__name__)


def build(inputs: Sequence[Any], dims: Sequence[dict[int, Any]],
          static_reasons: dict[str, str] | None = None) -> list[InputDims | None]:
    """One :class:`InputDims` per input (None for a non-tensor) from :func:`normalize`'s dims;
    names listed in ``static_reasons`` are static, with their reason."""
    static_reasons = static_reasons or {}
    out: list[InputDims | None] = []
    for x, entry in zip(inputs, dims):
        if not isinstance(x, torch.Tensor):
            out.append(None)
            continue
        dynamic, reasons, bounds = {}, {}, {}
        for dim, value in entry.items():
            name = _dim_name(value)
            if name in static_reasons:
                reasons[dim] = static_reasons[name]
                continue
            dynamic[dim] = name
            if _is_export_dim(value):
                bounds[name] = (int(getattr(value, "min", 0) or 0), finite(getattr(value, "max", None)))
        out.append(InputDims(tuple(int(s) for s in x.shape), dynamic, bounds, reasons))
    return out


def declare(graph: fx.Graph, recorded: Sequence[InputDims | None]) -> None:
    """Record ``recorded`` (from :func:`build`) on ``graph``'s placeholders, in order."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, d in zip(placeholders, recorded):
        if d is None:
            node.meta.pop(META_KEY, None)
        else:
            node.meta[META_KEY] = d


def finite(value: Any) -> int | None:
    """``value`` as an int, or None for an unbounded one (torch's int_oo, sympy's oo, None)."""
    try:
        value = int(value)
    except Exception:  # noqa: BLE001 - torch's unbounded int_oo, None, ...
        return None
    return value if value < 2**62 else None


def input_dims(gm: Any) -> list[InputDims | None]:
    """The recorded :class:`InputDims` of each placeholder (None: nothing recorded); a list of
    them is returned as it is."""
    if isinstance(gm, list):
        return gm
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    return [n.meta.get(META_KEY) for n in graph.nodes if n.op == "placeholder"]


def is_declared(gm: fx.GraphModule | fx.Graph) -> bool:
    return any(d is not None for d in input_dims(gm))


def dynamic_names(gm: fx.GraphModule | fx.Graph) -> dict[str, int]:
    """Each dynamic dim's name -> its size in the example."""
    sizes: dict[str, int] = {}
    for d in input_dims(gm):
        if d is not None:
            for dim, name in d.dynamic.items():
                sizes.setdefault(name, d.shape[dim])
    return sizes


def dynamic_dims_of_inputs(gm: fx.GraphModule | fx.Graph) -> list[frozenset[int]]:
    """The dynamic dims of each placeholder (empty for static or unrecorded inputs)."""
    return [frozenset(d.dynamic) if d is not None else frozenset() for d in input_dims(gm)]


def describe(gm: fx.GraphModule | fx.Graph) -> list[str]:
    """One line per input: its shape with dynamic dims by name, and dims made static, with why."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    lines = []
    for node in graph.nodes:
        if node.op != "placeholder" or META_KEY not in node.meta:
            continue
        d: InputDims = node.meta[META_KEY]
        shape = "x".join(_named(d, i, s) for i, s in enumerate(d.shape)) or "scalar"
        line = f"{node.target}: {shape}"
        for dim, reason in d.static_reasons.items():
            line += f"; dim {dim} kept static at {d.shape[dim]}: {reason}"
        lines.append(line)
    return lines


def _named(d: InputDims, dim: int, size: int) -> str:
    name = d.dynamic.get(dim)
    if name is None:
        return str(size)
    low, high = d.bounds.get(name, (0, None))
    if high is None:
        return name if low <= 1 else f"{name}(>={low})"
    return f"{name}({low}..{high})"


# ------------------------------------------------------------------------------ second sizes


def second_size(size: int, bounds: tuple[int, int | None] | None = None) -> int:
    """The size a dynamic dim is also checked at: 1 below a larger example, else 2 (the
    cheapest sizes that still tell a specialized graph from a generic one), within ``bounds``."""
    low, high = bounds if bounds is not None else (0, None)
    low = max(low, 1)
    candidates = [1, size + 2, size + 1, 2, 3] if size > 1 else [2, 3]
    for c in candidates:
        if c != size and c >= low and (high is None or c <= high):
            return c
    return size


def resize(x: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """``x`` with dim ``d`` of size ``sizes[d]``: its slices repeated or cut (values stay ones a
    real input has: token ids stay ids, masks stay masks)."""
    for dim, n in sizes.items():
        have = x.shape[dim]
        if have == n:
            continue
        if have == 0:
            shape = list(x.shape)
            shape[dim] = n
            x = x.new_zeros(shape)
            continue
        if n > have:
            reps = [1] * x.dim()
            reps[dim] = -(-n // have)
            x = x.repeat(*reps)
        x = x.narrow(dim, 0, n)
    return x.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def sizes_for(gm: fx.GraphModule | fx.Graph, only: str | None = None) -> dict[str, int]:
    """The second size of each dynamic dim name (or of ``only``)."""
    out: dict[str, int] = {}
    for d in input_dims(gm):
        if d is None:
            continue
        for dim, name in d.dynamic.items():
            if name not in out and (only is None or name == only):
                out[name] = second_size(d.shape[dim], d.bounds.get(name))
    return out


def resized_inputs(gm: fx.GraphModule | fx.Graph, inputs: Sequence[Any],
                   sizes: dict[str, int] | None = None) -> tuple[Any, ...] | None:
    """``inputs`` with every dynamic dim at its second size (``sizes`` by name overrides), or
    None when the graph has no dynamic dim."""
    sizes = sizes if sizes is not None else sizes_for(gm)
    if not sizes:
        return None
    out = []
    dims = input_dims(gm)
    for i, x in enumerate(inputs):
        d = dims[i] if i < len(dims) else None
        if d is None or not isinstance(x, torch.Tensor) or not d.dynamic:
            out.append(x)
            continue
        out.append(resize(x, {dim: sizes[name] for dim, name in d.dynamic.items() if name in sizes}))
    return tuple(out)


def label(sizes: dict[str, int]) -> str:
    """How verification names the second-size inputs: ``example at batch=1, seq=3``."""
    return "example at " + ", ".join(f"{k}={v}" for k, v in sizes.items())


def is_resized_label(text: str) -> bool:
    return text.startswith("example at ")


# ------------------------------------------------------------------------------ the guard


def check_call(graph: fx.Graph, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> None:
    """Refuse inputs whose static dims differ from the example's, or whose dims sharing a name
    differ from one another, with an :class:`InputError` naming the dim and the way out."""
    seen: dict[str, tuple[int, str]] = {}
    placeholders = graph.find_nodes(op="placeholder")
    values = list(args) + [(kwargs or {}).get(str(n.target)) for n in placeholders[len(args):]]
    for node, value in zip(placeholders, values):
        d = node.meta.get(META_KEY)
        if d is None or type(value) not in _PLAIN:  # fake and functional tensors: a tracer's call
            continue
        if value.dim() != len(d.shape):
            raise InputError(f"input {node.target!r} has {value.dim()} dims ({_fmt(value.shape)}); the graph was "
                             f"captured with {len(d.shape)} ({_fmt(d.shape)})")
        for dim, (want, got) in enumerate(zip(d.shape, value.shape)):
            name = d.dynamic.get(dim)
            if name is None:
                if want != got:
                    why = d.static_reasons.get(dim, "not declared dynamic")
                    raise InputError(
                        f"input {node.target!r} dim {dim} is {got}, but the graph is specialized to {want} at that "
                        f"dim ({why}); pass inputs of shape {_fmt(d.expected())}, or capture again with the dim "
                        f"declared dynamic, e.g. dynamic_shapes={{{node.target!r}: {{{dim}: {BATCH if dim == 0 else f'd{dim}'!r}}}}}"
                    )
                continue
            low, high = d.bounds.get(name, (0, None))
            if got < low or (high is not None and got > high):
                raise InputError(
                    f"input {node.target!r} dim {dim} ({name}) is {got}, outside the sizes the graph was captured for "
                    f"({low} to {high if high is not None else 'any'}); the model constrains it there (torch.export's "
                    "range), so pass a size in that range"
                )
            first = seen.setdefault(name, (got, f"{node.target}[{dim}]"))
            if first[0] != got:
                raise InputError(f"input {node.target!r} dim {dim} ({name}) is {got} but {first[1]}, the same "
                                 f"dynamic dim {name!r}, is {first[0]}; dims that share a name take one size")


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _fmt(shape: Iterable[Any]) -> str:
    return "x".join("?" if s is None else str(s) for s in shape) or "scalar"


# ------------------------------------------------------------------------------ per-node dims


def varying_dims(gm: fx.GraphModule, inputs: Sequence[Any],
                 execute: Callable[..., Any]) -> dict[fx.Node, frozenset[int] | None] | None:
    """For every tensor node, the dims whose size at the second sizes, or at a third, larger
    size of each dynamic dim, differs from its recorded ``tensor_meta`` (the example's); None
    for a node whose rank changed or that has no record. Two sizes besides the example's,
    because one can agree with it by coincidence (a batch padded to an even count has 2 rows
    at batch 1 and at batch 2). None when the graph has no dynamic dim or a run fails."""
    second = sizes_for(gm)
    if not second:
        return None
    dims = input_dims(gm)
    third = {}
    for name, size in dynamic_names(dims).items():
        low, high = input_dims_bounds(dims, name) or (0, None)
        candidates = [c for c in (size + second[name] + 4, size + 3, size + 1) if high is None or c <= high]
        third[name] = candidates[0] if candidates else second[name]
    out: dict[fx.Node, frozenset[int] | None] = {}

    def observe(node: fx.Node, value: Any) -> None:
        meta = node.meta.get("tensor_meta")
        if out.get(node, frozenset()) is None:
            return
        if isinstance(value, torch.Tensor) and hasattr(meta, "shape") and len(meta.shape) == value.dim():
            changed = frozenset(i for i, (p, q) in enumerate(zip(meta.shape, value.shape)) if p != q)
            out[node] = out.get(node, frozenset()) | changed
        else:
            out[node] = None

    try:
        for sizes in (second, third):
            execute(gm, resized_inputs(gm, inputs, sizes), observe=observe)
    except Exception:  # noqa: BLE001 - the caller then treats every dim as possibly dynamic
        return None
    return out


# ------------------------------------------------------------------------------ torch.export


def export_spec(gm: Any, inputs: Sequence[Any], *, max_size: int | None = None) -> tuple[tuple[Any, ...], Any]:
    """The inputs and ``dynamic_shapes`` that export a graph's dynamic dims with ``torch.export``.

    One ``torch.export.Dim`` per name, shared by every dim of that name, with the declared
    bounds (``max_size`` caps unbounded dims, for runtimes that plan memory ahead). Export
    specializes dims of size 0 or 1, so where the example has one the inputs returned have
    that dim at its second size. ``dynamic_shapes`` is None when nothing is dynamic.
    """
    dims = input_dims(gm)
    made: dict[str, Any] = {}
    spec = []
    for d in dims:
        entry = {}
        for dim, name in (d.dynamic.items() if d is not None else ()):
            if name not in made:
                low, high = d.bounds.get(name, (0, None))
                high = high if high is not None else max_size
                bounds = {"min": max(low, 0)} | ({"max": high} if high is not None else {})
                made[name] = torch.export.Dim(name, **bounds)
            entry[dim] = made[name]
        spec.append(entry or None)
    if not made:
        return tuple(inputs), None
    spec += [None] * (len(inputs) - len(spec))
    small = {name: second_size(size, input_dims_bounds(dims, name)) for name, size in dynamic_names(dims).items()
             if size < 2}
    traced_at = resized_inputs(dims, inputs, small) if small else tuple(inputs)
    return traced_at, tuple(spec[:len(inputs)])


def input_dims_bounds(dims: list[InputDims | None], name: str) -> tuple[int, int | None] | None:
    return next((d.bounds[name] for d in dims if d is not None and name in d.bounds), None)


def declare_checked(gm: fx.GraphModule, inputs: Sequence[Any], spec: Any, run: Callable[[Any], Any]) -> None:
    """Record ``spec``'s dynamic dims on a graph module that has none recorded (one captured
    elsewhere); ``run(inputs)`` runs it, and dims at which it fails are recorded static with
    the error."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    dims = normalize(spec, inputs, names)
    declare(gm.graph, build(inputs, dims))
    sizes = sizes_for(gm)
    if not sizes:
        return
    try:
        run(resized_inputs(gm, inputs))
    except Exception as exc:  # noqa: BLE001 - the graph may raise anything
        where = ", ".join(f"{k}={v}" for k, v in sizes.items())
        reason = f"the graph raised {type(exc).__name__} at {where}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        declare(gm.graph, build(inputs, dims, {n: reason for n in sizes}))


def forward_parameter_names(module: torch.nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
