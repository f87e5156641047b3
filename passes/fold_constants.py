"""``fold-constants``: evaluate once, at compile time, everything that depends only on constants.

A value is *constant* when it is a parameter or buffer read by ``get_attr``, a literal, or the
result of a pure op whose inputs are all constant; with ``fold_shapes`` also a shape query
(``x.shape[1]``, ``x.size(1)``, ``len(x)``, ``x.dim()``, ``x.numel()``, ``x.dtype``) answered by
the input's recorded ``tensor_meta``. Every maximal constant subgraph is evaluated once under
``torch.no_grad`` and each *boundary* value (a constant read by a non-constant node or by the
graph output) is replaced:

- a tensor by one new buffer (``requires_grad=False``, same dtype and memory format) named after
  its source: ``blocks.0.scale * 2`` becomes buffer ``blocks_0_scale_folded``;
- a Python value by a literal of the same type: ``x.shape[1] * 2`` becomes the int ``6`` in the
  ``reshape`` arguments, never a tensor.

The folded subgraph's nodes are erased; the parameters they read stay on the module until
``eliminate-dead-code`` removes the ones nothing reads any more.

Never folded (each candidate is listed in the report with the reason):

- random ops and anything computed from them: ``F.dropout``/``torch.dropout`` with training set,
  ``torch.bernoulli``, ``w.bernoulli()``, ``normal_``, ``rand*``, training-mode dropout modules;
- in-place or mutating ops, and every value that a node anywhere in the graph writes in place
  (a buffer updated with ``add_`` is not constant, nor are its aliases and readers);
- side effects, ``call_module`` (opaque modules), quantize/dequantize ops (the backend needs them);
- a result larger than its budget: ``max_bytes``, by default the larger of 64 KiB and the bytes
  of the parameters the folded subgraph reads and nothing else still needs, so
  ``w.expand(2000, 2000)`` stays an expand and a large ``w.t()`` is not stored twice when ``w``
  itself is read elsewhere: after ``eliminate-dead-code`` the model grows by at most 64 KiB per
  folded tensor;
- a shape query about a dynamic dimension. Folding a shape bakes the *example input's* size into
  the model, so the dims the graph declared dynamic at capture (the batch by default, see
  :mod:`graphopt.ir.shapes`), and every dim of every value that depends on them, are never
  folded: through canonical ops by their shape rules, through any other op (views, permutes)
  by running the graph at the dynamic dims' second sizes and seeing which dims change. A
  graph captured with ``dynamic_shapes="static"`` folds every shape, and refuses other sizes
  when called. ``fold_shapes=False`` folds no shape of a non-constant at all.

- a ``torch.Size`` that would reach the output or Python-level code (the graph spells it as a
  plain tuple); as a shape argument of a torch op it is folded.

State dict: the result's ``state_dict()`` holds the folded buffers under their new names
(``<source>_folded``) next to the originals; after ``eliminate-dead-code`` the originals that
nothing reads are gone, so a checkpoint of the unoptimized model no longer loads into it. The
report records the mapping (figure ``folded_buffers``: new name -> source parameters) and the
byte counts (``bytes_before``, ``bytes_after``, ``bytes_no_longer_read``). The folded values are
computed from the parameters as they are *now*: after changing a parameter of the source model,
capture and fold again (folding is eager, never cached lazily).

A folded value returned directly by the graph is the same buffer object on every call, where the
unfolded graph returned a fresh tensor; a caller that writes into that output in place changes
the next call's result.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Annotated, Any

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import graph as G
from graphopt.ir import ops, purity, shapes
from graphopt.pipeline.options import Range

#: Smallest budget per folded tensor when ``max_bytes`` is unset.
DEFAULT_MIN_BUDGET = 64 * 1024

_LITERAL_TYPES = (bool, int, float, complex, str, type(None), torch.dtype, torch.device, torch.layout,
                  torch.memory_format)
#: Shape queries answered from a non-constant tensor's metadata (``x.size(1)``, ``x.shape``).
_SHAPE_METHODS = ("size", "dim", "ndimension", "numel", "nelement")
_SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype")


@graphopt.register_pass("fold-constants", contract=graphopt.Exact(), after=("canonicalize",))
def fold_constants(
    gm: fx.GraphModule,
    ctx: graphopt.PassContext,
    *,
    fold_shapes: bool = True,
    max_bytes: Annotated[int | None, Range(ge=0, why="bytes per folded tensor")] = None,
) -> int:
    """Evaluate constant subgraphs once and store their results as buffers or literals.

    Options: ``fold_shapes`` folds static shape queries (``x.size(1)``) to Python values;
    the dynamic dims the graph recorded at capture stay symbolic; ``max_bytes``
    caps each folded tensor (default: max(64 KiB, bytes of parameters the fold lets go)).
    Returns the number of values folded.
    """
    bytes_before = G.param_bytes(gm)
    read_before = _read_attributes(gm)
    analysis = _ConstantAnalysis(gm, ctx, fold_shapes=fold_shapes)
    analysis.run()
    boundaries = _choose_boundaries(gm, analysis.values, ctx, max_bytes)

    dead_before = {n for n in gm.graph.nodes if not n.users}
    added: dict[str, list[str]] = {}  # new buffer -> the parameters it was computed from
    folded = 0
    for node in boundaries:
        if not ctx.may_rewrite(f"fold {node.name}"):
            continue
        value = analysis.values[node]
        if isinstance(value, torch.Tensor):
            leaves = _cone(node, analysis.values)
            name = _replace_with_buffer(gm, node, value, leaves, analysis.values)
            if name is not None:
                added[name] = [str(leaf.target) for leaf in leaves]
        else:
            _replace_with_literal(node, value)
        folded += 1
    for node in reversed(list(gm.graph.nodes)):  # what the folds left unread (all of it pure)
        foldable = node in analysis.values or node in analysis.partial_shapes
        if foldable and not node.users and node not in dead_before:
            gm.graph.erase_node(node)

    _report(gm, ctx, bytes_before, read_before, added)
    return folded


# --------------------------------------------------------------------------- analysis


class _ConstantAnalysis:
    """One forward walk over the graph: which nodes are constant, and their values.

    ``values`` maps every constant node to its value; ``dynamic`` maps every tensor node to
    the set of its dims that depend on a dynamic input dim (None: any of them may).
    """

    def __init__(self, gm: fx.GraphModule, ctx: graphopt.PassContext, *, fold_shapes: bool):
        self.gm, self.ctx = gm, ctx
        self.fold_shapes = fold_shapes
        self.values: dict[fx.Node, Any] = {}
        self.dynamic: dict[fx.Node, frozenset[int] | None] = {}
        self.partial_shapes: dict[fx.Node, tuple[int | None, ...]] = {}
        self.written = purity.written_values(gm)
        # the dynamic dims recorded at capture (graphopt.ir.shapes), per placeholder
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.declared = dict(zip(placeholders, shapes.dynamic_dims_of_inputs(gm)))
        self.any_dynamic = any(self.declared.values())
        self._varying: Any = None  # dims seen to vary between two runs, for ops of unknown shape rules

    def run(self) -> None:
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                self._visit(node)
                if node not in self.values:
                    self.dynamic[node] = self._dynamic_dims_of(node)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            writer = self.written.get(node)
            if writer is not None:
                if any(user is not writer for user in node.users):  # read besides being written
                    self.ctx.decline(node, f"not folded: {node.target} is written in place by {writer.name}")
                return
            value = G.get_attr_value(self.gm, node)
            if isinstance(value, torch.Tensor) or _is_literal(value):
                self.values[node] = value
            return
        if node.op not in ("call_function", "call_method"):
            return  # placeholders, call_module (opaque) and the output are never constant
        inputs = node.all_input_nodes
        if not all(i in self.values for i in inputs):
            if self.fold_shapes:
                self._visit_shape_query(node)
            return
        reason = self._refusal(node)
        if reason is not None:
            self.ctx.decline(node, f"not folded: {reason}")
            return
        try:
            self.values[node] = _evaluate(node, self.values)
        except Exception as exc:  # an op that fails on its constant inputs stays in the graph
            self.ctx.decline(node, f"not folded: evaluating it raised {type(exc).__name__}: {exc}")

    def _refusal(self, node: fx.Node) -> str | None:
        if node in self.written:
            return f"its value is written in place by {self.written[node].name}"
        reason = purity.is_impure(node, self.gm)
        if reason is not None:
            return reason
        if _is_quantization_op(node):
            return "quantize/dequantize ops are kept for the backend"
        return None

    # ----------------------------------------------------------------- shapes

    def _visit_shape_query(self, node: fx.Node) -> None:
        """Answer ``x.shape``, ``x.size(d)``, ``len(x)``, ``x.dim()``, ``x.numel()``, ``x.dtype``
        and ``shape[d]`` for a non-constant ``x`` from its metadata, where the dim is static."""
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.partial_shapes:
            dims, index = self.partial_shapes[node.args[0]], node.args[1]
            if isinstance(index, int) and -len(dims) <= index < len(dims):
                self._set_dim(node, dims, index, node.args[0].args[0])
            return
        query = _shape_query(node)
        if query is None:
            return
        subject, what, dim = query
        tm = G.tensor_meta(subject)
        if tm is None:
            return
        if subject in self.written:  # resize_, unsqueeze_, t_ ... change the shape the metadata shows
            self.ctx.decline(node, f"not folded: {subject.name} is written in place by {self.written[subject].name}")
            return
        dynamic = self.dynamic.get(subject, frozenset())
        if dynamic is None:  # after an op without a shape rule here (view, permute, ...): watch it vary
            dynamic = self.varying().get(subject)
        rank = len(tm.shape)
        dims = tuple(None if dynamic is None or d in dynamic else int(s) for d, s in enumerate(tm.shape))
        if what == "rank":
            self.values[node] = rank
        elif what == "dtype":
            self.values[node] = tm.dtype
        elif what == "dim":
            if isinstance(dim, int) and -rank <= dim < rank:
                self._set_dim(node, dims, dim, subject)
        elif None not in dims:
            self.values[node] = torch.Size(dims) if what == "shape" else math.prod(dims)
        elif what == "shape":
            self.partial_shapes[node] = dims
        else:
            self.ctx.decline(node, f"not folded: {subject.name} has dynamic dims")

    def _set_dim(self, node: fx.Node, dims: tuple[int | None, ...], index: int, subject: fx.Node) -> None:
        if dims[index] is None:
            self.ctx.decline(node, f"not folded: dim {index % len(dims)} of {subject.name} is dynamic")
        else:
            self.values[node] = dims[index]

    def _dynamic_dims_of(self, node: fx.Node) -> frozenset[int] | None:
        """Dims of a non-constant tensor that may vary with the dynamic input dims."""
        if not self.any_dynamic:
            return frozenset()
        if node.op == "placeholder":
            return self.declared.get(node, frozenset())
        inputs = [i for i in node.all_input_nodes if i not in self.values]
        if all(self.dynamic.get(i, frozenset()) == frozenset() for i in inputs):
            return frozenset()
        if any(not _is_tensor_node(i) for i in inputs):
            # a number computed from a dynamic size (pad by x.shape[0] % 2, view(n // 2, ...)) may
            # set any dim of the result, in ways two runs can miss (1 and 2 both pad to 2 rows):
            # every dim of the result is dynamic
            tm = G.tensor_meta(node)
            return frozenset(range(len(tm.shape))) if tm is not None else None
        return _propagate_dynamic_dims(node, inputs, self.dynamic)

    def varying(self) -> dict[fx.Node, frozenset[int] | None]:
        """Per node, the dims that differ between runs at the example's sizes and at the second
        sizes of the declared dynamic dims (:func:`graphopt.ir.shapes.varying_dims`); empty when
        the graph declares none or the run fails (every dim then counts as dynamic)."""
        if self._varying is None:
            self._varying = shapes.varying_dims(self.gm, self.ctx.example_inputs, _execute) or {}
        return self._varying


def _execute(gm: fx.GraphModule, inputs: Any, observe: Any) -> Any:
    with torch.no_grad(), G.preserved_state(gm):
        return G.execute(gm, [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs], observe=observe)


def _is_tensor_node(node: fx.Node) -> bool:
    """Whether ``node``'s recorded value is a tensor (shape propagation records its type)."""
    kind = node.meta.get("type")
    return isinstance(kind, type) and issubclass(kind, torch.Tensor)


