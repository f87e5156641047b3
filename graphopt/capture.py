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
"""
from __future__ import annotations

import collections
import copy
import copyreg
import inspect
import linecache
import os
import re
import sys
import sysconfig
import traceback
import types
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from graphopt.ir import canonical, lazy, lowerings, shapes, structure
from graphopt.errors import CaptureError, GraphoptError, InputError, first_line
from graphopt.ir.graph import (
    as_input_tuple,
    collector_paused,
    describe_values,
    execute,
    fresh_copies,
    get_attr_value,
    record_shapes,
    unique_attr_name,
)

MODES = ("auto", "symbolic", "export")
#: output node meta: which front end captured the graph, and why symbolic tracing was not it
FRONT_END_KEY = "graphopt_front_end"
#: output node meta: what capture chose for the user (``use_cache=False``, ...), one sentence each
NOTES_KEY = "graphopt_capture_notes"

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_FILES = {os.path.abspath(__file__), os.path.abspath(canonical.__file__), os.path.abspath(structure.__file__)}
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_SITE_DIRS = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
_WAYS_OUT = (
    "Ways out: keep the submodule that contains this line opaque with leaf_modules=(ThatModule,) "
    "or its qualified name; fix Python-level arguments with concrete_args={'name': value}; "
    'or capture with mode="export", which follows control flow on shapes.'
)


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
    its leading parameters by name. Arguments may be containers (dicts, lists, tuples, named
    tuples, dataclasses) of tensors: each tensor becomes one graph input named by its path
    (``inputs.image``, :mod:`graphopt.ir.structure`), other values in them are fixed, and the
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


# -- decoder caches -------------------------------------------------------------------------------


def _is_cache(value: Any) -> bool:
    """A Hugging Face key/value cache (``DynamicCache`` and the other ``Cache`` classes)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _cache_fields(reference: Any) -> list[str]:
    """Where the model's outputs hold a cache: the output field's name, else its type."""
    if isinstance(reference, dict):
        return [str(k) for k, v in reference.items() if _is_cache(v)]
    return [type(v).__name__ for v in pytree.tree_leaves(reference) if _is_cache(v)]


def _turn_cache_off(root: nn.Module, reference: Any) -> bool:
    """Set ``config.use_cache = False`` on capture's copy where the model's config asks for a
    cache and its outputs hold one: a cache is a Python object with its own update logic, not a
    value a graph returns, and a model run for inference once per input needs none."""
    config = getattr(root, "config", None)
    if not getattr(config, "use_cache", False) or not any(_is_cache(v) for v in pytree.tree_leaves(reference)):
        return False
    config.use_cache = False
    return True


# -- dynamic dims ---------------------------------------------------------------------------------


def _model_at_second_sizes(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]], kwargs: dict[str, Any],
    isolated: _Isolation, static: dict[str, str],
) -> tuple[dict[str, int], tuple[Any, ...], Any] | None:
    """Run the model with every dynamic dim at its second size; the sizes, inputs and outputs.

    A dim the model cannot run at another size (``view(2, -1)``) is added to ``static`` with
    the model's error, and the others are tried without it.
    """
    recorded = shapes.build(inputs, dims, static)
    sizes = shapes.sizes_for(recorded)
    if not sizes:
        return None
    try:
        resized = shapes.resized_inputs(recorded, inputs, sizes)
        with isolated():
            return sizes, resized, model(*fresh_copies(resized), **kwargs)
    except Exception:  # noqa: BLE001 - find the dims at fault, one at a time
        pass
    for name, size in sizes.items():
        try:
            with isolated():
                model(*fresh_copies(shapes.resized_inputs(recorded, inputs, {name: size})), **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            static[name] = (f"the model raised {type(exc).__name__} at {name}={size}{_where(exc)}: "
                            f"{first_line(exc)[:200]}")
    if len(static) == len(sizes):
        return None
    if not static:  # each dim runs alone but not all together: keep them all static
        for name in sizes:
            static[name] = "the model does not run with all dynamic dims at other sizes together"
        return None
    return _model_at_second_sizes(model, inputs, dims, kwargs, isolated, static)


def _check_generic(
    root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]],
    static: dict[str, str], second: tuple[dict[str, int], tuple[Any, ...], Any] | None, isolated: _Isolation,
) -> None:
    """Check that the graph reproduces the model at the second sizes; a dim at which it does
    not (the front end specialized it) is recorded static with the difference."""
    if second is None or all(name in static for name in second[0]):
        return
    sizes, resized, want = second
    try:
        with isolated():
            got = _plain(execute(root, fresh_copies(resized), graph))
        problem = _reproduction_problem(want, got)
    except Exception as exc:  # noqa: BLE001
        problem = f"{type(exc).__name__}: {first_line(exc)[:200]}"
    if not problem:
        return
    where = ", ".join(f"{k}={v}" for k, v in sizes.items())
    for name in sizes:
        static.setdefault(name, f"the captured graph does not reproduce the model at {where} ({problem})")
    shapes.declare(graph, shapes.build(inputs, dims, static))


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


