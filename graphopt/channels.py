"""Channel coupling: which tensor dimensions of a canonical graph must be pruned together, and
with which index mapping.

The model. Every dimension of every tensor the graph reads through ``get_attr`` is a row of
*atoms*, one per index. Propagating through the graph gives every dimension of every value a
row of atoms as well, or marks it :class:`Fixed` (its size cannot change: a graph input, a
spatial extent, the output of an op the analysis does not understand). Ops *couple* atoms:

- ``conv`` / ``linear``: input channel ``i`` is weight column ``i``; output channel ``o`` is
  weight row ``o`` and bias ``o``. Kernel extents are fixed.
- grouped conv (``groups > 1``, depthwise included): every input and output channel of one
  conv group becomes one unit, so whole groups are pruned and ``groups`` is rewritten.
- batch norm: channel ``c`` is every statistic and affine entry ``c``; group norm couples the
  channels of each norm group into one unit (``num_groups`` is rewritten); layer norm couples
  its affine entries with the normalized dims (``normalized_shape`` is rewritten).
- elementwise ops (add, mul, ...): equal-sized dims couple index by index. A size-1 dim that
  broadcasts couples nothing: ``mask[N,1,H,W] * x[N,C,H,W]`` leaves ``C`` free, while
  ``s[N,C,1,1] * x[N,C,H,W]`` couples ``C`` of both.
- ``cat`` along a channel dim concatenates the rows (offset mapping); ``split`` with explicit
  sections slices them (the sections are rewritten); ``chunk`` / an even ``split`` couples
  index ``i`` of every piece, so every piece keeps the same count.
- ``flatten`` / ``view`` / ``reshape`` / ``permute`` / ``transpose``: the rows are moved with
  the data. Flattening ``(C, H, W)`` maps channel ``c`` to features ``c*H*W .. (c+1)*H*W-1``;
  splitting features into ``(C, H, W)`` (Linear -> view -> ConvTranspose) couples each block
  of ``H*W`` features into one unit. Size arguments are rewritten.

Coupled atoms form a *unit* (a connected component of the atom coupling graph): removing a
unit removes every index that carries one of its atoms, in every tensor, and every op stays
consistent. Units that occur in exactly the same tensor dims (same places, same widths) form
a :class:`ChannelGroup`, the thing a pruner ranks and cuts. :attr:`ChannelAnalysis.graph` is
the resulting structure as a networkx graph (group nodes linked to the tensor dims they cut),
for inspection and drawing.

Conservative by default: an op without a rule here *freezes* every channel it touches, with
the reason recorded (:attr:`ChannelGroup.frozen`) instead of a crash. Graph outputs,
graph inputs, opaque ``call_module`` calls, reductions over channels, channel counts read as
numbers (``x.size(1)``), reshape sizes computed at run time and in-place ops freeze the
channels adjacent to them; the classifier's output never changes shape.

Use::

    analysis = graphopt.channels.analyze(gm)
    for group in analysis.groups:
        print(group)                      # layers, channels, frozen reasons, tensor dims
    graphopt.channels.prune(gm, analysis, drop_units)   # slices tensors and rewrites args
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value, propagate_shapes, set_tensor
from graphopt.ir.purity import mutated_values

__all__ = ["Fixed", "ParamDim", "Layer", "ChannelGroup", "ChannelAnalysis", "DeadUnit", "analyze", "prune",
           "dead_units", "layer_name"]


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


# --------------------------------------------------------------------------- internals


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


@dataclass(frozen=True)
class _Size:
    """The value of ``x.shape`` / ``x.size()``: reading it reads every dim of ``source``."""

    source: fx.Node


_UNARY = {
    "relu", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardsigmoid",
    "hardswish", "relu6", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to",
    "abs", "neg", "exp", "clamp", "clip", "square", "sqrt", "rsqrt", "reciprocal", "softplus", "selu", "celu",
}
_BINARY = {"add", "sub", "mul", "truediv", "div", "maximum", "minimum"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_POOLS = {
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "interpolate",
}
_FUNCTION_KEYS: dict[Any, str] = {
    operator.getitem: "getitem", getattr: "getattr", torch.reshape: "reshape", torch.permute: "permute",
    torch.transpose: "transpose", torch.split: "split", torch.chunk: "chunk", torch.mean: "mean",
    torch.sum: "sum", torch.amax: "amax", torch.amin: "amin", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", F.interpolate: "interpolate", F.pad: "pad", torch.maximum: "maximum",
    torch.minimum: "minimum", torch.clamp: "clamp", torch.clip: "clip", torch.abs: "abs", torch.neg: "neg",
    torch.exp: "exp", F.relu6: "relu6", torch.add: "add", torch.mul: "mul", torch.sub: "sub",
    torch.div: "div", operator.add: "add", operator.mul: "mul", operator.sub: "sub",
    operator.truediv: "truediv", F.softplus: "softplus", torch.flatten: "flatten", torch.cat: "cat",
}


def _op_key(node: fx.Node) -> str:
    name = ops.op_name(node)
    if name is not None:
        return name
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        # graphs from torch.export call aten overloads (aten.view.default): the rule is the op's,
        # whose positional arguments the overloads share
        return node.target.overloadpacket.__name__
    try:
        return _FUNCTION_KEYS.get(node.target) or getattr(node.target, "__name__", str(node.target))
    except TypeError:  # unhashable target
        return str(node.target)


def layer_name(weight: fx.Node, node: fx.Node) -> str:
    """A layer's name: the module path owning its weight (``layer1.0.conv1``), else provenance."""
    if weight.op == "get_attr":
        owner, _, field_name = str(weight.target).rpartition(".")
        return owner or field_name
    return str(node.meta.get("provenance", node.name))