def _propagate_dynamic_dims(node: fx.Node, inputs: list[fx.Node],
                            dynamic: dict[fx.Node, frozenset[int] | None]) -> frozenset[int] | None:
    """Dims of a canonical op's output that may depend on dynamic input dims.

    Canonical ops (conv, linear, norms, activations, pools, arithmetic, cat) keep the rank of their
    largest input and compute output dim ``d`` from input dims at ``d`` counted from the right
    (broadcasting), so the union of those is a safe over-approximation; ``flatten`` merges a range.
    Any other op: every dim may be dynamic (None).
    """
    spec = ops.spec_of(node)
    out_meta = G.tensor_meta(node)
    if spec is None or out_meta is None:
        return None
    if spec.name == "flatten":
        source = ops.arg(node, "input")
        in_meta, in_dynamic = G.tensor_meta(source), dynamic.get(source, frozenset())
        if in_meta is None or in_dynamic is None or len(in_meta.shape) == 0:
            return None
        rank = len(in_meta.shape)
        start, end = ops.arg(node, "start_dim") % rank, ops.arg(node, "end_dim") % rank
        return frozenset(d if d < start else start if d <= end else d - (end - start) for d in in_dynamic)
    out_rank = len(out_meta.shape)
    dims: set[int] = set()
    for source in inputs:
        in_meta, in_dynamic = G.tensor_meta(source), dynamic.get(source, frozenset())
        if in_meta is None or in_dynamic is None or len(in_meta.shape) > out_rank:
            return None
        dims.update(d + out_rank - len(in_meta.shape) for d in in_dynamic)
    return frozenset(dims)