# -- checks on what the user passed -------------------------------------------------------------


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture expects a torch.nn.Module instance, got {type(model).__name__}. "
            "Pass the model object (e.g. MyNet()), not its class or a function; wrap a plain "
            "function in an nn.Module whose forward calls it."
        )
    if lowerings.has_hooks(model):
        raise CaptureError(
            f"{type(model).__name__} has hooks on the model itself, which a graph cannot hold (hooks on "
            "submodules are fine: those stay opaque calls). Remove them before capture, or capture a "
            "wrapper module that calls this model, which then stays one opaque call."
        )


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = as_input_tuple(example_inputs)
    for i, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"example_inputs[{i}] is a {type(value).__name__}, not a tensor. example_inputs are "
                "tensors passed positionally to forward; fix non-tensor arguments with "
                "concrete_args={'name': value}."
            )
    return inputs


def _check_options(
    mode: str, leaf_modules: Sequence[Any], concrete_args: dict[str, Any] | None
) -> tuple[tuple[type[nn.Module], ...], frozenset[str]]:
    if mode not in MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; use one of {', '.join(map(repr, MODES))}.")
    if mode == "export" and (leaf_modules or concrete_args):
        raise CaptureError(
            'leaf_modules and concrete_args apply to mode="symbolic" only; torch.export traces '
            "every module and specializes Python arguments itself."
        )
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise CaptureError(f"concrete_args must be a dict of parameter name -> value, got {type(concrete_args).__name__}.")
    types, names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.append(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise CaptureError(
                f"leaf_modules entries must be nn.Module subclasses or qualified names, got {leaf!r}."
            )
    return tuple(types), frozenset(names)


def _fixed_kwargs(concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """Concrete args that are values (not ``fx.PH`` placeholders), passed by name when running."""
    return {k: v for k, v in (concrete_args or {}).items() if v is not fx.PH}


def _deepcopy(model: nn.Module) -> tuple[nn.Module, _Origins]:
    """A deep copy of ``model``, and the user's tensors that parameters and buffers of the copy
    were cloned from (see :meth:`_Copier.tensor`)."""
    copier = _Copier(model)
    try:
        return copier.module(model), copier.origins
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise CaptureError(
            f"could not copy {type(model).__name__} ({type(exc).__name__}: {first_line(exc)}); capture "
            "works on a deep copy so your model is never changed. Make the model deep-copyable "
            "(no open files, locks or generators as attributes)."
        ) from None


# values copy.deepcopy returns as they are (immutable), and tuples of them
_SHARED_TYPES = frozenset({
    type(None), bool, int, float, complex, str, bytes, type, range, types.FunctionType,
    types.BuiltinFunctionType, torch.dtype, torch.device, torch.memory_format, torch.layout,
})
_PLAIN_REDUCE: dict[type, bool] = {}
#: id of a tensor of the copy -> (that tensor, the user's tensor it is a plain clone of)
_Origins = dict[int, tuple[torch.Tensor, torch.Tensor]]


class _Copier:
    """``copy.deepcopy(model)``, with direct paths for what deep models are made of.

    deepcopy's generic dispatch dominated capture's cost on deep models. Modules that pickle
    the standard way, their usual state entries (numbers, strings, empty hook dicts, the
    parameter, buffer and submodule dicts) and plain tensors and parameters are copied
    directly, in the steps deepcopy takes; any other value goes through deepcopy with the
    shared ``memo``, so sharing between modules and tensors is kept as deepcopy keeps it.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.memo: dict[Any, Any] = {}
        self.origins: _Origins = {}
        self._seeded = False

    def deepcopy(self, value: Any) -> Any:
        """``copy.deepcopy(value, memo)``, for every value the direct paths do not take.

        Tensors a hook computes from parameters (old-style weight_norm's ``weight``) refuse to
        be deep-copied; before the first deepcopy, ``memo`` gets a detached clone of each such
        tensor a module holds, which its hook recomputes on every call. The direct paths never
        copy a non-leaf tensor, so a model they copy entirely skips that scan of every
        module's attributes.
        """
        if not self._seeded:
            self._seeded = True
            self.memo.update((id(v), v.detach().clone()) for m in self.model.modules() for v in vars(m).values()
                             if isinstance(v, torch.Tensor) and not v.is_leaf)
        return copy.deepcopy(value, self.memo)

    def module(self, module: nn.Module) -> nn.Module:
        """``copy.deepcopy(module, memo)``: for a class that pickles the standard way, a new
        instance given a copy of every entry of ``__getstate__()`` through ``__setstate__``."""
        memo = self.memo
        if id(module) in memo:
            return memo[id(module)]
        cls = type(module)
        if not _reduces_plainly(cls):
            return self.deepcopy(module)
        state = module.__getstate__()
        if not isinstance(state, dict):
            return self.deepcopy(module)
        new = cls.__new__(cls)
        memo[id(module)] = new
        copied = {}
        for key, value in state.items():
            kind = type(value)
            if kind in _SHARED_TYPES:
                copied[key] = value
            elif kind is collections.OrderedDict and not value and id(value) not in memo:  # hook tables
                copied[key] = memo[id(value)] = collections.OrderedDict()
            else:
                copied[key] = self.state_value(key, value)
        if hasattr(new, "__setstate__"):
            new.__setstate__(copied)
        else:
            new.__dict__.update(copied)
        return new

    def state_value(self, key: str, value: Any) -> Any:
        """The copy of the module state entry ``key``."""
        kind = type(value)
        if kind in _SHARED_TYPES or (kind is tuple and all(type(v) in _SHARED_TYPES for v in value)):
            return value
        memo = self.memo
        if id(value) in memo:
            return memo[id(value)]
        if key == "_modules" and kind is dict:
            new: Any = {name: None if m is None else self.module(m) for name, m in value.items()}
        elif key in ("_parameters", "_buffers") and kind is dict:
            new = {name: None if t is None else self.tensor(t) for name, t in value.items()}
        elif kind in (dict, collections.OrderedDict) and not value:
            new = kind()
        elif kind is set and all(type(v) is str for v in value):
            new = set(value)
        elif kind is list and all(type(v) in _SHARED_TYPES for v in value):  # conv's padding list
            new = list(value)
        else:
            return self.deepcopy(value)
        memo[id(value)] = new
        return new

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``copy.deepcopy(tensor, memo)``, directly for a parameter and for a dense tensor that
        is its storage's only view so far (offset 0, contiguous, the whole storage).

        ``Parameter.__deepcopy__`` clones the data alone; ``Tensor.__deepcopy__`` clones the
        storage once per ``memo`` (its ``memo["torch"]`` table) and views it as the original
        did, and recording the clone's storage there keeps that: a later tensor sharing the
        storage goes through deepcopy and views the same copy. Each direct clone is recorded
        in ``origins`` with the user's tensor it came from, whose values it has until the copy
        first runs (:class:`_Isolation` restores from there instead of saving a copy).
        """
        memo = self.memo
        if id(tensor) in memo:
            return memo[id(tensor)]
        if type(tensor) is nn.Parameter:
            new = nn.Parameter(tensor.data.clone(memory_format=torch.preserve_format), tensor.requires_grad)
        elif type(tensor) is not torch.Tensor or not tensor.is_leaf or tensor.layout is not torch.strided \
                or not (tensor.is_cpu or tensor.is_cuda) or tensor.is_quantized or tensor.is_conj() \
                or tensor.is_neg() or tensor.grad is not None or tensor.__dict__:
            return self.deepcopy(tensor)
        else:
            storage = tensor.untyped_storage()
            storages = memo.setdefault("torch", {})
            if storage._cdata in storages or tensor.storage_offset() != 0 or not tensor.is_contiguous() \
                    or storage.nbytes() != tensor.numel() * tensor.element_size():
                return self.deepcopy(tensor)
            new = tensor.detach().clone().requires_grad_() if tensor.requires_grad else tensor.clone()
            storages[storage._cdata] = new.untyped_storage()
        memo[id(tensor)] = new
        self.origins[id(new)] = (new, tensor)
        return new


def _reduces_plainly(cls: type) -> bool:
    """Whether deepcopy copies instances of ``cls`` by new instance + state (no custom hooks)."""
    known = _PLAIN_REDUCE.get(cls)
    if known is None:
        known = _PLAIN_REDUCE[cls] = (
            getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and not hasattr(cls, "__getnewargs_ex__")
            and not hasattr(cls, "__getnewargs__")
            and cls not in copyreg.dispatch_table
            and not issubclass(cls, (list, dict))
        )
    return known


# -- running modules without side effects ---------------------------------------------------------


class _Isolation:
    """Runs of the capture's copy that leave no trace: inside, no grad and a fixed seed; after,
    the global RNG and every parameter and buffer as they were before the first run.

    The values to restore are saved once per capture, not per run, and mostly not at all: a
    tensor the copy cloned from the user's model is restored from the user's tensor (only
    read, never written), whose values it had before the first run. Only other tensors (ones
    deepcopy made, ones a run registered) are cloned, when a run first meets them. After each
    run every tensor is restored, in one foreach copy for plain tensors: version counters
    would say which ones a run wrote, but not writes through ``.data``, which models that keep
    running statistics by hand make.
    """

    def __init__(self, module: nn.Module, origins: _Origins):
        self.module = module
        # id -> (tensor, its values before the first run), starting from (and adding to) the
        # copy's origins; the tensor is kept so ids stay unique
        self.saved = origins

    @contextmanager
    def __call__(self) -> Iterator[None]:
        tensors = _state_tensors(self.module)
        for t in tensors:
            if id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone())
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                yield
            finally:
                _restore(tensors, [self.saved[id(t)][1] for t in tensors])


def _restore(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``t.copy_(v)`` for each pair; plain tensors in one foreach call (a Python-level
    ``copy_`` per tensor cost more than the copying itself on models of small layers)."""
    plain, plain_values = [], []
    for t, v in zip(tensors, values):
        if type(t) in _PLAIN_TENSORS and type(v) in _PLAIN_TENSORS and t.layout is torch.strided \
                and not t.is_quantized:
            plain.append(t)
            plain_values.append(v)
        else:
            t.copy_(v)
    if plain:
        torch._foreach_copy_(plain, plain_values)


_PLAIN_TENSORS = frozenset({torch.Tensor, nn.Parameter})


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` and its submodules, once each (what
    ``parameters()`` and ``buffers()`` give, without building their qualified names)."""
    tensors: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        for t in m._parameters.values():
            if t is not None:
                tensors[id(t)] = t
        for t in m._buffers.values():
            if t is not None:
                tensors[id(t)] = t
        stack.extend(m._modules.values())
    return list(tensors.values())


def _reference_outputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], kwargs: dict[str, Any], isolated: _Isolation
) -> Any:
    try:
        with isolated():
            return model(*fresh_copies(inputs), **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise InputError(
            f"{type(model).__name__} raised {type(exc).__name__} when run on the example inputs "
            f"({describe_values(inputs)}){_where(exc)}: {first_line(exc)}\n"
            "Check that example_inputs have the number, shape and dtype forward expects."
        ) from None


def _propagate(
    root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], isolated: _Isolation
) -> Any:
    """Record ``tensor_meta`` on every node (as graph.propagate_shapes) and return the outputs."""
    try:
        with isolated():
            return record_shapes(root, fresh_copies(inputs), graph)
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"the captured graph of {type(root).__name__} does not run on the example inputs "
            f"({describe_values(inputs)}): {type(exc).__name__}: {first_line(exc)}\n{_WAYS_OUT}"
        ) from None


