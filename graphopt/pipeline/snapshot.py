"""The state of a graph module around a pass: snapshots to roll a failing pass back, the
fingerprint that tells whether a pass changed anything, and the walks over its tensors the
manager's checks and the report's figures use.

Rollback is cheap: a snapshot copies the graph and the module containers and shares the
tensors, so passes must never modify a tensor in place (the manager checks version counters).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import lazy


class _Snapshot:
    """The state of a graph module before a pass: a copy of its graph and of its module tree's
    containers, sharing the tensors. Building the runnable module waits until a rollback or a
    divergence search needs it; after :meth:`restore` the snapshot is spent (the manager
    mutates what it returned)."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = copy.deepcopy(gm.graph)
        keep = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        self.root = _shallow_tree(gm, "", keep)
        self.class_name = gm.__class__.__name__
        self.training = gm.training
        self.meta = dict(getattr(gm, "meta", {}))
        self._module: fx.GraphModule | None = None

    def module(self) -> fx.GraphModule:
        """The state as a module, to run (not to mutate)."""
        if self._module is None:
            # the copied tree becomes the module's own (GraphModule(root, graph) would walk and
            # rebuild it once per attribute the graph reads)
            empty = fx.Graph(tracer_cls=self.graph._tracer_cls, tracer_extras=self.graph._tracer_extras)
            gm = lazy.graph_module(torch.nn.Module(), empty, self.class_name)
            state = gm.__dict__
            for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                state[key] = self.root.__dict__[key]
            for key, value in self.root.__dict__.items():
                if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants)
                    state[key] = value
            gm.graph = self.graph
            gm.meta = self.meta
            gm.train(self.training)
            self._module = gm
        return self._module

    restore = module  # the manager takes the module itself; the snapshot is not used again
    spent_by_restore = True


class _Unchanged:
    """The state of the working module while it still equals the caller's graph module, which
    the manager never mutates: until a pass changes something, rollback copies that module
    again and no snapshot is taken."""

    spent_by_restore = False

    def __init__(self, gm: fx.GraphModule):
        self._gm = gm

    def module(self) -> fx.GraphModule:
        return self._gm

    def restore(self) -> fx.GraphModule:
        return _copy_graph_module(self._gm)


def _shallow_tree(module: torch.nn.Module, prefix: str, keep: set[str]) -> torch.nn.Module:
    """Plain containers mirroring ``module``'s tree and sharing its tensors; modules the graph
    calls (opaque ``call_module`` targets) are kept as they are."""
    if prefix in keep:
        return module
    new = torch.nn.Module()
    new.training = module.training
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():
        if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants)
            new.__dict__[key] = value
    for name, child in module._modules.items():
        new._modules[name] = None if child is None else _shallow_tree(child, f"{prefix}.{name}" if prefix else name, keep)
    return new


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph module with its own graph and containers over the same tensors: passes
    never write tensors in place, so the caller's module stays as it was."""
    return _Snapshot(gm).module()


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by qualified name, each tensor once (under its first name),
    from one walk of the module tree: a pass step needs them for versions, its fingerprint and
    byte counts, and walking a tree of thousands of containers once per use was a fifth of a
    large pipeline's time."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in gm.named_modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out[f"{prefix}.{name}" if prefix else name] = t
    return out


def _graph_nodes(gm: fx.GraphModule) -> int:
    """The report's node count: every node but the inputs and the output (constant and
    parameter reads included, so removing one shows)."""
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _read_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the graph reads (through get_attr, or inside a module it calls): the report's
    bytes, which a pass that leaves tensors behind for eliminate-dead-code does not inflate."""
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    out = []
    for name, t in tensors.items():
        parts = name.split(".")
        if any(".".join(parts[:k]) in targets for k in range(1, len(parts) + 1)):
            out.append(t)
    return out


def _tensor_versions(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {name: (id(t), t._version) for name, t in tensors.items()}


#: node.meta entries derived by analysis; anything else a pass writes there (fusion units,
#: quantization parameters, ...) is part of what it changed.
_DERIVED_META = frozenset({"tensor_meta", "type", "stack_trace", "nn_module_stack", "provenance",
                           "val", "example_value", "source_fn_stack", "original_aten", "seq_nr",
                           "from_node", "torch_fn"})


def _leaf_key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value


def _fingerprint(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> tuple:
    """What a pass can change: graph structure, the tensors behind attributes, and the meta
    entries passes write. Cheaper than regenerating code, so unchanged graphs skip recompiling,
    shape propagation and verification."""
    structure = tuple(
        (n.name, n.op, n.target if isinstance(n.target, str) else id(n.target),
         fx.node.map_aggregate(n.args, _leaf_key), fx.node.map_aggregate(n.kwargs, _leaf_key))
        for n in gm.graph.nodes
    )
    meta = frozenset(
        (n.name, k, repr(v)) for n in gm.graph.nodes for k, v in n.meta.items() if k not in _DERIVED_META
    )
    return structure, frozenset((k, id(t)) for k, t in tensors.items()), meta

