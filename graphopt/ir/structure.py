"""A graph's inputs and outputs as the model has them: names from their pytree paths.

A model takes and returns nested containers (``ModelOutput``, dicts, named tuples, lists,
tuples); a file format such as ONNX takes flat, named tensors. Each leaf is named by its path
through the container, the parts joined by dots:

- inputs: the forward parameter (``input_ids``, ``pixel_values``, ``x``), then the keys,
  fields or indices below it (``inputs.image``, ``pair.0``), as capture recorded them
  (:data:`INPUT_NAME_KEY`);
- outputs: the fields of a ``ModelOutput``, the keys of a dict and the fields of a named tuple
  (``logits``, ``hidden_states.0``); plain tensors and the items of a tuple or list returned
  at the top are ``output_0``, ``output_1``, ...

Names keep letters, digits, ``_`` and ``.`` (anything else becomes ``_``), and are unique over
inputs and outputs together (a repeat gets ``_1``, ``_2``, ...), as ONNX requires of value names.
"""
from __future__ import annotations

import dataclasses
import inspect
import keyword
import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import CalibrationDataError, InputError
from graphopt.ir.lazy import INPUT_LAYOUT_KEY, OUTPUT_SPEC_KEY, graph_module

#: placeholder meta: the input's pytree path name (``inputs.image``) where it is not the
#: placeholder's own name
INPUT_NAME_KEY = "graphopt_input_name"


def input_names(gm: fx.GraphModule) -> list[str]:
    """One name per placeholder of ``gm``, in order (see the module docstring)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return _unique([str(n.meta.get(INPUT_NAME_KEY, n.target)).lstrip("*") for n in placeholders])


def _items(value: Any) -> list[tuple[Any, str, Any]] | None:
    """(key to read it with, name part, item) for each item of a container the model returns
    (mapping, ModelOutput, named tuple, tuple, list, dataclass), or None for anything else."""
    if isinstance(value, dict):
        return [(k, str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return [(i, f, v) for i, (f, v) in enumerate(zip(type(value)._fields, value))]
    if isinstance(value, (tuple, list)):
        return [(i, str(i), v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


def _builds_named_tuple(node: fx.Node) -> bool:
    """Whether ``node`` calls a named tuple class (as a traced ``forward`` returning one does)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, type) and issubclass(target, tuple)
            and hasattr(target, "_fields"))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and not hasattr(type(value), "_fields")


_INVALID = re.compile(r"[^0-9A-Za-z_.]")


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in names:
        base = _INVALID.sub("_", name) or "value"
        name, i = base, 1
        while name in seen:
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        out.append(name)
    return out