def _canonicalize(
    root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], isolated: _Isolation
) -> None:
    def record_shapes_now() -> None:  # shapes show canonicalization which values are tensors
        _propagate(root, graph, inputs, isolated)

    try:
        canonical.canonicalize_graph(graph, root, ensure_shapes=record_shapes_now)
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug here must still reach the user as a CaptureError
        raise CaptureError(
            f"graphopt could not canonicalize the graph of {type(root).__name__} ({type(exc).__name__}: "
            f"{first_line(exc)}); this is a graphopt bug, please report it. Meanwhile keep the layer "
            "involved opaque with leaf_modules=, or try the other capture mode."
        ) from None


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


def _plain(value: Any) -> Any:
    """fx's interpreter returns immutable_dict/immutable_list: compare them as dict/list."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _reproduction_problem(reference: Any, got: Any) -> str:
    """How ``got`` differs from the model's outputs ``reference``, or ''."""
    want_leaves, want_spec = pytree.tree_flatten(reference)
    got_leaves, got_spec = pytree.tree_flatten(_plain(got))
    if want_spec != got_spec and not _same_fields(want_spec, got_spec):
        return f"the graph returns {got_spec} where the model returns {want_spec}"
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        problem = _difference(w, g)
        if problem:
            return f"output {i}: {problem}"
    return ""


