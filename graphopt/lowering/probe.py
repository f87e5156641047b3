"""Finding the offending nodes: every node of a graph the backend rejects when offered alone
(:meth:`Backend.probe` on a one-node graph fed with the node's example values), and the
:class:`~graphopt.errors.LoweringError` that names them with their source lines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from graphopt.errors import LoweringError, UnsupportedNodesError, exception_summary
from graphopt.ir import graph as G
from graphopt.lowering.support import collect_warnings

if TYPE_CHECKING:
    from graphopt.lowering.backend import Backend


@dataclass(frozen=True)
class OffendingNode:
    """A node the backend cannot take, and why."""

    node: str
    op: str
    source_line: str | None
    reason: str

    def __str__(self) -> str:
        where = f"at {self.source_line}" if self.source_line else "(source line unknown)"
        return f"node {self.node!r} ({self.op}) {where}: {self.reason}"


def _failure(lowering: Backend, gm: fx.GraphModule, inputs: tuple[Any, ...], headline: str) -> LoweringError:
    """What failed, every node the backend rejects when offered alone, and what to do:
    :class:`UnsupportedNodesError` when such nodes exist, else :class:`LoweringError`."""
    offenders = offending_nodes(lowering, gm, inputs)
    if not offenders:
        return LoweringError(
            f"{lowering.name}: {headline}\nNo node is rejected when offered to the backend alone, so the "
            "failure comes from the graph as a whole or from an option: try other options or another backend, "
            "and report the model if it should lower."
        )
    lines = [f"{lowering.name}: {headline}", f"{len(offenders)} node(s) this backend cannot take:"]
    lines += [f"  - {o}" for o in offenders]
    lines.append(f"What to do: {lowering.unsupported_advice}.")
    return UnsupportedNodesError("\n".join(lines), nodes=offenders)


def offending_nodes(lowering: Backend, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[OffendingNode]:
    """Every computing node of ``gm`` that ``lowering.probe`` rejects when offered alone.

    Nodes whose inputs or output are not tensors (``getitem`` of a tuple, ``size()``) are not
    offered. Identical nodes (same op, constant arguments and input shapes) are probed once.
    """
    with collect_warnings([]):  # what the probes make torch say is noise for the user
        return _probe_nodes(lowering, gm, example_inputs)


def _probe_nodes(lowering: Backend, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[OffendingNode]:
    values = _node_values(gm, example_inputs)
    verdicts: dict[Any, str | None] = {}
    offenders = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node not in values:
            continue
        try:
            probe = _one_node_module(gm, node, values)
        except Exception:  # a node FX cannot copy alone is not offered
            probe = None
        if probe is None:
            continue
        module, inputs, key = probe
        if key not in verdicts:
            try:
                verdicts[key] = lowering.probe(module, inputs)
            except Exception as exc:  # a probe that crashes is itself a rejection
                verdicts[key] = exception_summary(exc)
        if verdicts[key] is not None:
            offenders.append(OffendingNode(node.name, _describe_node(gm, node), G.source_line(node), verdicts[key]))
    return offenders


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = result = super().run_node(n)
        return result


def _node_values(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, Any]:
    """The value of every node on ``inputs``."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def _is_literal(value: Any) -> bool:
    """Values FX can write into generated code as constants."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_literal(v) for v in value)


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _one_node_module(
    gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]
) -> tuple[fx.GraphModule, tuple[Any, ...], Any] | None:
    """A graph module computing only ``node`` from placeholders, its inputs, and a dedup key."""
    if not _is_tensors(values.get(node)):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs, shapes = [], []
    for source in node.all_input_nodes:
        value = values.get(source)
        if source.op == "get_attr":
            env[source] = graph.get_attr(source.target)
        elif isinstance(value, torch.Tensor):
            env[source] = graph.placeholder(source.name)
            inputs.append(value)
        elif _is_literal(value):
            env[source] = value
        else:
            return None
        shapes.append((tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else repr(value))
    copy = graph.node_copy(node, lambda n: env[n])
    graph.output(copy)
    module = fx.GraphModule(gm, graph)
    target = repr(gm.get_submodule(node.target)) if node.op == "call_module" else str(node.target)
    constants = repr(fx.node.map_arg((node.args, node.kwargs), lambda n: "%"))
    return module, tuple(inputs), (node.op, target, constants, tuple(shapes))


def _describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}: {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"call_function {module + '.' if module and module != 'builtins' else ''}{name}"
