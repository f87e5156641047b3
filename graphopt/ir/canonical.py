"""Rewrite an FX graph into the canonical form passes match on.

:func:`canonicalize` is what capture runs after tracing and what the ``canonicalize`` pass
runs on any GraphModule:

1. Standard ``nn`` layers called as ``call_module`` become the functional calls their forward
   makes (:data:`graphopt.ir.lowerings.MODULE_LOWERINGS`), reading parameters through ``get_attr`` nodes
   with qualified names. A node whose ``meta["keep_module"]`` is true (a user leaf) stays.
2. aten ``convolution`` and ``addmm(bias, x, w.t())`` become conv/conv-transpose and ``linear``;
   so does ``addmm(bias, x, W)`` with a constant ``W`` only it reads (GPT-2's ``Conv1D``), its
   attribute then stored transposed.
3. Every spelling in :data:`graphopt.ir.aliases.ALL_ALIASES` becomes the canonical callable with all
   parameters positional, values normalized (:func:`graphopt.ir.aliases.normalize_value`), string
   conv padding resolved to numbers where it is symmetric.
4. Dropout with ``training=False`` is removed.

In-place spellings become out-of-place only where nobody can observe the difference: the
written tensor is not (a view of) a graph input, a parameter/buffer or an opaque module's
output, and no other node reads it, or a view of it, afterwards. Otherwise the in-place node
is left as it is, a side effect (see :func:`graphopt.ir.purity.mutated_values`).

One in-place spelling is canonical: the activation of a conv/linear fusion unit
(:func:`graphopt.ir.ops.fused_activation_op`). ``fuse-conv-bn-relu`` writes it in place on purpose, since the
conv's output is a fresh tensor only the activation reads, and eager runs then save an
allocation per layer (fresh, page-faulted memory for large outputs). Rewriting it out of place
here would undo that, and the next
fusion would redo it, so a pipeline repeating both would never settle.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.ir import aliases, lowerings, ops, specs
from graphopt.ir.graph import get_attr_value, tensor_meta, tensor_metadata
from graphopt.ir.purity import may_alias_input

aten = torch.ops.aten

MayRewrite = Callable[[str], bool]
Decline = Callable[[fx.Node, str], None]

_CALLS = ("call_function", "call_method", "call_module")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def canonicalize(
    gm: fx.GraphModule,
    *,
    may_rewrite: MayRewrite | None = None,
    decline: Decline | None = None,
) -> int:
    """Rewrite ``gm`` in place into canonical form; returns the number of rewrites made.

    ``may_rewrite(where)`` is asked before each rewrite (False skips it: the pass manager's
    rewrite budget); ``decline(node, reason)`` hears about spellings left alone on purpose.
    Running it twice changes nothing the second time.
    """
    count = canonicalize_graph(gm.graph, gm, may_rewrite=may_rewrite, decline=decline)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def canonicalize_graph(
    graph: fx.Graph,
    module: nn.Module,
    *,
    may_rewrite: MayRewrite | None = None,
    decline: Decline | None = None,
    ensure_shapes: Callable[[], None] | None = None,
) -> int:
    """:func:`canonicalize` on a bare ``graph`` whose attributes and submodules live in
    ``module``, without linting or recompiling (capture builds its GraphModule once, at the end).

    Shape metadata is read only for in-place spellings and aten structures; when the graph has
    none yet, ``ensure_shapes()`` is called (once, on the graph as it is at that point) the
    first time some is needed, so graphs that need none are never run for it.
    """
    rewriter = _Rewriter(module, graph, may_rewrite or (lambda where: True),
                         decline or (lambda node, reason: None), ensure_shapes)
    count = rewriter.lower_modules()
    count += rewriter.rewrite_aten_structures()
    count += rewriter.collapse_aliases()
    ensure_provenance(graph)
    return count


def ensure_provenance(gm: fx.GraphModule | fx.Graph) -> None:
    """Give every node without provenance its own: the attribute path or the node's name."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    for node in graph.nodes:
        if "provenance" not in node.meta:
            node.meta["provenance"] = str(node.target) if node.op == "get_attr" else node.name