def _keep_output_container(graph: fx.Graph, reference: Any) -> None:
    """Record the model's output structure on the output node where the graph returns the same
    fields in another container: the graph module then returns the model's type."""
    want = pytree.tree_flatten(reference)[1]
    output = next(iter(reversed(graph.nodes)))
    got = pytree.tree_flatten(output.args[0])[1]
    if want != got and _same_fields(want, got):
        output.meta[lazy.OUTPUT_SPEC_KEY] = want


def _same_fields(want: pytree.TreeSpec, got: pytree.TreeSpec) -> bool:
    """Whether two output structures differ only in the mapping type holding the same fields in
    the same order: torch.export returns a ``ModelOutput``'s fields as a plain dict."""
    if want.num_children != got.num_children:
        return False
    if want.type is not got.type:
        mappings = all(isinstance(t, type) and issubclass(t, dict) for t in (want.type, got.type))
        if not mappings or list(want.context or []) != list(got.context or []):
            return False
    elif want.context != got.context:
        return False
    return all(w == g or _same_fields(w, g) for w, g in zip(want.children(), got.children()))


def _check_reproduces(root: nn.Module, reference: Any, got: Any) -> None:
    problem = _reproduction_problem(reference, got)
    if problem:
        raise CaptureError(
            f"the captured graph of {type(root).__name__} does not reproduce the model on the example "
            f"inputs ({problem}). The model probably depends on something the trace cannot see "
            "(Python state, a branch taken at trace time, an in-place write to an input).\n" + _WAYS_OUT
        )