def _meta_shapes(node: fx.Node) -> Any:
    """Shape of a tensor node, a tuple of shapes for tuple outputs, else None."""
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, TensorMetadata):
        return tuple(tm.shape)
    if isinstance(tm, (tuple, list)) and tm and all(isinstance(t, TensorMetadata) for t in tm):
        return tuple(tuple(t.shape) for t in tm)
    return None


class _Propagation:
    """Walks the graph once, assigning atom rows to values and recording couplings."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.count = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.freezes: list[tuple[np.ndarray, str, str]] = []  # (atoms, node name, reason)
        self.blocks: list[tuple[np.ndarray, str]] = []  # atoms whose values may vary with the input
        self.values: dict[fx.Node, Any] = {}
        self.tensors: dict[int, _Tensor] = {}
        self.tensor_uses: dict[int, int] = {}
        self.arg_updates: list[_ArgUpdate] = []
        self.layers: list[Layer] = []
        self.input_dependent: set[fx.Node] = set()

    # ---------------------------------------------------------------- primitives

    def fresh(self, size: int) -> np.ndarray:
        atoms = np.arange(self.count, self.count + size, dtype=np.int64)
        self.count += size
        return atoms

    def freeze(self, row: Any, node: fx.Node, reason: str) -> None:
        if isinstance(row, np.ndarray) and row.size:
            self.freezes.append((row, node.name, reason))

    def block(self, row: Any, reason: str) -> None:
        if isinstance(row, np.ndarray) and row.size:
            self.blocks.append((row, reason))

    def unify(self, a: Any, b: Any, node: fx.Node) -> Any:
        """Couple two rows index by index; returns the coupled row (Fixed wins)."""
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            if a.shape != b.shape:
                self.freeze(a, node, f"coupled dims of different sizes ({a.size} vs {b.size})")
                self.freeze(b, node, f"coupled dims of different sizes ({a.size} vs {b.size})")
                return Fixed(f"size mismatch at {node.name}")
            self.edges.append((a, b))
            return a
        if isinstance(a, np.ndarray):
            self.freeze(a, node, f"coupled with a dimension that cannot change ({b.why})")
            return b
        if isinstance(b, np.ndarray):
            self.freeze(b, node, f"coupled with a dimension that cannot change ({a.why})")
        return a

    def coarsen(self, row: np.ndarray, block: int) -> None:
        """Couple every ``block`` consecutive indices of ``row`` into one unit."""
        if block > 1 and row.size:
            blocks = row.reshape(-1, block)
            self.edges.append((np.repeat(blocks[:, 0], block - 1), blocks[:, 1:].reshape(-1)))

    def fixed_value(self, node: fx.Node, why: str) -> Any:
        shapes = _meta_shapes(node)
        if shapes is None:
            return None
        if shapes and isinstance(shapes[0], tuple):
            return tuple([Fixed(why)] * len(s) for s in shapes)
        return [Fixed(why)] * len(shapes)

    def labels(self, value: Any) -> Labels | None:
        """Rows of a tensor argument (None for non-tensors)."""
        if isinstance(value, fx.Node):
            v = self.values.get(value)
            return v if isinstance(v, list) else None
        return None

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for inp in node.all_input_nodes:
            v = self.values.get(inp)
            if isinstance(v, _Size):
                v = self.values.get(v.source)
            for rows in (v if isinstance(v, tuple) else (v,)):
                if isinstance(rows, list):
                    for row in rows:
                        self.freeze(row, node, reason)

    # ---------------------------------------------------------------- walk

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if any(i in self.input_dependent or i.op == "placeholder" for i in node.all_input_nodes):
                self.input_dependent.add(node)
            if node.op == "placeholder":
                self.values[node] = self.fixed_value(node, f"graph input {node.name!r}")
            elif node.op == "get_attr":
                self.values[node] = self.get_attr(node)
            elif node.op == "output":
                self.freeze_inputs(node, "graph output: its shape must not change")
            elif node.op == "call_module":
                self.freeze_inputs(node, f"read by opaque module call {node.target!r}")
                self.values[node] = self.fixed_value(node, f"output of opaque module {node.target!r}")
            else:
                # the in-place activation of a fusion unit writes only into its conv's output,
                # which nothing else reads: channels flow through it as through the activation
                fused = ops.fused_activation_op(node)
                rule = _RULES.get(fused or _op_key(node))
                if rule is None or (mutated_values(node) and fused is None):
                    self.unknown(node)
                else:
                    rule(self, node)
        self.freeze_opaque_parameters()

    def unknown(self, node: fx.Node) -> None:
        what = _op_key(node)
        reason = (f"{what} ({node.name}) writes into its input" if mutated_values(node)
                  else f"{what} ({node.name}) has no channel rule")
        self.freeze_inputs(node, reason)
        self.values[node] = self.fixed_value(node, f"output of {what} ({node.name})")

    def get_attr(self, node: fx.Node) -> Any:
        try:
            value = get_attr_value(self.gm, node)
        except AttributeError:
            return None
        if not isinstance(value, torch.Tensor):
            return None
        key = id(value)
        self.tensor_uses[key] = self.tensor_uses.get(key, 0) + 1
        info = self.tensors.get(key)
        if info is None:
            info = self.tensors[key] = _Tensor(value, [], [self.fresh(s) for s in value.shape])
        if str(node.target) not in info.names:
            info.names.append(str(node.target))
        return list(info.atoms)

    def freeze_opaque_parameters(self) -> None:
        inside = set()
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module = self.gm.get_submodule(str(node.target))
                inside |= {id(t) for t in list(module.parameters()) + list(module.buffers())}
        for key, info in self.tensors.items():
            if key in inside:
                for atoms in info.atoms:
                    self.freeze(atoms, self.gm.graph.output_node(),
                                f"{info.names[0]} is also used inside an opaque module")

    def set(self, node: fx.Node, labels: Any) -> None:
        self.values[node] = labels


# --------------------------------------------------------------------------- op rules


def _conv(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None:
        return p.unknown(node)
    spatial = len(w) - 2
    cdim = len(x) - spatial - 1
    for row in w[2:]:
        p.freeze(row, node, "kernel extent")
    groups = ops.arg(node, "groups")
    if not isinstance(groups, int):
        p.freeze_inputs(node, f"groups of {node.name} is computed at run time")
        p.set(node, p.fixed_value(node, "conv with computed groups"))
        return
    out_row, in_row = w[0], x[cdim]
    b = p.labels(b_node)
    if b is not None:
        p.unify(out_row, b[0], node)
    if groups == 1:
        p.unify(in_row, w[1], node)
    else:
        p.freeze(w[1], node, "per-group input width of a grouped conv (whole groups are pruned instead)")
        _couple_conv_groups(p, node, in_row, out_row, groups)
    for row in x[cdim + 1:]:
        p.freeze(row, node, "spatial dim read by a conv")
    name = layer_name(w_node, node)
    p.layers.append(Layer(node, "conv", name, w_node, 0, 1, out_row, in_row, x_node, cdim, groups))
    p.set(node, list(x[:cdim]) + [out_row] + [Fixed("spatial extent")] * spatial)


def _couple_conv_groups(p: _Propagation, node: fx.Node, in_row: Any, out_row: np.ndarray, groups: int) -> None:
    """Whole conv groups: inputs and outputs of group k become one unit; ``groups`` follows."""
    per_out = out_row.size // groups
    p.coarsen(out_row, per_out)
    heads = out_row[::per_out]
    if isinstance(in_row, Fixed):
        p.freeze(out_row, node, f"grouped conv on input channels that cannot change ({in_row.why})")
        return
    per_in = in_row.size // groups
    p.coarsen(in_row, per_in)
    p.edges.append((heads, in_row[::per_in]))
    cin = in_row.size

    def apply(kept: Callable[[np.ndarray], int], node=node, in_row=in_row, groups=groups, cin=cin) -> None:
        ops.set_arg(node, "groups", groups * kept(in_row) // cin)

    p.arg_updates.append(_ArgUpdate(node, f"groups of {node.name}", [(f"{node.name}.groups", in_row)], apply))


def _conv_transpose(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None:
        return p.unknown(node)
    if ops.arg(node, "groups") != 1:
        return p.unknown(node)
    spatial = len(w) - 2
    cdim = len(x) - spatial - 1
    for row in w[2:]:
        p.freeze(row, node, "kernel extent")
    p.unify(x[cdim], w[0], node)
    b = p.labels(b_node)
    if b is not None:
        p.unify(w[1], b[0], node)
    for row in x[cdim + 1:]:
        p.freeze(row, node, "spatial dim read by a transposed conv")
    p.layers.append(Layer(node, "conv_transpose", layer_name(w_node, node), w_node, 1, 0, w[1], x[cdim],
                          x_node, cdim))
    p.set(node, list(x[:cdim]) + [w[1]] + [Fixed("spatial extent")] * spatial)


def _linear(p: _Propagation, node: fx.Node) -> None:
    x_node, w_node, b_node = (ops.arg(node, n) for n in ("input", "weight", "bias"))
    x, w = p.labels(x_node), p.labels(w_node)
    if x is None or w is None or len(w) != 2:
        return p.unknown(node)
    p.unify(x[-1], w[1], node)
    b = p.labels(b_node)
    if b is not None:
        p.unify(w[0], b[0], node)
    p.layers.append(Layer(node, "linear", layer_name(w_node, node), w_node, 0, 1, w[0], x[-1], x_node, len(x) - 1))
    p.set(node, list(x[:-1]) + [w[0]])


def _addmm(p: _Propagation, node: fx.Node) -> None:
    """``addmm(bias, x, w)``: a linear layer with its weight stored ``(in, out)``, as
    transformers' ``Conv1D`` (GPT-2) computes on ``x`` flattened to 2-D."""
    b_node, x_node, w_node = node.args[:3]
    x, w, b = p.labels(x_node), p.labels(w_node), p.labels(b_node)
    if x is None or w is None or b is None or len(x) != 2 or len(w) != 2 or not b:
        return p.unknown(node)
    p.unify(x[1], w[0], node)
    p.unify(w[1], b[-1], node)
    if len(b) == 2:
        p.unify(x[0], b[0], node)
    p.layers.append(Layer(node, "addmm", layer_name(w_node, node), w_node, 1, 0, w[1], x[1], x_node, 1))
    p.set(node, [x[0], w[1]])


