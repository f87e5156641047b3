"""The records of a channel analysis: :class:`Fixed` dims, the tensor dims a group cuts
(:class:`ParamDim`), layers (:class:`Layer`), groups (:class:`ChannelGroup`) and the analysis
itself (:class:`ChannelAnalysis`), plus the two private records an analysis carries for
:func:`graphopt.channels.prune`: the tensors read through ``get_attr`` with their atoms, and the
op arguments that count channels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch
import torch.fx as fx


@dataclass(frozen=True)
class Fixed:
    """A dimension whose size cannot change, and why."""

    why: str


#: the rows of a tensor value: per dim, its atom ids (one per index) or Fixed
Labels = list


# --------------------------------------------------------------------------- public records


@dataclass(eq=False)
class ParamDim:
    """One dim of one tensor a group cuts: ``positions[u]`` are the indices of that dim that
    belong to the group's unit ``u`` (every row has ``width`` entries)."""

    names: tuple[str, ...]
    dim: int
    size: int
    positions: np.ndarray  # (units, width) int64

    @property
    def width(self) -> int:
        return int(self.positions.shape[1])

    def __str__(self) -> str:
        return f"{self.names[0]}[dim {self.dim}] ({self.size}, {self.width} per unit)"


@dataclass(eq=False)
class Layer:
    """A conv, transposed conv or linear node and the atoms of its channel dims."""

    node: fx.Node
    kind: str  # "conv" | "conv_transpose" | "linear" | "addmm"
    name: str
    weight: fx.Node
    out_dim: int  # weight dim of the output channels
    in_dim: int  # weight dim of the input channels
    out_atoms: np.ndarray
    in_atoms: np.ndarray | Fixed  # input-channel row of the value fed in
    in_value: fx.Node
    in_value_dim: int  # dim of ``in_value`` holding the input channels
    groups: int = 1


@dataclass(eq=False)
class ChannelGroup:
    """Units that occur in exactly the same tensor dims; pruned under one ratio.

    ``units`` are unit ids ordered by their first index in the reference dim (for a conv
    producer, unit ``i`` is output channel ``i`` unless a grouped conv or group norm made a
    unit span several channels: ``width`` channels per unit). ``producers`` are the layers
    whose output channels the group holds, ``consumers`` those reading them as input
    channels. ``frozen`` lists ``(node, reason)`` pairs; a frozen group must not be cut.
    ``args`` describes the op arguments a cut rewrites.
    """

    id: int
    units: np.ndarray
    width: int
    dims: list[ParamDim]
    producers: list[Layer]
    consumers: list[Layer]
    frozen: list[tuple[str, str]]
    args: list[str]

    @property
    def channels(self) -> int:
        """Channels of the group in its reference dim (a producer's output channels)."""
        return len(self.units) * self.width

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.producers]

    @property
    def name(self) -> str:
        names = self.layer_names or [layer.name for layer in self.consumers] or [self.dims[0].names[0]]
        return names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")

    def __len__(self) -> int:
        return len(self.units)

    def __str__(self) -> str:
        state = "frozen: " + "; ".join(f"{n}: {r}" for n, r in self.frozen[:3]) if self.frozen else "prunable"
        return f"group {self.id} {self.name}: {self.channels} channels, {state}"


@dataclass(eq=False)
class ChannelAnalysis:
    """The coupling structure of one graph module (valid until the graph changes)."""

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    unit_of_atom: np.ndarray
    layers: list[Layer]
    graph: nx.Graph  # bipartite: ("group", id) -- ("dim", name, dim) nodes
    _tensors: dict[int, "_Tensor"] = field(repr=False)
    _arg_updates: list["_ArgUpdate"] = field(repr=False)
    _values: dict[fx.Node, Any] = field(repr=False)
    _blocked: dict[int, str] = field(repr=False)  # unit -> why its values may vary with the input
    _tensor_uses: dict[int, int] = field(repr=False)  # id(tensor) -> number of get_attr readers

    def units(self, atoms: np.ndarray | Fixed) -> np.ndarray | None:
        """Unit id per index of an atom row (None for a fixed dim)."""
        return None if isinstance(atoms, Fixed) else self.unit_of_atom[atoms]

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.frozen and len(g.units) > 1]

    def group_of(self, layer: str) -> ChannelGroup | None:
        """The group holding the output channels of the layer named ``layer``."""
        for g in self.groups:
            if layer in g.layer_names:
                return g
        return None

    def value_units(self, node: fx.Node) -> list[np.ndarray | None] | None:
        """Unit id per index of every dim of ``node``'s value (None entries: fixed dims)."""
        labels = self._values.get(node)
        if not isinstance(labels, list):
            return None
        return [self.units(row) for row in labels]


# --------------------------------------------------------------------------- private records


@dataclass
class _Tensor:
    """A tensor read through get_attr: its names and the atoms of each of its dims."""

    tensor: torch.Tensor
    names: list[str]
    atoms: list[np.ndarray]


@dataclass
class _ArgUpdate:
    """An op argument that depends on channel counts: ``rows`` are the atom rows it counts
    (also used to tell groups apart), ``apply(kept)`` rewrites the node given a function that
    counts the indices of a row that survive."""

    node: fx.Node
    what: str
    rows: list[tuple[str, np.ndarray]]
    apply: Callable[[Callable[[np.ndarray], int]], None]