def _difference(want: Any, got: Any) -> str:
    if not isinstance(want, torch.Tensor):
        return "" if type(want) is type(got) and want == got else f"{got!r} instead of {want!r}"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return f"{_spec(got)} instead of {_spec(want)}"
    if not want.is_floating_point():
        return "" if torch.equal(want, got) else "different values"
    diff = (want.double() - got.double()).abs().nan_to_num(0.0)
    both_nan = torch.isnan(want) == torch.isnan(got)
    scale = want.double().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if want.numel() else 0.0
    if bool(both_nan.all()) and (not diff.numel() or diff.max().item() <= 1e-5 + 1e-4 * scale):
        return ""
    return f"max abs difference {diff.max().item():.3g}"


def _spec(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


# -- symbolic front end ---------------------------------------------------------------------------


class _CaptureTracer(fx.Tracer):
    """fx tracer that keeps standard layers, hooked, parametrized and user-chosen modules as leaves."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = (), leaf_names: frozenset[str] = frozenset()):
        # (no-argument construction: unpickling a GraphModule re-traces its code with its graph's tracer)
        super().__init__()
        # buffers become graph values, so ``self.buf.add_(1)`` is recorded, not run while tracing
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.user_leaves: set[str] = set()
        self.lowerings: dict[str, tuple[lowerings.Step, ...]] = {}  # path -> steps, for layers to inline
        self.lowered: list[str] = []  # paths of the layers inlined while tracing
        self.stack_texts: dict[tuple[tuple[str, int, str], ...], str] = {}

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output"):
            node.meta["stack_trace"] = _user_stack(self.stack_texts)
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # noqa: ANN001
                     proxy_factory_fn=None) -> fx.Proxy:  # noqa: ANN001
        """A standard layer's call becomes its functional calls right away (what
        canonicalization would do to its ``call_module`` node, without making that node)."""
        if kind == "call_module" and name is None and proxy_factory_fn is None and len(args) == 1 \
                and not kwargs and target not in self.user_leaves:
            lowered = self._lower(target, args[0])
            if lowered is not None:
                return lowered
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def _lower(self, path: str, arg: Any) -> fx.Proxy | None:
        steps = self.lowerings.get(path)
        if steps is None or not isinstance(arg, fx.Proxy):
            return None  # canonicalization lowers what is left (e.g. a layer fed a constant)
        value = arg.node
        # the meta the call_module node would have had (see fx's TracerBase.create_node)
        origin_meta: dict[str, Any] = {"stack_trace": _user_stack(self.stack_texts)}
        if self.module_stack:  # an OrderedDict: its copy() is copy.copy's result, without the reduce
            origin_meta["nn_module_stack"] = self.module_stack.copy()
        self.lowered.append(path)
        return self.proxy(canonical.emit_lowering(self.graph, steps, value, path, origin_meta))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            self.user_leaves.add(module_qualified_name)
            return True
        if isinstance(m, lowerings.LOWERABLE_TYPES) or lowerings.is_opaque(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_symbolic(
    root: nn.Module,
    leaf_types: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
    concrete_args: dict[str, Any] | None,
    fixed_kwargs: dict[str, Any],
) -> tuple[fx.Graph, list[str]]:
    """The traced graph, with standard layers already inlined, and the paths of those layers."""
    tracer = _CaptureTracer(leaf_types, leaf_names)
    # Lowerings are read off the layers before tracing: while tracing, fx intercepts module
    # attribute reads (a parameter read scans all parameters and records a get_attr node).
    tracer.lowerings = {path: steps for path, m in root.named_modules()
                        if type(m) in lowerings.MODULE_LOWERINGS and (steps := lowerings.lowering_for(m)) is not None}
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise CaptureError(
            f"could not trace {type(root).__name__} symbolically{_where(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}\n{_WAYS_OUT}"
        ) from None
    finally:
        # fx's trace leaves the tracer in a reference cycle (through a recursive nested
        # function); emptying it lets what it holds (the copy's own containers, the lowerings)
        # be freed when capture is done, not by a later collection of that cycle
        state = vars(tracer).copy()
        vars(tracer).clear()
    for node in graph.nodes:
        if node.op == "call_module" and node.target in state["user_leaves"]:
            node.meta["keep_module"] = True
    _drop_specialized_arguments(graph, root, fixed_kwargs)
    return graph, state["lowered"]


def _drop_specialized_arguments(graph: fx.Graph, root: nn.Module, fixed: dict[str, Any]) -> None:
    """Remove the placeholders fx keeps for concrete args, with the asserts that guard them."""
    if not fixed:
        return
    params = [p for p in inspect.signature(root.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for param, node in zip(params, placeholders):
        if param.name in fixed:
            _erase_guard_cone(graph, node)


def _erase_guard_cone(graph: fx.Graph, placeholder: fx.Node) -> None:
    """Erase ``placeholder`` and everything computed from it, if all of that only feeds asserts."""
    cone: list[fx.Node] = []
    frontier = [placeholder]
    while frontier:
        node = frontier.pop()
        if node in cone:
            continue
        cone.append(node)
        frontier.extend(node.users)
    if any(n.op == "output" for n in cone):
        return
    if any(u not in cone for n in cone for u in n.users):
        return
    if not all(n is placeholder or n.target is torch._assert or n.users for n in cone):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(cone, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


# -- export front end -----------------------------------------------------------------------------


def _trace_export(root: nn.Module, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]] | None = None,
                  static: dict[str, str] | None = None) -> fx.Graph:
    """Export ``root``; with dynamic dims in ``dims``, symbolic in those.

    Examples of size 0 or 1 at a dynamic dim (which export specializes) are traced at the
    dim's second size. Where export finds the model constrains a dim (``seq <= 64``), its
    suggested fixes are taken and the dim's range recorded in ``dims`` (the graph refuses sizes
    outside it); a dim export specializes, or a dynamic export that still fails, is recorded
    in ``static`` with the reason and the model exported with the example's shapes there."""
    static = static if static is not None else {}
    recorded = shapes.build(inputs, dims or [], static)
    traced_at, dynamic = shapes.export_spec(recorded, inputs)
    reason = ""
    for _ in range(3 if dynamic is not None else 0):
        try:
            program = torch.export.export(root, traced_at, dynamic_shapes=dynamic)
        except Exception as exc:  # noqa: BLE001 - export raises many kinds; static is the way out
            reason = f"torch.export cannot keep it dynamic: {type(exc).__name__}: {first_line(exc)[:200]}"
            refined = _refined(exc, dynamic)
            if refined is None:
                break
            dynamic = refined
            continue
        if _record_export_ranges(program, dynamic, dims, static):
            return _unlift(program, root)
        break  # a dim became static: export again with the example's shapes there
    else:
        if dynamic is not None:
            reason = reason or "torch.export's suggested fixes did not converge"
    if dynamic is not None:
        names = shapes.dynamic_names(shapes.build(inputs, dims or [], static))
        if names and reason:
            for name in names:
                static.setdefault(name, reason)
        if names and not reason:  # some dims static, the rest still dynamic: export once more
            return _trace_export(root, inputs, dims, static)
    try:
        program = torch.export.export(root, inputs)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        raise CaptureError(
            f"torch.export could not capture {type(root).__name__}{_where(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}\n"
            'Ways out: mode="symbolic" with leaf_modules=/concrete_args=, or express data-dependent '
            "branches with torch.cond."
        ) from None
    return _unlift(program, root)


