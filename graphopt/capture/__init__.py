"""Capture an ``nn.Module`` into a canonical ``torch.fx.GraphModule``.

Two front ends end in the same canonical form (see :mod:`graphopt.ir.canonical`):

- ``mode="symbolic"`` (default): ``torch.fx`` symbolic tracing. Standard layers are not traced
  into: the tracer inlines each call from :data:`graphopt.ir.lowerings.MODULE_LOWERINGS` as it meets
  it; user ``leaf_modules`` stay opaque ``call_module`` nodes; ``concrete_args`` fix Python
  arguments.
- ``mode="export"``: ``torch.export.export``; parameters and buffers become ``get_attr`` nodes
  with their qualified names and aten ops are mapped through the alias table. For models that
  branch on shapes, which symbolic tracing cannot follow.

Capture works on a deep copy (the user's model, its state, training flags and hooks are never
touched), keeps every module's own training flag, leaves the global RNG as it found it, and
checks that the captured graph reproduces the model's outputs on the example inputs.

Its cost is meant to stay within a small factor of bare tracing and linear in the graph's
size: the copy copies standard module state, parameters and plain tensors directly, the graph
is rewritten before any GraphModule exists and compiled to Python once at the end, it is run
(shape recording and the reproduction check in one) by :func:`graphopt.ir.graph.record_shapes`,
once more before canonicalization only when that needs shapes (in-place spellings, aten
structures), and the cyclic garbage collector is paused meanwhile. Runs of the copy save no
state: they are undone from the user's own tensors (read, never written), in one foreach copy.
Canonicalization settles each distinct call spelling once, not once per layer.

The package's rooms: this module holds :func:`capture`, :func:`front_end`, :func:`capture_notes`
and the steps that join the rest; :mod:`~graphopt.capture.arguments` checks what the user passed,
:mod:`~graphopt.capture.isolation` copies the model and runs the copy without side effects,
:mod:`~graphopt.capture.symbolic` and :mod:`~graphopt.capture.export` are the two front ends,
:mod:`~graphopt.capture.dims` checks the dynamic dims, :mod:`~graphopt.capture.reproduction`
compares the graph's outputs with the model's, :mod:`~graphopt.capture.caches` handles decoder
caches and :mod:`~graphopt.capture.messages` points error text at the user's code.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import canonical, lazy, shapes, structure
from graphopt.errors import CaptureError
from graphopt.ir.graph import as_input_tuple, collector_paused, get_attr_value
from graphopt.capture.arguments import MODES  # noqa: F401  (public: the modes capture() takes)
from graphopt.capture.arguments import _check_inputs, _check_model, _check_options, _fixed_kwargs
from graphopt.capture.caches import _cache_fields, _turn_cache_off
from graphopt.capture.dims import _check_generic, _model_at_second_sizes
from graphopt.capture.export import _extend_to_size_one, _trace_export
from graphopt.capture.isolation import _canonicalize, _deepcopy, _Isolation, _propagate, _reference_outputs
from graphopt.capture.reproduction import _check_reproduces, _keep_output_container
from graphopt.capture.symbolic import _trace_symbolic

#: output node meta: which front end captured the graph, and why symbolic tracing was not it
FRONT_END_KEY = "graphopt_front_end"
#: output node meta: what capture chose for the user (``use_cache=False``, ...), one sentence each
NOTES_KEY = "graphopt_capture_notes"


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    mode: str = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    dynamic_shapes: Any = "batch",
) -> fx.GraphModule:
    """Capture ``model`` into a canonical GraphModule, run on ``example_inputs`` to record shapes.

    ``dynamic_shapes`` declares the input dims the graph stays generic over (see
    :mod:`graphopt.ir.shapes`): ``"batch"`` (default, dim 0 of every tensor input), ``"static"``,
    or per input ``{dim: name}`` dicts (a sequence, or a dict by parameter name). Each
    dynamic dim is checked: the model and the captured graph are run at a second size of it
    and must agree; a dim the model or the graph cannot vary is kept static, with the reason
    recorded on the graph (:func:`graphopt.ir.shapes.describe`). Other sizes of a static dim are
    refused with an :class:`InputError` when the graph module is called.

    ``mode``: ``"auto"`` (default) traces symbolically and, where that fails (Python control
    flow on shapes, code fx cannot trace), captures with ``torch.export``; :func:`front_end`
    says which one ran and why. ``"symbolic"`` or ``"export"`` use one front end only.
    ``example_inputs`` is a tensor or a tuple of forward's positional arguments, or a dict of
    its parameters by name (those skipped before the last one given must default to None).
    Arguments may be containers (dicts, lists, tuples, named tuples, dataclasses) of tensors:
    each tensor becomes one graph input named by its path (``inputs.image``,
    :mod:`graphopt.ir.structure`), other values in them are fixed, and the
    graph module is called with the same containers (or with the tensors flat). ``leaf_modules``
    (symbolic mode) lists module types (instances of them and of their subclasses) or qualified
    names to keep as opaque calls. ``concrete_args`` (symbolic mode) maps forward parameter
    names to fixed values, as in ``torch.fx.symbolic_trace``; the captured graph then takes only
    the remaining inputs.

    Raises :class:`CaptureError` when the model cannot be captured (naming the user's line and
    the ways out) and :class:`InputError` when the model does not run on ``example_inputs``.
    """
    _check_model(model)
    args = as_input_tuple(example_inputs, model)
    notes: list[str] = []
    layout = structure.input_layout(model, args, notes)
    if layout is not None and concrete_args:
        raise CaptureError("concrete_args cannot be combined with structured example inputs (dicts, lists, "
                           "dataclasses): put the fixed values into the example inputs instead")
    inputs = _check_inputs(args) if layout is None else layout.flat(args, {})
    leaf_types, leaf_names = _check_options(mode, leaf_modules, concrete_args)
    names = layout.identifiers if layout is not None else \
        [n for n in shapes.forward_parameter_names(model) if n not in (concrete_args or {})]
    dims = shapes.normalize(dynamic_shapes, inputs, names)
    with collector_paused():
        if mode != "auto" or leaf_modules or concrete_args:  # those options are symbolic tracing's
            gm = _capture(model, inputs, "export" if mode == "export" else "symbolic", leaf_types, leaf_names,
                          concrete_args, dims, layout, notes)
            return _record_front_end(gm, "torch.export" if mode == "export" else "symbolic", "")
        try:
            return _record_front_end(_capture(model, inputs, "symbolic", leaf_types, leaf_names, concrete_args,
                                              [dict(d) for d in dims], layout, notes), "symbolic", "")
        except CaptureError as exc:
            symbolic_failure = str(exc).split("\n")[0]
        try:
            gm = _capture(model, inputs, "export", (), frozenset(), None, [dict(d) for d in dims], layout, notes)
        except CaptureError as exc:
            raise CaptureError(
                f"neither front end captures {type(model).__name__}.\n  symbolic tracing: {symbolic_failure}\n"
                f"  torch.export: {str(exc).split(chr(10))[0]}\n"
                "Ways out: keep the submodule with the failing line opaque (leaf_modules=, symbolic tracing), fix "
                "Python-level arguments with concrete_args=, or express data-dependent branches with torch.cond."
            ) from None
        return _record_front_end(gm, "torch.export", symbolic_failure)


def _record_front_end(gm: fx.GraphModule, front_end: str, why: str) -> fx.GraphModule:
    output = next(iter(reversed(gm.graph.nodes)))
    output.meta[FRONT_END_KEY] = {"front_end": front_end, "symbolic_failure": why}
    return gm


def front_end(gm: fx.GraphModule) -> dict[str, str] | None:
    """Which front end captured ``gm`` (``symbolic`` or ``torch.export``) and, for export, why
    symbolic tracing did not (None for a graph module graphopt did not capture)."""
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            return node.meta.get(FRONT_END_KEY)
    return None


def capture_notes(gm: fx.GraphModule) -> list[str]:
    """What capture chose for the user while capturing ``gm`` (e.g. ``use_cache=False`` for a
    decoder whose output holds a cache), one sentence each; [] when nothing."""
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            return list(node.meta.get(NOTES_KEY, ()))
    return []


def _capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    mode: str,
    leaf_types: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
    concrete_args: dict[str, Any] | None,
    dims: list[dict[int, Any]],
    layout: structure.InputLayout | None = None,
    notes: Sequence[str] = (),
) -> fx.GraphModule:
    fixed_kwargs = _fixed_kwargs(concrete_args)
    root, origins = _deepcopy(model)
    if layout is not None:  # the copy takes the flat tensors and rebuilds the model's arguments
        structure.flatten_forward(root, layout)
    isolated = _Isolation(root, origins)
    reference = _reference_outputs(root, inputs, fixed_kwargs, isolated)
    notes = list(notes)
    if _turn_cache_off(root, reference):  # on the copy: the user's config keeps use_cache
        dropped = _cache_fields(reference)
        reference = _reference_outputs(root, inputs, fixed_kwargs, isolated)
        notes.append(
            f"use_cache=False chosen: {type(model).__name__} returns a key/value cache "
            f"({', '.join(dropped)}), an object a graph cannot return; the graph computes the outputs without it "
            "(set config.use_cache=False yourself to silence this note)")
    static: dict[str, str] = {}
    if mode == "symbolic":
        second = _model_at_second_sizes(root, inputs, dims, fixed_kwargs, isolated, static)
        graph, lowered = _trace_symbolic(root, leaf_types, leaf_names, concrete_args, fixed_kwargs)
    else:  # export may bound the dims (seq <= 64): the second sizes are chosen inside those ranges
        graph, lowered = _trace_export(root, inputs, dims, static), []
        second = _model_at_second_sizes(root, inputs, dims, fixed_kwargs, isolated, static)
    # the GraphModule keeps the layers the trace called, as GraphModule(root, traced graph) would
    called = lowered + [n.target for n in graph.nodes if n.op == "call_module"]
    canonical.ensure_provenance(graph)
    _resolve_annotations(graph, root)
    _canonicalize(root, graph, inputs, isolated)
    _check_reproduces(root, reference, _propagate(root, graph, inputs, isolated))
    _keep_output_container(graph, reference)
    shapes.declare(graph, shapes.build(inputs, dims, static))
    _check_generic(root, graph, inputs, dims, static, second, isolated)
    if mode == "export":
        _extend_to_size_one(root, graph, inputs, dims, static, fixed_kwargs, isolated)
    structure.record_layout(graph, layout)
    if notes:
        next(iter(reversed(graph.nodes))).meta[NOTES_KEY] = notes
    return _graph_module(root, graph, called)


def _resolve_annotations(graph: fx.Graph, root: nn.Module) -> None:
    """Turn string annotations of the inputs and output into the types they name.

    Under ``from __future__ import annotations`` fx records ``forward``'s annotations as
    strings and writes them into the generated code through aliases (``x : _torch_Tensor_``)
    that ``torch.jit.script`` cannot resolve, so the captured module could not be scripted.
    An annotation that does not evaluate in ``forward``'s module is dropped: it only
    documented the user's code.
    """
    namespace = dict(getattr(getattr(type(root), "forward", None), "__globals__", {}))
    for node in graph.nodes:
        value = node.type
        for _ in range(2):  # a quoted annotation ("T") is postponed once more: "'T'"
            if not isinstance(value, str):
                break
            try:
                value = eval(value, namespace)  # noqa: S307 - the user's own annotation
            except Exception:  # noqa: BLE001 - any failure means: not resolvable here
                value = None
        if node.type is not None and (value is None or isinstance(value, str)):
            node.type = None
        elif value is not node.type:
            node.type = value


def _graph_module(root: nn.Module, graph: fx.Graph, called: list[str]) -> fx.GraphModule:
    """The GraphModule of ``graph``; its code is generated on first use (:mod:`graphopt.ir.lazy`).

    Its module tree is what ``fx.GraphModule(root, traced graph)`` builds: fresh containers
    along the paths, the modules ``called`` by the trace themselves at their paths, and every
    other attribute the graph reads copied from ``root`` (plain tensors as buffers). It is
    built directly (GraphModule's own copy walks ``root`` once per attribute), then the graph
    is attached. Each container gets the training flag of the module at
    its path in ``root`` (fx makes them in training mode).
    """
    # built on an empty graph that carries the tracer GraphModule records (for pickling)
    empty = fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    gm = lazy.graph_module(root, empty, class_name=type(root).__name__)
    for target in sorted(dict.fromkeys(called), key=lambda t: t.count(".")):  # outer paths first
        owner, name, parent = _owner_of(gm, root, target)
        module = parent._modules.get(name) if parent is not None else None
        if module is None:
            module = root.get_submodule(target)
        if owner._modules.get(name) is not module:
            setattr(owner, name, module)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and not _holds(gm, node.target):
            owner, name, _ = _owner_of(gm, root, node.target)
            value = get_attr_value(root, node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                owner.register_buffer(name, value)
            else:
                setattr(owner, name, value)
    gm.graph = graph
    return gm


def _owner_of(gm: fx.GraphModule, root: nn.Module, target: str) -> tuple[nn.Module, str, nn.Module | None]:
    """The module that holds ``target`` in ``gm`` (containers made along the way, with the
    training flags of their counterparts in ``root``), the attribute's own name, and the
    module at the owner's path in ``root`` (None if ``root`` has no submodule there)."""
    *path, name = target.split(".")
    owner: nn.Module = gm
    original: nn.Module | None = root
    for part in path:
        original = original._modules.get(part) if original is not None else None
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            if original is not None:
                child.training = original.training
            setattr(owner, part, child)
        owner = child
    return owner, name, original


def _holds(gm: fx.GraphModule, target: str) -> bool:
    """Whether ``gm`` already reaches ``target`` (through a module placed for an earlier one)."""
    *path, name = target.split(".")
    owner: nn.Module | None = gm
    for part in path:
        owner = owner._modules.get(part)
        if owner is None:
            return False
    return name in owner._parameters or name in owner._buffers or name in owner._modules \
        or name in owner.__dict__