def _shape_query(node: fx.Node) -> tuple[fx.Node, str, Any] | None:
    """(subject, kind, dim) for a shape query node: kind is shape, dim, rank, count or dtype."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    subject = node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1:2] and node.args[1] in _SHAPE_ATTRIBUTES:
        return subject, {"shape": "shape", "ndim": "rank", "dtype": "dtype"}[node.args[1]], None
    if node.op == "call_function" and node.target is len:
        return subject, "dim", 0
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        if node.target == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return subject, ("shape" if dim is None else "dim"), dim
        return subject, ("rank" if node.target in ("dim", "ndimension") else "count"), None
    return None


# --------------------------------------------------------------------------- boundaries


def _choose_boundaries(gm: fx.GraphModule, values: dict[fx.Node, Any], ctx: graphopt.PassContext,
                       max_bytes: int | None) -> list[fx.Node]:
    """Constant nodes read by non-constant nodes or the output, that fit their budget.

    A rejected boundary stays computed at run time, which makes its own constant inputs
    boundaries (and the parameters it reads stay in the model); repeat until every boundary
    is acceptable. Rejected nodes are removed from ``values``.
    """
    while True:
        boundaries = [n for n in values if n.op != "get_attr" and any(u not in values for u in n.users)]
        kept = _kept_storages(gm, values)
        rejected = False
        for node in boundaries:
            reason = _cannot_fold(node, values, kept, max_bytes)
            if reason is not None:
                ctx.decline(node, f"not folded: {reason}")
                del values[node]
                rejected = True
        if not rejected:
            return boundaries


def _cannot_fold(node: fx.Node, values: dict[fx.Node, Any], kept: set[int], max_bytes: int | None) -> str | None:
    """Why the boundary ``node`` cannot be replaced by its value, or None.

    The default budget of a folded tensor is the larger of 64 KiB and the bytes of the
    parameters it is computed from that folding lets go (those no non-folded node reads), so
    the model grows by at most 64 KiB per folded tensor: ``x @ w.t()`` folds when ``w`` is read
    nowhere else, but does not duplicate a large ``w`` that another op still reads.
    """
    value = values[node]
    if isinstance(value, torch.Tensor):
        size = value.numel() * value.element_size()
        sources = [values[leaf] for leaf in _cone(node, values) if isinstance(values[leaf], torch.Tensor)]
        released = _bytes_of([t for t in sources if t.untyped_storage().data_ptr() not in kept])
        budget = max_bytes if max_bytes is not None else max(DEFAULT_MIN_BUDGET, released)
        if size > budget:
            return (f"result is {size} bytes, over the budget of {budget} bytes "
                    + ("(max_bytes)" if max_bytes is not None else
                       f"(max(64 KiB, {released} bytes of parameters folding lets go); raise max_bytes to fold it)"))
        return None
    if not _is_literal(value):
        return f"its value, a {type(value).__name__}, is neither a tensor nor a Python literal"
    for user in node.users:
        if user.op == "call_method" and user.args and user.args[0] is node:
            return f"a literal cannot be the receiver of method {user.target!r}"
        if isinstance(value, torch.Size) and not _takes_shapes(user):
            # the graph code spells a torch.Size literal as a plain tuple
            return f"this torch.Size would reach {user.name} as a plain tuple"
    return None


def _takes_shapes(user: fx.Node) -> bool:
    """Does ``user`` only pass its arguments to torch as shapes (where a tuple is as good as a
    torch.Size), rather than return them or work on them as Python sequences?"""
    if user.op == "call_method":
        return True
    module = getattr(user.target, "__module__", None) or ""
    return user.op == "call_function" and module.split(".")[0] == "torch"


def _kept_storages(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> set[int]:
    """Storages that stay in the model whatever is folded: parameters read by a node that is
    not folded, and everything an opaque module holds."""
    tensors = [values[n] for n in values if n.op == "get_attr" and any(u not in values for u in n.users)]
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            tensors += [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _cone(node: fx.Node, values: dict[fx.Node, Any]) -> list[fx.Node]:
    """The ``get_attr`` nodes a constant node is computed from, in graph order."""
    seen, stack, leaves = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen or current not in values:
            continue
        seen.add(current)
        if current.op == "get_attr":
            leaves.append(current)
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(leaves, key=order.__getitem__)


def _bytes_of(tensors: list[Any]) -> int:
    """Bytes of the storages behind ``tensors`` (each storage once; non-tensors count 0)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())