def _refined(exc: BaseException, dynamic: Any) -> Any:
    """``dynamic`` with torch.export's suggested fixes for ``exc`` applied, or None."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    text = str(exc)
    if "Suggested fixes:" not in text:
        return None
    # only the fixes themselves: the parser chokes on the advice torch prints after them
    fixes = re.findall(r"^\s+\w+ = .+$", text.split("Suggested fixes:", 1)[1], flags=re.MULTILINE)
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), dynamic)
    except Exception:  # noqa: BLE001 - a message it cannot read: no refinement
        return None
    return None if refined == dynamic else refined


def _record_export_ranges(program: torch.export.ExportedProgram, dynamic: Any, dims: list[dict[int, Any]],
                          static: dict[str, str]) -> bool:
    """Copy the range torch.export kept for each dynamic dim into ``dims`` (as a ``Dim`` of the
    same name and those bounds); a dim it specialized to a number, or tied to another by an
    expression, goes to ``static``. False when one did (the caller exports again)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n, spec in zip(placeholders, program.graph_signature.input_specs) if spec.kind == InputKind.USER_INPUT]
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    all_kept = True
    for i, entry in enumerate(dims):
        for dim, value in list(entry.items()):
            name = value if isinstance(value, str) else value.__name__
            if name in static:
                continue
            given = dynamic[i].get(dim) if i < len(dynamic) and isinstance(dynamic[i], dict) else None
            if isinstance(given, int) or given is None:
                static[name] = "torch.export specialized it: the model's code fixes this size"
                all_kept = False
                continue
            size = user[i].meta["val"].shape[dim] if i < len(user) and "val" in user[i].meta else None
            expr = str(size.node.expr) if isinstance(size, torch.SymInt) else None
            if expr is None or expr not in ranges:
                static[name] = (f"torch.export tied it to other sizes ({expr})" if expr is not None
                                else "torch.export specialized it to the example size")
                all_kept = False
                continue
            # export keeps a dim generic from 2 on (it specializes 0 and 1); size 1 is checked
            # apart (_extend_to_size_one)
            low, high = shapes.finite(ranges[expr].lower), shapes.finite(ranges[expr].upper)
            bounds = {"min": max(low or 0, 2)} | ({"max": high} if high is not None else {})
            entry[dim] = torch.export.Dim(name, **bounds)
    return all_kept


