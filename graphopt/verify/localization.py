"""Localization: the first candidate node whose value departs from its reference partner's."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.errors import InputError, OptionError, exception_summary
from graphopt.verify.comparison import _compare_tensors, _kind
from graphopt.verify.running import _as_tensor
from graphopt.verify.tolerance import Tolerance
from graphopt.verify.verdicts import Divergence

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


class _NodeByNodeInterpreter(fx.Interpreter):
    """Runs a graph node by node, handing each node's value to ``on_value`` as it is computed."""

    def __init__(self, gm: fx.GraphModule, on_value: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        # We name the failing node ourselves; fx's extra traceback would also log the whole
        # graph through torch's structured tracing, which imports inductor (seconds).
        self.extra_traceback = False
        self.on_value = on_value
        self.executed: set[fx.Node] = set()
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.executed.add(n)
        self.on_value(n, result)
        return result


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [_as_tensor(value, "node value")]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


@dataclass
class _NodeStatus:
    diverges: bool
    max_abs: float
    max_rel: float
    reason: str | None


def _node_status(
    refs: list[torch.Tensor], cands: list[torch.Tensor], tolerance: Tolerance | None
) -> _NodeStatus | None:
    """How a candidate node's tensors compare with its partner's, or None if not comparable."""
    if not refs or len(refs) != len(cands):
        return None
    if any(r.shape != c.shape or _kind(r.dtype) != _kind(c.dtype) for r, c in zip(refs, cands)):
        return None
    try:
        results = [_compare_tensors(j, r, c, tolerance) for j, (r, c) in enumerate(zip(refs, cands))]
    except OptionError:  # a dtype without default tolerance (float8): not comparable
        return None
    reason = next((r.reason for r in results if r.reason is not None), None)
    return _NodeStatus(
        diverges=reason is not None,
        max_abs=max(r.figures.max_abs for r in results),
        max_rel=max(r.figures.max_rel for r in results),
        reason=reason,
    )


def _difference_reaches_output(
    node: fx.Node, status: dict[fx.Node, _NodeStatus], executed: set[fx.Node]
) -> bool:
    """False when every path from ``node`` to the output meets a matched node that agrees
    (the difference is undone, e.g. a fused op carrying an intermediate's provenance)."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output" or user not in executed:
            return True
        if user in status:
            if status[user].diverges:
                return True
            continue
        stack.extend(user.users)
    return False


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op.removeprefix('call_')} {node.target}"


def _where(node: fx.Node, line: str | None) -> str:
    at = f", at {line}" if line else ""
    return f"node {node.name!r} ({_op_name(node)}, provenance {G.provenance(node)!r}{at})"


def _localize(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: tuple[Any, ...], tolerance: Tolerance | None
) -> tuple[Divergence | None, str | None]:
    """The first divergent candidate node, or None and why none was found."""
    try:
        return _find_divergence(reference_gm, candidate_gm, inputs, tolerance)
    except Exception as exc:  # a diagnosis must not turn a verdict into a crash
        return None, f"localization failed: {exception_summary(exc)}"


def _find_divergence(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: tuple[Any, ...], tolerance: Tolerance | None
) -> tuple[Divergence | None, str | None]:
    ref_partner: dict[str, fx.Node] = {}
    for n in reference_gm.graph.nodes:
        if n.op in _COMPUTE_OPS:
            ref_partner[G.provenance(n)] = n  # the last node of a provenance holds its final value
    candidates = [n for n in candidate_gm.graph.nodes if n.op in _COMPUTE_OPS and G.provenance(n) in ref_partner]
    if not candidates:
        return None, (
            "no candidate node shares a provenance or name with a reference node, so the graphs cannot be matched"
        )
    partners = set(ref_partner.values())
    ref_values: dict[fx.Node, list[torch.Tensor]] = {}

    def keep_partner_value(node: fx.Node, value: Any) -> None:
        if node in partners:  # copies: a later in-place op of the graph must not change them
            ref_values[node] = [t.clone() for t in _tensor_leaves(value)]

    try:
        with torch.no_grad():
            _NodeByNodeInterpreter(reference_gm, keep_partner_value).run(*G.fresh_copies(inputs))
    except Exception as exc:  # the reference is not ours to fix; just say localization stopped
        return None, f"the reference graph raised while run node by node: {exception_summary(exc)}"

    # Judge candidate values as they come instead of keeping them: halves peak memory.
    matched = set(candidates)
    status: dict[fx.Node, _NodeStatus] = {}

    def judge(node: fx.Node, value: Any) -> None:
        if node in matched:
            reference = ref_values[ref_partner[G.provenance(node)]]
            node_status = _node_status(reference, _tensor_leaves(value), tolerance)
            if node_status is not None:
                status[node] = node_status

    cand_run = _NodeByNodeInterpreter(candidate_gm, judge)
    raised: tuple[fx.Node, Exception] | None = None
    try:
        with torch.no_grad():
            cand_run.run(*G.fresh_copies(inputs))
    except Exception as exc:  # a raising candidate node is itself the divergence
        assert cand_run.current is not None
        raised = (cand_run.current, exc)

    for n in candidate_gm.graph.nodes:
        if raised is not None and n is raised[0]:
            line = G.source_line(n)
            return Divergence(
                node=n.name, provenance=G.provenance(n), source_line=line, max_abs=math.inf, op=_op_name(n),
                message=f"{_where(n, line)} raised {exception_summary(raised[1])}",
            ), None
        node_status = status.get(n)
        if node_status is None or not node_status.diverges:
            continue
        if not _difference_reaches_output(n, status, cand_run.executed):
            continue
        partner = ref_partner[G.provenance(n)]
        line = G.source_line(n) or G.source_line(partner)
        return Divergence(
            node=n.name, provenance=G.provenance(n), source_line=line, max_abs=node_status.max_abs,
            max_rel=node_status.max_rel, reference_node=partner.name, op=_op_name(n),
            message=f"{_where(n, line)} {node_status.reason} against reference node {partner.name!r}",
        ), None

    if not status:
        return None, "no matched node pair has values of the same shape and kind to compare"
    if not any(s.diverges for s in status.values()):
        return None, (
            f"all {len(status)} matched node(s) agree within tolerance; the difference arises in "
            "candidate nodes that have no counterpart in the reference"
        )
    return None, (
        "every matched node that differs agrees again further down; the difference arises in "
        "candidate nodes that have no counterpart in the reference"
    )


def localize(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: Any, tolerance: Tolerance | None = None
) -> Divergence | None:
    """The first candidate node whose value diverges from the reference's on ``inputs``.

    None when nothing can be matched or every matched node agrees (:func:`compare` records why
    in ``Verdict.localization_note``). ``tolerance=None`` uses per-dtype defaults.
    """
    for role, gm in (("reference", reference_gm), ("candidate", candidate_gm)):
        if not isinstance(gm, fx.GraphModule):
            raise InputError(f"localize: the {role} must be a torch.fx.GraphModule, got {type(gm).__name__}")
    divergence, _ = _localize(reference_gm, candidate_gm, G.as_input_tuple(inputs), tolerance)
    return divergence