def flat_outputs(gm: fx.GraphModule, outputs: Any) -> tuple[fx.GraphModule, list[str]]:
    """A graph module over a copy of ``gm``'s graph (sharing its attributes) that returns every
    tensor the model returns as one flat tuple, and the name of each (see the module
    docstring; unique against the input names too): what a flat file format's exporter takes.

    ``outputs`` is what ``gm`` returned on some inputs: it gives the structure, also of values
    one node returns as a whole (a named tuple built in forward), whose items are read out
    with ``getitem``/``getattr`` nodes. ``gm`` itself is not changed.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    leaves: list[fx.Node] = []
    names: list[str] = []

    def walk(arg: Any, value: Any, name: str) -> None:
        if isinstance(arg, fx.Node) and _builds_named_tuple(arg):  # read its fields where they are made
            arg = arg.target(*arg.args, **arg.kwargs)
        if isinstance(arg, fx.Node):
            arg = env.get(arg, arg)  # a node of gm's graph, or a read this walk added
            if isinstance(value, torch.Tensor):
                leaves.append(arg)
                names.append(name)
                return
            for key, part, item in _items(value) or ():
                read = getattr if isinstance(key, str) and not isinstance(value, dict) else operator.getitem
                walk(graph.call_function(read, (arg, key)), item, f"{name}.{part}")
            return
        if isinstance(arg, dict):
            for key in arg:
                walk(arg[key], value[key], f"{name}.{key}")
        elif isinstance(arg, (tuple, list)):
            parts = type(arg)._fields if hasattr(type(arg), "_fields") else range(len(arg))
            for i, (part, item) in enumerate(zip(parts, arg)):
                walk(item, value[i], f"{name}.{part}")

    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        structure = node.args[0]
        if isinstance(outputs, torch.Tensor):
            walk(structure, outputs, ".output_0")
        elif _is_sequence(outputs):  # items returned at the top are output_<i>
            for i, item in enumerate(outputs):
                walk(structure[i] if not isinstance(structure, fx.Node) else
                     graph.call_function(operator.getitem, (env[structure], i)), item, f".output_{i}")
        else:
            walk(structure, outputs, "")
        new = graph.output(tuple(leaves))
        for made in [env[n] for n in gm.graph.nodes if n in env and _builds_named_tuple(n)]:
            if not made.users:  # a container only the output read, which now reads its fields
                graph.erase_node(made)
        new.meta = {k: v for k, v in node.meta.items() if k not in (OUTPUT_SPEC_KEY, "tensor_meta")}
    taken = input_names(gm)
    names = _unique(taken + [n.lstrip(".") for n in names])[len(taken):]
    return graph_module(gm, graph, class_name=type(gm).__name__), names


# ------------------------------------------------------------------------- structured inputs

@dataclasses.dataclass
class InputLayout:
    """How a model's structured arguments (dicts, lists, tuples, named tuples, dataclasses)
    map to the graph's flat tensor inputs.

    ``spec`` is the pytree structure of the positional arguments given, for forward's
    parameters ``params``; each tensor leaf is one graph input, named by its path (``names``,
    ``inputs.image``); other leaves (numbers, strings, flags) are fixed to the example's values
    (``fixed``, by leaf index).
    """

    params: list[str]
    spec: pytree.TreeSpec
    tensor_leaves: list[int]
    names: list[str]
    fixed: dict[int, Any]
    #: parameters the example left at None (keyword inputs that skip an optional parameter, GPT-2's
    #: cache): a call may leave them out too
    omittable: frozenset[str] = frozenset()

    @property
    def identifiers(self) -> list[str]:
        """The names as Python identifiers, for the graph's placeholders (``inputs_image``)."""
        out: list[str] = []
        for name in self.names:
            base = re.sub(r"\W", "_", name)
            base = f"_{base}" if not base or base[0].isdigit() or keyword.iskeyword(base) else base
            ident, i = base, 1
            while ident in out:
                ident, i = f"{base}_{i}", i + 1
            out.append(ident)
        return out

    def arguments(self, tensors: tuple[Any, ...]) -> tuple[Any, ...]:
        """The model's positional arguments with ``tensors`` (flat, in graph-input order) in place."""
        leaves: list[Any] = [None] * self.spec.num_leaves
        for i, value in self.fixed.items():
            leaves[i] = value
        for i, value in zip(self.tensor_leaves, tensors):
            leaves[i] = value
        return tuple(pytree.tree_unflatten(leaves, self.spec))

    def flat(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The graph's flat inputs from a call structured as the model's (positional and/or by
        parameter name); a call that is flat already (tensors, one per graph input) as it is.
        :class:`InputError` when the structure or a fixed value differs from the example's."""
        if not kwargs and len(args) == len(self.tensor_leaves) and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(args)
        unknown = [k for k in kwargs if k not in self.params[len(args):]]
        missing = [p for p in self.params[len(args):] if p not in kwargs and p not in self.omittable]
        if len(args) > len(self.params) or unknown or missing:
            raise InputError(
                f"the graph takes {', '.join(self.params)} (as the model was captured), structured as "
                f"{_shown(self.spec)}; got {len(args)} positional and {sorted(kwargs) or 'no'} keyword "
                "argument(s). Pass them as the example inputs were passed")
        bound = tuple(args) + tuple(kwargs.get(p) for p in self.params[len(args):])
        leaves, spec = pytree.tree_flatten(bound)
        if spec != self.spec:
            raise InputError(f"inputs are structured as {_shown(spec)}, but the graph was captured with "
                             f"{_shown(self.spec)}; pass the same containers, keys and fields")
        for i, value in self.fixed.items():
            if not _same_constant(leaves[i], value):
                raise InputError(f"input {self._leaf_name(i)} is {leaves[i]!r}, but the graph was captured with "
                                 f"{value!r} there (non-tensor inputs are fixed at capture); capture again "
                                 "with this value")
        return tuple(leaves[i] for i in self.tensor_leaves)

    def _leaf_name(self, index: int) -> str:
        paths = _leaf_paths(self.params, pytree.tree_unflatten(list(range(self.spec.num_leaves)), self.spec))
        return paths[index]


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == is not a bool
        return a is b


def _shown(spec: pytree.TreeSpec) -> str:
    return re.sub(r"\s+", " ", str(spec))[:300]


def _path_part(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_paths(params: list[str], args: tuple[Any, ...]) -> list[str]:
    """Name of every leaf of ``args`` (forward's positional arguments): parameter, then path."""
    paths, _ = pytree.tree_flatten_with_path(args)
    return [".".join([params[path[0].idx], *map(_path_part, path[1:])]) for path, _ in paths]


def input_layout(model: torch.nn.Module, args: tuple[Any, ...], notes: list[str]) -> InputLayout | None:
    """The layout of ``args`` (forward's positional arguments) when one is a container holding
    tensors, else None (plain tensors need none; capture refuses other values). A dataclass
    among them that ``torch.utils._pytree`` does not know yet is registered
    (``torch.export.register_dataclass``), with a note, so its fields become inputs."""
    if all(isinstance(a, torch.Tensor) for a in args):
        return None
    if not any(dataclasses.is_dataclass(a) or isinstance(a, (dict, list, tuple)) or a is None for a in args):
        return None
    for cls in _unregistered_dataclasses(args):
        torch.export.register_dataclass(cls)
        notes.append(f"registered dataclass {cls.__qualname__} with torch.utils._pytree (torch.export."
                     "register_dataclass), so its fields are graph inputs")
    params = _positional_parameters(model)
    if len(args) > len(params):
        raise InputError(f"{len(args)} example inputs for forward's {len(params)} positional parameters "
                         f"({', '.join(params) or 'none'})")
    leaves, spec = pytree.tree_flatten(args)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        return None
    names = _leaf_paths(params, args)
    return InputLayout(params[:len(args)], spec, tensors, [names[i] for i in tensors],
                       {i: leaf for i, leaf in enumerate(leaves) if i not in set(tensors)},
                       frozenset(params[i] for i, a in enumerate(args) if a is None))


def _positional_parameters(model: torch.nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _unregistered_dataclasses(value: Any) -> list[type]:
    found: list[type] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            if type(item) not in pytree.SUPPORTED_NODES and type(item) not in found:
                found.append(type(item))
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def flatten_forward(root: torch.nn.Module, layout: InputLayout) -> None:
    """Give ``root`` (capture's own copy, never the user's model) a forward taking the flat
    tensor inputs by their identifiers, which rebuilds the structured arguments and calls the
    model's forward: both front ends then trace a graph with one placeholder per tensor.
    The class keeps its name (messages and the graph module's class name are the model's)."""
    original = type(root).forward
    params = ", ".join(layout.identifiers)
    namespace: dict[str, Any] = {
        "_structured_call": lambda self, tensors: original(self, *layout.arguments(tensors))}
    source = f"def forward(self, {params}):\n    return _structured_call(self, ({params},))\n"
    exec(compile(source, __file__, "exec"), namespace)  # noqa: S102 - parameters are sanitized identifiers
    cls = type(root)
    root.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})


def record_layout(graph: fx.Graph, layout: InputLayout | None) -> None:
    """Name the placeholders' inputs by their paths and keep ``layout`` for calls (see
    :func:`graph_inputs`)."""
    if layout is None:
        return
    for node, name in zip(graph.find_nodes(op="placeholder"), layout.names):
        node.meta[INPUT_NAME_KEY] = name
    next(iter(reversed(graph.nodes))).meta[INPUT_LAYOUT_KEY] = layout


def layout_of(graph: fx.Graph) -> InputLayout | None:
    if not len(graph.nodes):
        return None
    output = next(iter(reversed(graph.nodes)))
    return output.meta.get(INPUT_LAYOUT_KEY) if output.op == "output" else None


def graph_inputs(gm: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """The flat inputs of graph module ``gm`` for a call structured as the model's (see
    :meth:`InputLayout.flat`); ``args`` as they are for a graph without structured inputs."""
    layout = layout_of(gm.graph) if isinstance(gm, fx.GraphModule) else None
    if layout is None:
        return tuple(args)
    return layout.flat(tuple(args), dict(kwargs or {}))


class StructuredBatches:
    """Calibration data given as the model is called (a dict of keyword inputs per batch, or
    the model's containers), read as the graph's flat input tuples. Iterable as often as the
    data is: a list stays reusable, a generator is read once.

    A batch that does not fit raises :class:`CalibrationDataError` naming the batch; a batch that is
    already flat passes through, so the arity check downstream keeps its own message."""

    def __init__(self, gm: Any, model: Any, batches: Any):
        self.gm, self.model, self.batches = gm, model, batches

    def __iter__(self) -> Any:
        from graphopt.ir.graph import as_input_tuple

        for index, item in enumerate(self.batches):
            try:
                if isinstance(item, dict):
                    item = graph_inputs(self.gm, (), item) if layout_of(self.gm.graph) is not None \
                        else as_input_tuple(item, self.model)
                elif isinstance(item, (tuple, list)) and layout_of(self.gm.graph) is not None:
                    item = graph_inputs(self.gm, tuple(item))
            except InputError as exc:
                raise CalibrationDataError(f"calibration batch #{index}: {exc}") from None
            yield item