def _extend_to_size_one(root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]],
                        static: dict[str, str], kwargs: dict[str, Any], isolated: _Isolation) -> None:
    """torch.export keeps a dim generic from size 2 on; where the exported graph reproduces the
    model at size 1 too, that size is accepted (batch 1 is the common case on a phone)."""
    recorded = shapes.build(inputs, dims, static)
    for name, size in shapes.dynamic_names(recorded).items():
        low, high = shapes.input_dims_bounds(recorded, name) or (0, None)
        if low != 2:
            continue
        ok = size == 1  # an example of size 1 was traced at the second size, and checked at 1
        if not ok:
            resized = shapes.resized_inputs(recorded, inputs, {name: 1})
            try:
                with isolated():
                    want = root(*fresh_copies(resized), **kwargs)
                with isolated():
                    got = execute(root, fresh_copies(resized), graph)
                ok = not _reproduction_problem(want, got)
            except Exception:  # noqa: BLE001 - the model or the graph refuses size 1: keep the bound
                ok = False
        if ok:
            for entry in dims:
                for dim, value in list(entry.items()):
                    if (value if isinstance(value, str) else value.__name__) == name:
                        entry[dim] = torch.export.Dim(name, min=1, **({"max": high} if high is not None else {}))
    shapes.declare(graph, shapes.build(inputs, dims, static))


def _unlift(program: torch.export.ExportedProgram, root: nn.Module) -> fx.Graph:
    """The exported graph with parameters/buffers as ``get_attr`` of their qualified names."""
    signature = program.graph_signature
    input_specs = {s.arg.name: s for s in signature.input_specs}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    getters: dict[str, fx.Node] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = input_specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                env[node] = graph.placeholder(node.name)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = _constant_target(root, spec.target, program) if spec.kind == InputKind.CONSTANT_TENSOR \
                    else spec.target
                env[node] = getters[spec.target] = graph.get_attr(target)
            else:
                raise CaptureError(f"exported graph input {node.name} is a {spec.kind.name}, which capture does "
                                   'not support; use mode="symbolic".')
        elif node.op == "output":
            graph.output(_outputs(program, graph, node, env, getters))
        else:
            new = graph.node_copy(node, env.__getitem__)
            new.meta = {"provenance": _export_provenance(node)}
            if "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            if node.meta.get("stack_trace"):
                new.meta["stack_trace"] = _user_frames(node.meta["stack_trace"])
            env[node] = new
    for getter in getters.values():
        if not getter.users:  # export lists every buffer, used or not
            graph.erase_node(getter)
    return graph


