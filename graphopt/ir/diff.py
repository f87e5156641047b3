"""Structural views of a graph and the diff between two of them, for reports and viewers.

A :class:`GraphView` is a picture-free record of one state of a graph: per node its op, the
names of the nodes it reads, shape, dtype, provenance (the module path the node came from) and
the marks a pass leaves (fusion unit, int8 region, float island). Node identity across passes
is the fx node name: a node a pass keeps keeps its name, a node it creates gets a fresh one.
:func:`diff` compares two views by name: added, removed, and changed (same name, other op,
inputs, shape or dtype); a layer whose channel dim shrank records kept/removed channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.ir import ops


@dataclass(frozen=True)
class NodeView:
    name: str
    kind: str  # fx op: placeholder, get_attr, call_function, call_method, call_module, output
    op: str  # the canonical op name where known, else the target's name
    inputs: tuple[str, ...]
    shape: tuple[Any, ...] | None
    dtype: str | None
    provenance: str
    #: "int8" (quantize/dequantize or reading only dequantized values), "float" (a float island
    #: in a graph that holds int8 regions), or None
    precision: str | None = None
    #: the node this one was fused with, as the fusing pass recorded it (the layer's name)
    fusion: str | None = None

    def module_path(self) -> str:
        """The module the node came from ('' for the top level)."""
        return self.provenance.rsplit(".", 1)[0] if "." in self.provenance else ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "op": self.op, "inputs": list(self.inputs),
                "shape": None if self.shape is None else [str(d) for d in self.shape], "dtype": self.dtype,
                "provenance": self.provenance, "precision": self.precision, "fusion": self.fusion}


@dataclass
class GraphView:
    nodes: dict[str, NodeView]

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass
class GraphDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # name -> what changed
    #: layers whose channel dim (dim 1) shrank: name -> (channels before, channels after)
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)

    def status(self, name: str) -> str:
        if name in self.changed:
            return "changed"
        return "added" if name in self.added else "removed" if name in self.removed else "same"

    def to_dict(self) -> dict[str, Any]:
        return {"added": list(self.added), "removed": list(self.removed), "changed": dict(self.changed),
                "channels": {k: list(v) for k, v in self.channels.items()}}


def _op_label(node: fx.Node) -> str:
    name = ops.op_name(node)
    if name:
        return name
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "get_attr":
        return "constant"
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _precision(node: fx.Node, has_int8: bool) -> str | None:
    if not has_int8 or node.op in ("placeholder", "output", "get_attr"):
        return None
    from graphopt.quantization import qdq

    if qdq.is_qdq(node):
        return "int8"
    read = [a for a in node.all_input_nodes if a.op != "get_attr"]
    if read and all(qdq.is_dequantize(a) or qdq.is_weight_dequantize(a) or qdq.is_dynamic_dequantize(a)
                    for a in read):
        return "int8"
    tm = G.tensor_meta(node)
    return "float" if tm is not None and tm.dtype.is_floating_point else None


def view(gm: fx.GraphModule) -> GraphView:
    """The structural view of ``gm``'s graph as it is now."""
    from graphopt.quantization import qdq

    has_int8 = qdq.has_qdq(gm)
    nodes: dict[str, NodeView] = {}
    for node in gm.graph.nodes:
        tm = G.tensor_meta(node)
        fusion = node.meta.get("fused_into") or (node.name if "fusion_unit" in node.meta else None)
        nodes[node.name] = NodeView(
            name=node.name, kind=node.op, op=_op_label(node),
            inputs=tuple(a.name for a in node.all_input_nodes),
            shape=None if tm is None else tuple(int(d) if isinstance(d, int) else str(d) for d in tm.shape),
            dtype=None if tm is None else str(tm.dtype).removeprefix("torch."),
            provenance=G.provenance(node), precision=_precision(node, has_int8), fusion=fusion,
        )
    return GraphView(nodes)


def diff(before: GraphView, after: GraphView) -> GraphDiff:
    """What changed from ``before`` to ``after``, by node name."""
    out = GraphDiff()
    out.removed = [n for n in before.nodes if n not in after.nodes]
    out.added = [n for n in after.nodes if n not in before.nodes]
    for name, a in after.nodes.items():
        b = before.nodes.get(name)
        if b is None:
            continue
        what = [field_name for field_name in ("op", "inputs", "shape", "dtype", "precision", "fusion")
                if getattr(a, field_name) != getattr(b, field_name)]
        if what:
            out.changed[name] = what
        if b.shape and a.shape and len(b.shape) == len(a.shape) >= 2 \
                and a.kind not in ("output", "get_attr", "placeholder"):
            cb, ca = b.shape[1], a.shape[1]
            if isinstance(cb, int) and isinstance(ca, int) and ca < cb:
                out.channels[name] = (cb, ca)
    return out
