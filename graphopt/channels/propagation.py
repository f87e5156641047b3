"""The walk behind :func:`graphopt.channels.analyze`: :class:`_Propagation` gives every dimension
of every value a row of atoms (or :class:`~graphopt.channels.records.Fixed`) and records which
atoms couple (``unify``, ``coarsen``), which freeze, which vary with the input, and which op
arguments count channels. The rule per op comes from the table it is given
(:data:`graphopt.channels.rules._RULES`); an op without one freezes what it touches."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.channels.records import Fixed, Labels, Layer, _ArgUpdate, _Tensor
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value
from graphopt.ir.purity import mutated_values


@dataclass(frozen=True)
class _Size:
    """The value of ``x.shape`` / ``x.size()``: reading it reads every dim of ``source``."""

    source: fx.Node


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

    def __init__(self, gm: fx.GraphModule, rules: dict[str, Callable[[_Propagation, fx.Node], None]]):
        self.gm = gm
        self.rules = rules  # op key -> rule (graphopt.channels.rules._RULES)
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
                rule = self.rules.get(fused or _op_key(node))
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