def _constant_target(root: nn.Module, name: str, program: torch.export.ExportedProgram) -> str:
    """Attribute path of a lifted tensor constant, registering it on ``root`` if it has none."""
    try:
        if isinstance(get_attr_value(root, name), torch.Tensor):
            return name
    except AttributeError:
        pass
    attr = unique_attr_name(root, name)
    root.register_buffer(attr, program.constants[name], persistent=False)
    return attr


def _outputs(
    program: torch.export.ExportedProgram,
    graph: fx.Graph,
    output: fx.Node,
    env: dict[fx.Node, fx.Node],
    getters: dict[str, fx.Node],
) -> Any:
    """The user's outputs in the model's own structure; buffer and input updates the exported
    program returns become explicit ``copy_`` writes."""
    user_outputs = []
    for spec, value in zip(program.graph_signature.output_specs, output.args[0]):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(env[value] if isinstance(value, fx.Node) else value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            graph.call_method("copy_", (getters[spec.target], env[value]))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            placeholder = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.target)
            graph.call_method("copy_", (placeholder, env[value]))
        else:
            raise CaptureError(f"exported graph output kind {spec.kind.name} is not supported by capture; "
                               'use mode="symbolic".')
    out_spec = program.call_spec.out_spec
    return pytree.tree_unflatten(user_outputs, out_spec) if out_spec is not None else tuple(user_outputs)


_LOWERABLE_NAMES = {f"{t.__module__}.{t.__qualname__}" for t in lowerings.LOWERABLE_TYPES}


def _export_provenance(node: fx.Node) -> str:
    """The layer's path for ops a standard layer produced (as symbolic capture records), else the name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, type_name = list(stack.values())[-1]
        if type_name in _LOWERABLE_NAMES and path:
            return path
    return node.name


# -- pointing at the user's code ------------------------------------------------------------------


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]*)(?:\n(?P<code>    [^\n]*))?')


def _is_library_file(path: str) -> bool:
    path = os.path.abspath(path) if not path.startswith("<") else path
    if path.startswith(_TORCH_DIR) or path in _OWN_FILES:
        return True
    return path.startswith(_STDLIB_DIR) and not path.startswith(_SITE_DIRS)


def _user_frames(trace: str) -> str:
    """A formatted stack trace without torch's frames, so its last frame is the user's line."""
    frames = [m for m in _FRAME.finditer(trace) if not _is_library_file(m["file"])]
    return "".join(
        f'  File "{m["file"]}", line {m["line"]}, in {m["fn"]}\n' + (f"{m['code']}\n" if m["code"] else "")
        for m in frames
    )


_LIBRARY_FILES: dict[str, bool] = {}  # file name -> _is_library_file(file name)


def _user_stack(texts: dict[tuple[tuple[str, int, str], ...], str]) -> str:
    """The current stack, user frames only, outermost first, formatted like fx's stack traces.

    (fx's own ``record_stack_traces`` symbolizes through torch._inductor, a multi-second import.)
    Called for every traced node, so it walks frames directly, with a dict lookup per frame
    (a function call per frame cost more than the rest of the walk), and formats each distinct
    stack once (``texts`` caches the text per tuple of (file, line, function)).
    """
    frames = []
    library_files = _LIBRARY_FILES
    stop = _trace_symbolic.__code__  # frames further out are capture's caller, not the model
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is stop:
            break
        library = library_files.get(code.co_filename)
        if library is None:
            library = library_files[code.co_filename] = _is_library_file(code.co_filename)
        if not library:
            frames.append(frame)
        frame = frame.f_back
    key = tuple([(f.f_code.co_filename, f.f_lineno, f.f_code.co_name) for f in frames])
    text = texts.get(key)
    if text is None:
        for f in frames:  # as traceback.StackSummary.extract: source of modules without a file
            linecache.lazycache(f.f_code.co_filename, f.f_globals)
        summary = traceback.StackSummary.from_list([(*where, None) for where in reversed(key)])
        text = texts[key] = "".join(summary.format())
    return text


def _where(exc: BaseException) -> str:
    """' at file:line (`code`)' for the innermost frame of ``exc`` in the user's code, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library_file(f.filename)]
    if not frames:
        return ""
    frame = frames[-1]
    code = f" `{frame.line.strip()}`" if frame.line else ""
    return f" at {frame.filename}:{frame.lineno} in {frame.name}{code}"