def _buffer_name_hint(node: fx.Node, leaves: list[fx.Node]) -> str:
    """Name a folded value after the parameters it is computed from: ``blocks.0.scale`` ->
    ``blocks_0_scale_folded``, ``blocks.0.scale`` and ``blocks.0.bias`` ->
    ``blocks_0_scale_bias_folded``; more than three -> the module path and the node name; none
    (a value computed from shapes or literals) -> the node's provenance."""
    if not leaves:
        return f"{node.meta.get('provenance', node.name)}_folded"
    paths = [str(leaf.target).split(".") for leaf in leaves]
    module_path = os.path.commonprefix([p[:-1] for p in paths])
    fields = [".".join(p[len(module_path):]) for p in paths] if len(paths) <= 3 else [node.name]
    return ".".join([*module_path, "_".join(fields)]) + "_folded"


# --------------------------------------------------------------------------- rewriting


def _replace_with_buffer(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, leaves: list[fx.Node],
                         values: dict[fx.Node, Any]) -> str | None:
    """Point every user of ``node`` at a buffer holding ``value`` (computed from the parameters
    read by ``leaves``); returns the new buffer's name, or None when ``value`` is one of those
    parameters itself, which is then reused."""
    for leaf in leaves:
        if values[leaf] is value:  # e.g. w.contiguous() of a contiguous w
            node.replace_all_uses_with(leaf)
            return None
    name = G.add_constant(gm, _buffer_name_hint(node, leaves), value.detach().clone())
    with gm.graph.inserting_before(node):
        buffer = gm.graph.get_attr(name)
    if "tensor_meta" in node.meta:
        buffer.meta["tensor_meta"] = node.meta["tensor_meta"]
    G.copy_provenance(buffer, node)
    node.replace_all_uses_with(buffer)
    return name


