"""Running modules without side effects: the deep copy capture works on (:class:`_Copier`) and
runs of that copy that leave the RNG, parameters and buffers as they were (:class:`_Isolation`)."""
from __future__ import annotations

import collections
import copy
import copyreg
import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import canonical
from graphopt.errors import CaptureError, GraphoptError, InputError, first_line
from graphopt.ir.graph import describe_values, fresh_copies, record_shapes
from graphopt.capture.messages import _WAYS_OUT, _where


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