class _Rewriter:
    def __init__(self, module: nn.Module, graph: fx.Graph, may_rewrite: MayRewrite, decline: Decline,
                 ensure_shapes: Callable[[], None] | None):
        self.module = module
        self.graph = graph
        self.may_rewrite = may_rewrite
        self.decline = decline
        self._ensure_shapes = ensure_shapes

    def _shapes_needed(self) -> None:
        """Have shape metadata recorded on the graph, if it is not there yet."""
        if self._ensure_shapes is not None:
            ensure, self._ensure_shapes = self._ensure_shapes, None
            ensure()

    def _shape(self, value: Any) -> tuple[int, ...] | None:
        if not isinstance(value, fx.Node):
            return None
        if value.op == "get_attr":
            obj = get_attr_value(self.module, value)
            return tuple(obj.shape) if isinstance(obj, torch.Tensor) else None
        self._shapes_needed()
        tm = tensor_meta(value)
        return tuple(tm.shape) if tm is not None else None

    def _rank(self, value: Any) -> int | None:
        shape = self._shape(value)
        return len(shape) if shape is not None else None

    def _allowed(self, node: fx.Node, what: str) -> bool:
        where = node.meta.get("provenance", node.name)
        return self.may_rewrite(f"{what} at {node.name} ({where})")

    # -- 1. modules ---------------------------------------------------------------------------

    def lower_modules(self) -> int:
        count = 0
        for node in list(self.graph.nodes):
            if node.op != "call_module" or node.meta.get("keep_module"):
                continue
            if len(node.args) != 1 or node.kwargs:
                continue  # every lowerable layer takes exactly one input
            steps = lowerings.lowering_for(self.module.get_submodule(node.target))
            if steps is None or not self._allowed(node, f"inline {node.target}"):
                continue
            self._inline(node, steps)
            count += 1
        return count

    def _inline(self, node: fx.Node, steps: tuple[lowerings.Step, ...]) -> None:
        with self.graph.inserting_before(node):
            value = emit_lowering(self.graph, steps, node.args[0], str(node.target), node.meta)
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)

    # -- 2. aten structures -------------------------------------------------------------------

    def rewrite_aten_structures(self) -> int:
        count = 0
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.convolution.default:
                count += self._convolution(node)
            elif node.target in (aten.addmm.default, torch.addmm):
                count += self._addmm_as_linear(node)
            elif node.target is aten.sym_size.int:
                count += self._size_method(node)
        return count

    def _size_method(self, node: fx.Node) -> int:
        """``aten.sym_size.int(x, d)`` (torch.export's read of a dynamic size) -> ``x.size(d)``:
        the spelling symbolic capture records, which fold-constants reads and TorchScript
        scripts."""
        if not self._allowed(node, "aten.sym_size -> size"):
            return 0
        with self.graph.inserting_before(node):
            size = self.graph.call_method("size", tuple(node.args), dict(node.kwargs))
        size.meta.update(node.meta)
        node.replace_all_uses_with(size)
        self.graph.erase_node(node)
        return 1

    def _convolution(self, node: fx.Node) -> int:
        bound = _bind_schema(node)
        rank = self._rank(bound.get("weight"))
        if rank not in (3, 4, 5) or not isinstance(bound.get("transposed"), bool):
            return 0
        if not self._allowed(node, "aten.convolution -> conv"):
            return 0
        n = rank - 2
        b = bound
        if b["transposed"]:
            node.target = _CONV_TRANSPOSE[n]
            node.args = (b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["output_padding"],
                         b["groups"], b["dilation"])
        else:
            node.target = _CONV[n]
            node.args = (b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"], b["groups"])
        node.kwargs = {}
        return 1

    def _addmm_as_linear(self, node: fx.Node) -> int:
        """``addmm(b, x, w.t())`` with unit scales is ``linear(x, w, b)`` (the same kernel).

        So is ``addmm(b, x, W)`` with ``W`` a constant ``(in, out)`` matrix, as transformers'
        ``Conv1D`` (GPT-2's projections) computes: ``linear(x, W.T, b)``, reading ``W.T``
        (``(out, in)``, as linear's weight is; a parameter if ``W`` is one, ``requires_grad``
        kept) from a new attribute beside ``W`` named ``<W's name>_t``, so that passes matching
        ``linear`` (int8 units, pruning) see it. ``W`` itself is left as it is (the model
        captured from still reads it); nothing reads it afterwards, and ``eliminate-dead-code``
        drops it. Only where this node is ``W``'s one reader: a weight read elsewhere too (tied,
        or by an opaque module) would be stored twice, so it is left as ``addmm``, with a decline.
        """
        b = _bind_addmm(node)
        if b is None or b.get("beta", 1) != 1 or b.get("alpha", 1) != 1 or not isinstance(b["mat2"], fx.Node):
            return 0
        mat2 = b["mat2"]
        if self._rank(b["self"]) != 1:
            return 0
        if mat2.op == "get_attr":
            return self._constant_addmm_as_linear(node, b, mat2)
        is_t = mat2.op == "call_function" and (mat2.target is aten.t.default or (
            mat2.target is aten.permute.default and list(mat2.args[1]) in ([1, 0], [-1, -2])))
        if not is_t:
            return 0
        weight = mat2.args[0]
        if self._rank(weight) != 2:
            return 0
        if not self._allowed(node, "aten.addmm -> linear"):
            return 0
        node.target, node.args, node.kwargs = F.linear, (b["mat1"], weight, b["self"]), {}
        if not mat2.users:
            self.graph.erase_node(mat2)
        return 1

    def _constant_addmm_as_linear(self, node: fx.Node, b: dict[str, Any], weight: fx.Node) -> int:
        value = get_attr_value(self.module, weight)
        if not (isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point()):
            return 0
        target = str(weight.target)
        readers = [n for n in self.graph.nodes if n is not weight and (
            (n.op == "get_attr" and str(n.target) == target)
            or (n.op == "call_module" and target.startswith(f"{n.target}.")))]
        readers += [user for user in weight.users if user is not node]
        if readers:
            self.decline(node, f"addmm's weight {target} is read elsewhere too (by {readers[0].name}): linear would "
                               "need it stored a second time, transposed, so it is left as addmm")
            return 0
        if not self._allowed(node, "addmm with a constant weight -> linear"):
            return 0
        owner_name, _, field = target.rpartition(".")
        owner = self.module.get_submodule(owner_name) if owner_name else self.module
        name, i = f"{field}_t", 1
        while hasattr(owner, name):
            name, i = f"{field}_t{i}", i + 1
        transposed = value.detach().t().contiguous()
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, nn.Parameter(transposed, requires_grad=value.requires_grad))
        else:
            owner.register_buffer(name, transposed)
        weight.target = f"{owner_name}.{name}" if owner_name else name
        if "tensor_meta" in weight.meta:
            weight.meta["tensor_meta"] = tensor_metadata(transposed)
        node.target, node.args, node.kwargs = F.linear, (b["mat1"], weight, b["self"]), {}
        return 1

    # -- 3./4. aliases, values, no-ops --------------------------------------------------------

    def collapse_aliases(self) -> int:
        count = 0
        order: dict[fx.Node, int] = {}
        settled: set[tuple[Any, ...]] = set()  # spellings found canonical already, see _spelling
        for node in list(self.graph.nodes):
            alias = aliases.alias_of(node)
            if alias is None:
                continue
            spelling = _spelling(node)
            if spelling in settled or ops.fused_activation_op(node) is not None:
                continue
            bound = aliases.bind_alias(alias, node.args, dict(node.kwargs))
            args = aliases.canonical_args(alias, bound) if bound is not None else None
            if args is None:
                continue
            args = self._normalize(alias.op, args)
            if alias.op == "dropout" and args[alias.spec.index["training"]] is False:
                count += self._remove_noop(node, bound[alias.params[0]])
                continue
            if node.op == "call_function" and node.target is alias.spec.target and not node.kwargs \
                    and _same(node.args, args):
                if spelling is not None:
                    settled.add(spelling)
                continue
            if alias.first_output and not _only_first_output_used(node):
                continue
            writes = aliases.writes_input(alias, bound)
            if writes is None:
                self.decline(node, "in-place flag is not a constant; left as written")
                continue
            if writes:
                self._shapes_needed()
                if not order:
                    order.update((n, i) for i, n in enumerate(self.graph.nodes))
                reason = _why_mutation_is_visible(node, bound[alias.params[0]], order)
                if reason:
                    self.decline(node, f"in-place {node.target} kept: {reason}")
                    continue
            if not self._allowed(node, f"{node.target} -> {alias.op}"):
                continue
            self._rewrite(node, alias, args)
            count += 1
        return count

    def _normalize(self, op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        spec = specs.SPECS[op]
        out = [aliases.normalize_value(op, name, value) for (name, _), value in zip(spec.params, args)]
        if op in ("conv1d", "conv2d", "conv3d") and isinstance(out[spec.index["padding"]], str):
            out[spec.index["padding"]] = self._numeric_padding(out, spec)
        return tuple(out)

    def _numeric_padding(self, args: list[Any], spec: specs.OpSpec) -> Any:
        """'valid' is zero padding; 'same' is ``dilation*(k-1)/2`` per side when that is whole."""
        padding = args[spec.index["padding"]]
        n = aliases.TUPLE_PARAMS[spec.name][0]
        if padding == "valid":
            return (0,) * n
        shape = self._shape(args[spec.index["weight"]])
        dilation = args[spec.index["dilation"]]
        if padding != "same" or shape is None or not isinstance(dilation, tuple):
            return padding
        totals = [d * (k - 1) for d, k in zip(dilation, shape[2:])]
        if any(t % 2 for t in totals):
            return padding  # asymmetric: only the string says it
        return tuple(t // 2 for t in totals)

    def _rewrite(self, node: fx.Node, alias: aliases.Alias, args: tuple[Any, ...]) -> None:
        if alias.first_output:
            for user in list(node.users):
                user.replace_all_uses_with(node)
                self.graph.erase_node(user)
        node.op = "call_function"
        node.target = alias.spec.target
        node.args = args
        node.kwargs = {}

    def _remove_noop(self, node: fx.Node, value: Any) -> int:
        if not self._allowed(node, "remove eval-mode dropout"):
            return 0
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)
        return 1


# -- helpers --------------------------------------------------------------------------------


def emit_lowering(graph: fx.Graph, steps: tuple[lowerings.Step, ...], value: Any, path: str,
                  origin_meta: dict[str, Any]) -> Any:
    """Create the nodes of a module lowering (:func:`graphopt.ir.lowerings.lowering_for`) at ``graph``'s
    insertion point and return the node holding the result (``value`` for no steps).

    ``value`` is the module's input, ``path`` its qualified name (parameters are read as
    ``get_attr <path>.<name>``, and ``path`` is the new nodes' provenance); the new nodes take
    the source line and module stack of the call they replace from ``origin_meta``. Used by
    :func:`canonicalize` on ``call_module`` nodes and by capture's tracer, which lowers
    standard layers as it meets them.
    """
    for step in steps:
        args = tuple([_materialize(graph, a, value, path, origin_meta) for a in step.args])
        kind = "call_method" if isinstance(step.target, str) else "call_function"
        new = _create_call(graph, kind, step.target, args)
        _inherit_meta(new, origin_meta, path)
        if not step.effect_only:
            value = new
    return value


def _create_call(graph: fx.Graph, kind: str, target: Any, args: tuple[Any, ...]) -> fx.Node:
    """``graph.create_node(kind, target, args)``, with the arguments set after creation:
    create_node walks them with pytree for a warning about raw SymInts (module attributes
    never are), which tripled the cost of a layer's call. Not where the graph's module has
    node-creation hooks, which should see the node whole."""
    if getattr(graph.owning_module, "_create_node_hooks", None):
        return graph.create_node(kind, target, args)
    node = graph.create_node(kind, target)
    node.args = args
    return node


def _materialize(graph: fx.Graph, a: Any, value: Any, path: str, origin_meta: dict[str, Any]) -> Any:
    if a is lowerings.INPUT:
        return value
    if isinstance(a, lowerings.Attr):
        getter = graph.get_attr(f"{path}.{a.name}")
        _inherit_meta(getter, origin_meta, getter.target)
        return getter
    return a


def _inherit_meta(new: fx.Node, origin_meta: dict[str, Any], provenance: str) -> None:
    new.meta["provenance"] = provenance
    for key in ("stack_trace", "nn_module_stack"):
        if key in origin_meta:
            new.meta[key] = origin_meta[key]


def _bind_addmm(node: fx.Node) -> dict[str, Any] | None:
    """``aten.addmm`` or ``torch.addmm``'s arguments by the aten schema's names (None if odd)."""
    if node.target is aten.addmm.default:
        return _bind_schema(node)
    kwargs = dict(node.kwargs)
    args = [*node.args] + [kwargs.pop(k) for k in ("input", "mat1", "mat2")[len(node.args):] if k in kwargs]
    if len(args) != 3 or set(kwargs) - {"beta", "alpha"}:
        return None
    return {"self": args[0], "mat1": args[1], "mat2": args[2], **kwargs}


def _bind_schema(node: fx.Node) -> dict[str, Any]:
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


#: argument values whose type and value alone decide what collapse_aliases does with a call
_PLAIN_VALUES = frozenset({int, float, bool, type(None), torch.dtype, torch.device, torch.memory_format,
                           torch.layout})
_NODE = object()


def _spelling(node: fx.Node) -> tuple[Any, ...] | None:
    """A key for ``node``'s call such that calls with equal keys get the same verdict from
    :meth:`_Rewriter.collapse_aliases` up to its canonical check: op, target, and the positional
    args with graph values blanked and constants tagged with their types (``1`` and ``True``
    differ). None when that is not so or not cheap to tell: keyword args, strings (conv
    padding "same" resolves from the weight's shape), lists, tensors, other objects.

    A captured model calls a few spellings thousands of times (every layer of a kind lowers to
    the same call), so the alias table's binding and normalization run once per spelling.
    """
    if node.kwargs:
        return None
    key = _arg_key(node.args)
    return None if key is None else (node.op, node.target, key)


def _arg_key(value: Any) -> Any:
    kind = type(value)
    if kind is fx.Node:
        return _NODE
    if kind in _PLAIN_VALUES:
        return kind, value
    if kind is tuple:
        parts = []
        for item in value:
            part = _arg_key(item)
            if part is None:
                return None
            parts.append(part)
        return tuple(parts)
    return None


def _same(a: Any, b: Any) -> bool:
    """Structural equality of args that never compares tensors elementwise."""
    if isinstance(a, (fx.Node, torch.Tensor)) or isinstance(b, (fx.Node, torch.Tensor)):
        return a is b
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _only_first_output_used(node: fx.Node) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _holds_tensor(node: fx.Node) -> bool:
    # after shape propagation "type" is always recorded and "tensor_meta" only for tensors
    return "tensor_meta" in node.meta or "type" not in node.meta


def _aliases_its_inputs(node: fx.Node, skip: fx.Node) -> bool:
    """Whether ``node``'s result may share storage with its tensor inputs (``skip`` counts as pure)."""
    return node is not skip and node.op in _CALLS and may_alias_input(node) and _holds_tensor(node)


def _storage_group(written: fx.Node, skip: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes that may share storage with ``written``, in graph order, treating ``skip`` as if
    it were pure: the connected part of the graph reached through ops that may return (a view
    of) an input. Only that part is walked, so checking every in-place node stays linear in
    practice, not a scan of the whole graph per node."""
    group = {written}
    frontier = [written]
    while frontier:
        node = frontier.pop()
        linked: list[fx.Node] = []
        if _aliases_its_inputs(node, skip):
            linked.extend(s for s in node.all_input_nodes if _holds_tensor(s))
        if _holds_tensor(node):
            linked.extend(u for u in node.users if _aliases_its_inputs(u, skip))
        for other in linked:
            if other not in group:
                group.add(other)
                frontier.append(other)
    return sorted(group, key=order.__getitem__)


def _why_mutation_is_visible(node: fx.Node, written: Any, order: dict[fx.Node, int]) -> str:
    """Why rewriting in-place ``node`` out-of-place could change what someone sees ('' if safe)."""
    if not isinstance(written, fx.Node):
        return "it writes into a value that is not a graph node"
    members = _storage_group(written, node, order)
    for member in members:
        if member.op in ("placeholder", "get_attr"):
            return f"{written.name} is (a view of) {member.op} {member.target}, visible to the caller"
        if member.op == "call_module":
            return f"{written.name} may alias the state of module {member.target}"
    later = _later_users(members, node, order)
    if later:
        return f"{written.name} (or a view of it) is read afterwards by {later[0].name}"
    return ""


def _later_users(members: Iterable[fx.Node], node: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    here = order[node]
    return [u for m in members for u in m.users if u is not node and order.get(u, here + 1) > here]