def _replace_with_literal(node: fx.Node, value: Any) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def _report(gm: fx.GraphModule, ctx: graphopt.PassContext, bytes_before: int, read_before: set[str],
            added: dict[str, list[str]]) -> None:
    ctx.record("bytes_before", bytes_before)
    ctx.record("bytes_after", G.param_bytes(gm))
    unread = sorted(read_before - _read_attributes(gm))
    ctx.record("bytes_no_longer_read", sum(_attr_bytes(gm, name) for name in unread))
    ctx.record("folded_buffers", added)
    if added or unread:
        ctx.note(
            f"state_dict: {len(added)} folded buffer(s) added ({', '.join(added) or '-'}); "
            f"no longer read, removed by eliminate-dead-code: {', '.join(unread) or '-'}"
        )


# --------------------------------------------------------------------------- helpers




def _evaluate(node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    if node.op == "call_method":
        receiver, *rest = args
        return getattr(receiver, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)


def _is_literal(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return isinstance(value, _LITERAL_TYPES)


def _is_quantization_op(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return "quantize" in str(name)


def _attr_bytes(gm: fx.GraphModule, name: str) -> int:
    tensor = G.get_attr_value(gm, name)
    return tensor.numel() * tensor.element_size()


def _read_attributes(gm: fx.GraphModule) -> set[str]:
    """Qualified names of the parameters and buffers some ``get_attr`` node reads."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return {name for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()) if name in read}