def _power(p: _Propagation, node: fx.Node) -> None:
    """``x ** c`` with a number ``c``: elementwise (GPT-2's tanh-approximated gelu cubes)."""
    if len(node.args) < 2 or not isinstance(node.args[1], (int, float)):
        return p.unknown(node)
    _unary(p, node)


def _batch_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    if x is None or len(x) < 2:
        return p.unknown(node)
    row = x[1]
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            row = p.unify(row, t[0], node)
    if ops.arg(node, "training") is not False:
        p.block(x[1], "batch norm normalizes with batch statistics")
    p.set(node, list(x))


def _group_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    groups = ops.arg(node, "num_groups")
    if x is None or len(x) < 2 or not isinstance(groups, int):
        return p.unknown(node)
    row = x[1]
    for name in ("weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            p.unify(row, t[0], node)
    if isinstance(row, np.ndarray):
        p.coarsen(row, row.size // groups)
        p.block(row, "group norm normalizes across channels")
        channels = row.size

        def apply(kept: Callable[[np.ndarray], int], node=node, row=row) -> None:
            ops.set_arg(node, "num_groups", groups * kept(row) // channels)

        p.arg_updates.append(_ArgUpdate(node, f"num_groups of {node.name}", [(f"{node.name}.num_groups", row)], apply))
    p.set(node, list(x))


def _layer_norm(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    shape = ops.arg(node, "normalized_shape")
    if x is None or not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
        return p.unknown(node)
    k = len(shape)
    rows = x[len(x) - k:]
    for name in ("weight", "bias"):
        t = p.labels(ops.arg(node, name))
        if t is not None:
            for a, b in zip(rows, t):
                p.unify(a, b, node)
    labeled = [(i, r) for i, r in enumerate(rows) if isinstance(r, np.ndarray)]
    for _, r in labeled:
        p.block(r, "layer norm normalizes across channels")
    if labeled:
        def apply(kept: Callable[[np.ndarray], int], node=node, shape=tuple(shape), labeled=labeled) -> None:
            new = list(shape)
            for i, r in labeled:
                new[i] = kept(r)
            ops.set_arg(node, "normalized_shape", tuple(new))

        p.arg_updates.append(_ArgUpdate(node, f"normalized_shape of {node.name}",
                                        [(f"{node.name}.normalized_shape.{i}", r) for i, r in labeled], apply))
    p.set(node, list(x))


def _unary(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0] if node.args else None)
    others = [a for a in node.all_input_nodes if a is not node.args[0] and p.labels(a) is not None]
    if x is None or others:  # e.g. clamp with tensor bounds: not a one-operand op
        return p.unknown(node)
    if ops.is_op(node, "dropout"):
        for row in x:
            p.block(row, "dropout in training mode")
    p.set(node, list(x))


def _softmax(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(ops.arg(node, "input"))
    dim = ops.arg(node, "dim")
    if x is None or not isinstance(dim, int):
        return p.unknown(node)
    p.block(x[dim], f"{_op_key(node)} normalizes across channels")
    p.set(node, list(x))


def _binary(p: _Propagation, node: fx.Node) -> None:
    out_shape = _meta_shapes(node)
    if not isinstance(out_shape, tuple) or (out_shape and isinstance(out_shape[0], tuple)):
        return p.unknown(node)
    operands = [a for a in list(node.args[:2]) if isinstance(a, fx.Node)]
    if any(p.labels(a) is None and _meta_shapes(a) is not None for a in operands):
        return p.unknown(node)
    rank = len(out_shape)
    out: Labels = []
    for d in range(rank):
        full, broadcast = [], []
        for a in operands:
            rows, shape = p.labels(a), _meta_shapes(a)
            if rows is None or not isinstance(shape, tuple):
                continue  # a Python number
            k = d - (rank - len(rows))
            if k < 0:
                broadcast.append(a)
            elif shape[k] == out_shape[d]:
                full.append(rows[k])
            else:
                broadcast.append(a)
        row: Any = Fixed("broadcast")
        for i, r in enumerate(full):
            row = r if i == 0 else p.unify(row, r, node)
        if isinstance(row, np.ndarray) and any(a in p.input_dependent or a.op == "placeholder" for a in broadcast):
            p.block(row, f"{node.name} combines each channel with a value broadcast over channels")
        out.append(row)
    p.set(node, out)


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


def _attention(p: _Propagation, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, attn_mask)`` on ``(..., heads, seq, head_dim)``:
    head ``h`` of q, k, v and the output couple index by index, so a cut removes whole heads
    (the view that splits a projection into ``(B, S, heads, head_dim)`` makes each head one
    unit); q and k's head_dim couple (their dot product), v's is the output's. A head_dim
    that shrinks would change the default scale ``1/sqrt(head_dim)``: it is frozen unless
    ``scale`` is given. A mask couples where it is not broadcast."""
    q, k, v = (p.labels(ops.call_arg(node, name, i)) for i, name in enumerate(("query", "key", "value")))
    mask = ops.call_arg(node, "attn_mask", 3)
    mask_rows, mask_shape = p.labels(mask), _meta_shapes(mask) if isinstance(mask, fx.Node) else None
    if q is None or k is None or v is None or not (len(q) == len(k) == len(v) >= 3) or (
            isinstance(mask, fx.Node) and (mask_rows is None or not isinstance(mask_shape, tuple))):
        return p.unknown(node)
    if ops.call_arg(node, "enable_gqa", 6, False):
        return p.unknown(node)
    lead = [p.unify(p.unify(a, b, node), c, node) for a, b, c in zip(q[:-2], k[:-2], v[:-2])]
    key_seq = p.unify(k[-2], v[-2], node)
    head_dim = p.unify(q[-1], k[-1], node)
    if ops.call_arg(node, "scale", 5) is None:
        p.freeze(head_dim, node, "head_dim sets the attention's default scale 1/sqrt(head_dim)")
    out: Labels = [*lead, q[-2], v[-1]]
    if mask_rows is not None:
        scores = [*lead, q[-2], key_seq]
        for j, (row, size) in enumerate(zip(reversed(mask_rows), reversed(mask_shape))):
            target = scores[len(scores) - 1 - j] if j < len(scores) else None
            if target is not None and size != 1:
                p.unify(target, row, node)
    for row in lead:  # a head whose weights are zero still outputs its value bias: not a dead unit
        p.block(row, f"{node.name} mixes each head's values over positions")
    p.set(node, out)


def _reduction(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0])
    dims = ops.call_arg(node, "dim", 1)
    keepdim = ops.call_arg(node, "keepdim", 2, False)
    if x is None or not isinstance(keepdim, bool):
        return p.unknown(node)
    if dims is None:
        dims = tuple(range(len(x)))
    dims = {d % len(x) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    out: Labels = []
    for d, row in enumerate(x):
        if d in dims:
            p.freeze(row, node, f"{_op_key(node)} reduces over channels")
            if keepdim:
                out.append(Fixed("reduced dim"))
        else:
            out.append(row)
    p.set(node, out)


def _pool(p: _Propagation, node: fx.Node) -> None:
    key = _op_key(node)
    x = p.labels(node.args[0])
    shape = _meta_shapes(node)
    if x is None or not isinstance(shape, tuple) or not shape or isinstance(shape[0], tuple):
        return p.unknown(node)  # e.g. return_indices=True
    spatial = 1 if key.endswith("1d") else 2 if key.endswith("2d") else len(x) - 2
    for row in x[len(x) - spatial:]:
        p.freeze(row, node, f"spatial dim read by {key}")
    if key.startswith("avg_pool") and ops.arg(node, "count_include_pad") and _nonzero(ops.arg(node, "padding")):
        for row in x[:len(x) - spatial]:
            p.block(row, f"{key} averages zero padding into border values")
    p.set(node, list(x[:len(x) - spatial]) + [Fixed("spatial extent")] * spatial)


def _nonzero(value: Any) -> bool:
    """True if a padding argument (int, tuple or string) pads anything."""
    if isinstance(value, str):
        return value != "valid"
    if isinstance(value, (tuple, list)):
        return any(_nonzero(v) for v in value)
    return value != 0


def _pad(p: _Propagation, node: fx.Node) -> None:
    x = p.labels(node.args[0])
    pad = ops.call_arg(node, "pad", 1)
    if x is None or not isinstance(pad, (tuple, list)):
        return p.unknown(node)
    padded = len(pad) // 2
    for row in x[len(x) - padded:]:
        p.freeze(row, node, "padded dim")
    for row in x[:len(x) - padded]:
        p.block(row, "padding adds values that are not the channel's constant")
    p.set(node, list(x[:len(x) - padded]) + [Fixed("padded extent")] * padded)


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


_RULES: dict[str, Callable[[_Propagation, fx.Node], None]] = {
    **{k: _conv for k in ("conv1d", "conv2d", "conv3d")},
    **{k: _conv_transpose for k in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    "linear": _linear,
    "addmm": _addmm,
    "pow": _power,
    "batch_norm": _batch_norm,
    "group_norm": _group_norm,
    "layer_norm": _layer_norm,
    **{k: _unary for k in _UNARY | {"dropout"}},
    "softmax": _softmax,
    "log_softmax": _softmax,
    "scaled_dot_product_attention": _attention,
    **{k: _binary for k in _BINARY},
    "cat": _cat,
    "split": _split,
    "chunk": _split,
    "getitem": _getitem,
    "size": _size,
    "getattr": _size,
    "permute": _permute,
    "transpose": _permute,
    **{k: _reduction for k in _REDUCTIONS},
    **{k: _pool for k in _POOLS},
    "pad": _pad,
    **{k: _reshape for k in _RESHAPES},
}


# --------------------------------------------------------------------------- analysis


def analyze(gm: fx.GraphModule, example_inputs: Any = None) -> ChannelAnalysis:
    """The channel-coupling structure of canonical graph module ``gm``.

    Needs ``meta["tensor_meta"]`` on every node (from capture or
    :func:`graphopt.ir.graph.propagate_shapes`); pass ``example_inputs`` to (re)compute it.
    """
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    p = _Propagation(gm)
    p.run()

    unit_of_atom = _components(p.count, p.edges)

    frozen: dict[int, list[tuple[str, str]]] = {}
    for atoms, node_name, reason in p.freezes:
        for unit in np.unique(unit_of_atom[atoms]).tolist():
            reasons = frozen.setdefault(unit, [])
            if (node_name, reason) not in reasons and len(reasons) < 8:
                reasons.append((node_name, reason))
    blocked: dict[int, str] = {}
    for atoms, reason in p.blocks:
        for unit in np.unique(unit_of_atom[atoms]).tolist():
            blocked.setdefault(unit, reason)

    groups = _groups(p, unit_of_atom, frozen) if p.count else []
    graph = nx.Graph()
    for g in groups:
        graph.add_node(("group", g.id), channels=g.channels, frozen=bool(g.frozen))
        for dim in g.dims:
            graph.add_edge(("group", g.id), ("dim", dim.names[0], dim.dim), width=dim.width)
    return ChannelAnalysis(gm, groups, unit_of_atom, p.layers, graph, p.tensors, p.arg_updates, p.values,
                           blocked, p.tensor_uses)


def _components(count: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected component (unit) of every atom; units are numbered in the order of their first
    atom, so ids follow tensor order and are deterministic.

    Vectorized label propagation: every atom takes the smallest label across its edges, then
    labels follow their own labels to a fixed point (pointer jumping). At the fixed point both
    ends of every edge agree and each label is an atom of its component. (networkx's
    connected_components took 1.5 s on MobileNetV2's ~100k atoms; this takes milliseconds.)
    """
    labels = np.arange(count, dtype=np.int64)
    if edges:
        a = np.concatenate([x for x, _ in edges])
        b = np.concatenate([y for _, y in edges])
        while True:
            lowest = np.minimum(labels[a], labels[b])
            new = labels.copy()
            np.minimum.at(new, a, lowest)
            np.minimum.at(new, b, lowest)
            while True:
                jumped = new[new]
                if np.array_equal(jumped, new):
                    break
                new = jumped
            if np.array_equal(new, labels):
                break
            labels = new
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def _groups(p: _Propagation, unit_of_atom: np.ndarray, frozen: dict[int, list[tuple[str, str]]]) -> list[ChannelGroup]:
    """Partition units by footprint: the (tensor dim or op argument, width) pairs holding them."""
    slots: list[tuple[Any, np.ndarray, _Tensor | None, int]] = []  # (key, units per index, tensor, dim)
    for info in p.tensors.values():
        for dim, atoms in enumerate(info.atoms):
            slots.append(((info.names[0], dim), unit_of_atom[atoms], info, dim))
    for update in p.arg_updates:
        for key, atoms in update.rows:
            slots.append(((key, -1), unit_of_atom[atoms], None, -1))

    present = [np.unique(units, return_counts=True) for _, units, _, _ in slots]
    unit_col = np.concatenate([u for u, _ in present])
    slot_col = np.concatenate([np.full(len(u), s) for s, (u, _) in enumerate(present)])
    count_col = np.concatenate([c for _, c in present])
    order = np.lexsort((slot_col, unit_col))
    unit_col, footprint = unit_col[order], np.stack([slot_col[order], count_col[order]], 1)
    bounds = np.flatnonzero(np.diff(unit_col)) + 1
    by_signature: dict[bytes, list[int]] = {}
    for units, rows in zip(np.split(unit_col, bounds), np.split(footprint, bounds)):
        by_signature.setdefault(rows.tobytes(), []).append(int(units[0]))

    signatures = list(by_signature.values())
    group_of_unit = np.full(int(unit_of_atom.max()) + 1, -1, dtype=np.int64)
    rank = np.zeros_like(group_of_unit)
    for g, units in enumerate(signatures):
        group_of_unit[units] = g
        rank[units] = np.arange(len(units))

    def groups_of(atoms: np.ndarray) -> list[int]:
        return np.unique(group_of_unit[unit_of_atom[atoms]]).tolist()

    producers: dict[int, list[Layer]] = {}
    consumers: dict[int, list[Layer]] = {}
    for layer in p.layers:
        out_groups = groups_of(layer.out_atoms)
        for g in out_groups:
            producers.setdefault(g, []).append(layer)
        if isinstance(layer.in_atoms, np.ndarray):
            for g in set(groups_of(layer.in_atoms)) - set(out_groups):
                consumers.setdefault(g, []).append(layer)
    args: dict[int, set[str]] = {}
    for update in p.arg_updates:
        for _, atoms in update.rows:
            for g in groups_of(atoms):
                args.setdefault(g, set()).add(update.what)
    # Index mapping: per tensor dim, the indices of each group's units, unit by unit.
    dims: dict[int, list[ParamDim]] = {}
    for _, units_row, info, dim in slots:
        if info is None:
            continue
        g_row = group_of_unit[units_row]
        order = np.lexsort((rank[units_row], g_row))  # by group, then unit; stable keeps index order
        for chunk in np.split(order, np.flatnonzero(np.diff(g_row[order])) + 1):
            g = int(g_row[chunk[0]])
            dims.setdefault(g, []).append(
                ParamDim(tuple(info.names), dim, units_row.size, chunk.reshape(len(signatures[g]), -1)))

    producer_dims = {(name, layer.out_dim) for layer in p.layers for name in _weight_names(p, layer)}
    groups = []
    for g, units in enumerate(signatures):
        group_dims = dims[g]
        # Reference dim: a producer's output channels (the narrowest units), else the first dim.
        candidates = [d for d in group_dims if (d.names[0], d.dim) in producer_dims]
        ref = min(candidates, key=lambda d: d.width) if candidates else group_dims[0]
        order = np.argsort(ref.positions[:, 0], kind="stable")
        for d in group_dims:
            d.positions = d.positions[order]
        reasons: list[tuple[str, str]] = []
        for u in units:
            reasons += [r for r in frozen.get(u, ()) if r not in reasons]
        groups.append(ChannelGroup(g, np.asarray(units, dtype=np.int64)[order], ref.width, group_dims,
                                   producers.get(g, []), consumers.get(g, []), reasons[:8],
                                   sorted(args.get(g, ()))))
    return groups


def _weight_names(p: _Propagation, layer: Layer) -> list[str]:
    if layer.weight.op != "get_attr":
        return []
    info = p.tensors.get(id(get_attr_value(p.gm, layer.weight)))
    return info.names[:1] if info else []


# --------------------------------------------------------------------------- pruning


def prune(gm: fx.GraphModule, analysis: ChannelAnalysis, drop: Iterable[int],
          bias_deltas: dict[fx.Node, torch.Tensor] | None = None) -> int:
    """Remove the units ``drop`` from ``gm``: slice every tensor dim holding them (new tensors
    under the same names, ``requires_grad`` kept), rewrite the op arguments that count channels
    (groups, num_groups, normalized_shape, split sections, view/reshape sizes).

    ``bias_deltas`` maps a layer node to a tensor over its *original* output channels added to
    its bias (created when absent) after slicing: how bias compensation folds removed constant
    channels into the next layer. Never modifies a tensor in place. Returns the number of
    tensors replaced. Callers re-run shape propagation afterwards.
    """
    dropped = np.zeros(analysis.unit_of_atom.max() + 1 if analysis.unit_of_atom.size else 0, dtype=bool)
    dropped[list(drop)] = True

    def kept_index(atoms: np.ndarray) -> np.ndarray:
        return np.nonzero(~dropped[analysis.unit_of_atom[atoms]])[0]

    def kept(atoms: np.ndarray) -> int:
        return int((~dropped[analysis.unit_of_atom[atoms]]).sum())

    replaced = 0
    for info in analysis._tensors.values():
        new = info.tensor.detach()
        changed = False
        for dim, atoms in enumerate(info.atoms):
            index = kept_index(atoms)
            if index.size != atoms.size:
                new = new.index_select(dim, torch.as_tensor(index, device=new.device))
                changed = True
        if changed:
            _replace_tensor(gm, info, new)
            replaced += 1
    for update in analysis._arg_updates:
        if any(kept(atoms) != atoms.size for _, atoms in update.rows):
            update.apply(kept)
    for layer_node, delta in (bias_deltas or {}).items():
        layer = next(layer for layer in analysis.layers if layer.node is layer_node)
        _add_to_bias(gm, layer, delta.index_select(0, torch.as_tensor(kept_index(layer.out_atoms))))
        replaced += 1
    gm.graph.lint()
    gm.recompile()
    return replaced


def _replace_tensor(gm: fx.GraphModule, info: _Tensor, new: torch.Tensor) -> None:
    old = info.tensor
    if old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous() and new.dim() == 4:
        new = new.contiguous(memory_format=torch.channels_last)
    else:
        new = new.clone() if new.data_ptr() == old.data_ptr() else new.contiguous()
    value: torch.Tensor = torch.nn.Parameter(new, requires_grad=old.requires_grad) \
        if isinstance(old, torch.nn.Parameter) else new
    for name in info.names:
        set_tensor(gm, name, value)


def _add_to_bias(gm: fx.GraphModule, layer: Layer, delta: torch.Tensor) -> None:
    """``bias += delta`` as a new tensor; creates the bias (a Parameter) when the layer has none."""
    node = layer.node
    bias_node = ops.arg(node, "bias")
    weight = get_attr_value(gm, layer.weight)
    if isinstance(bias_node, fx.Node):
        old = get_attr_value(gm, bias_node)
        new = (old.detach().double() + delta.double()).to(old.dtype)
        value = torch.nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else new
        set_tensor(gm, str(bias_node.target), value)
        return
    owner_name = str(layer.weight.target).rpartition(".")[0]
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = torch.nn.Parameter(delta.to(weight.dtype), requires_grad=weight.requires_grad)
    if "bias" in owner._parameters and owner._parameters["bias"] is None:
        owner._parameters["bias"] = value
        target = f"{owner_name}.bias" if owner_name else "bias"
    else:
        from graphopt.ir.graph import add_parameter

        target = add_parameter(gm, f"{owner_name or node.name}.bias", value, requires_grad=weight.requires_grad)
    with gm.graph.inserting_before(node):
        new_node = gm.graph.get_attr(target)
    new_node.meta["provenance"] = layer.weight.meta.get("provenance", target)
    ops.set_arg(node, "bias", new_node)


# --------------------------------------------------------------------------- dead channels


@dataclass(eq=False)
class DeadUnit:
    """A unit whose removal leaves every output unchanged.

    Every layer producing it has all-zero weights for it, so its values are constants (the
    producers' biases pushed through per-channel ops). Where a consumer reads a non-zero
    constant ``k``, removing it is exact once ``k * W_next`` is folded into the consumer's bias:
    ``bias_deltas`` holds that term per consumer, over the consumer's original outputs.
    """

    unit: int
    bias_deltas: dict[fx.Node, torch.Tensor]


def dead_units(analysis: ChannelAnalysis, example_inputs: Any) -> dict[int, DeadUnit]:
    """Units that can be removed exactly (see :class:`DeadUnit`), by unit id.

    A unit qualifies when: it is not frozen; every producer reads its weight from an attribute
    and has all-zero weights for the unit (biases may be anything); every op its values pass
    through is a per-channel op that maps constants to constants (activations, inference batch
    norm, pooling without zero padding averaged in, layout ops, arithmetic with constants or
    with the same unit; not layer/group norm, softmax over channels, or a product with an
    input-dependent value broadcast over channels: ``_Propagation.block``); and every consumer
    is a linear layer, a conv without padding, or reads the constant 0 (zero padding would see
    the constant only inside the border). The constants are read off one run on
    ``example_inputs`` and checked to be constant there, so an analysis gap cannot go unnoticed.
    """
    gm = analysis.gm
    frozen_units = {int(u) for g in analysis.groups if g.frozen for u in g.units}
    zero_units: set[int] = set()
    live_units: set[int] = set()
    for layer in analysis.layers:
        units = analysis.units(layer.out_atoms)
        if layer.weight.op != "get_attr":
            live_units.update(units.tolist())
            continue
        weight = get_attr_value(gm, layer.weight).detach()
        rows = weight.movedim(layer.out_dim, 0).reshape(units.size, -1)
        rows_zero = (torch.linalg.vector_norm(rows, float("inf"), dim=1) == 0).numpy()
        live_units.update(units[~rows_zero].tolist())
        zero_units.update(units[rows_zero].tolist())
    candidates = zero_units - live_units - frozen_units - set(analysis._blocked)
    if not candidates:
        return {}

    consumers: dict[int, list[tuple[Layer, np.ndarray]]] = {}
    for layer in analysis.layers:
        in_units = analysis.units(layer.in_atoms)
        if in_units is None:
            continue
        out_units = set(analysis.units(layer.out_atoms).tolist())
        for u in (set(in_units.tolist()) & candidates) - out_units:
            consumers.setdefault(u, []).append((layer, np.nonzero(in_units == u)[0]))
    values = _values_of(gm, example_inputs, {layer.in_value for rows in consumers.values() for layer, _ in rows})

    dead: dict[int, DeadUnit] = {}
    for u in sorted(candidates):
        deltas: dict[fx.Node, torch.Tensor] = {}
        for layer, positions in consumers.get(u, []):
            delta = _compensation(gm, analysis, layer, positions, values[layer.in_value])
            if delta is None:
                break
            if bool((delta != 0).any()):
                deltas[layer.node] = delta
        else:
            dead[u] = DeadUnit(u, deltas)
    return dead


def _values_of(gm: fx.GraphModule, example_inputs: Any, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of the ``wanted`` nodes on one run of ``gm``."""
    seen: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in wanted:
                seen[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
    return seen


def _compensation(gm: fx.GraphModule, analysis: ChannelAnalysis, layer: Layer, positions: np.ndarray,
                  value: torch.Tensor) -> torch.Tensor | None:
    """``sum_p k_p * W[:, p]`` over ``positions`` for consumer ``layer`` (zeros when every
    constant is 0), or None when removing them from ``layer`` cannot be exact."""
    per_index = value.detach().movedim(layer.in_value_dim, -1)
    per_index = per_index.reshape(-1, per_index.shape[-1])[:, torch.as_tensor(positions)].double()
    k = per_index[0]
    if not bool(torch.isfinite(k).all()):
        return None
    spread = (per_index - k).abs().max().item() if per_index.numel() else 0.0
    if spread > 1e-6 * max(1.0, k.abs().max().item()):
        return None  # not constant after all: keep the unit
    weight_node = layer.weight
    out_size = int(layer.out_atoms.size)
    if not bool((k != 0).any()):
        return torch.zeros(out_size, dtype=torch.float64)
    if layer.kind == "conv_transpose" or (layer.kind == "conv" and _nonzero(ops.arg(layer.node, "padding"))):
        return None
    if (layer.kind == "conv" and layer.groups != 1) or layer.kind == "addmm":  # addmm: bias is its first argument
        return None
    if weight_node.op != "get_attr":
        return None
    bias_node = ops.arg(layer.node, "bias")
    if isinstance(bias_node, fx.Node):
        bias = get_attr_value(gm, bias_node) if bias_node.op == "get_attr" else None
        if bias is None or analysis._tensor_uses.get(id(bias), 0) != 1:
            return None  # a shared or computed bias cannot absorb this layer's compensation
    weight = get_attr_value(gm, weight_node).detach().double()
    columns = weight.index_select(layer.in_dim, torch.as_tensor(positions))
    columns = columns.reshape(columns.shape[0], columns.shape[1], -1).sum(-1)  # over kernel extent
    return columns @ k
