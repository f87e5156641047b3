"""Per-node numeric error of a graph against the original it was optimized from.

The original graph is run node by node once per input set and the value of each provenance
(the last compute node of it, as :func:`graphopt.verify.localize` matches them) is kept; any
later state of the graph is then run node by node and each of its values is compared, on the
fly, with the kept value of its provenance. Values correspond when the provenance is the same
and so are shape and dtype (the last such node of a provenance wins: after quantization that is
the dequantized value the rest of the graph reads, not the int8 one). Error is the SQNR in dB
(the lowest over the inputs) and the largest absolute difference.

    original = history.record(gm_before, inputs_list)
    errors = history.node_errors(original, gm_after, inputs_list)   # provenance -> NodeError
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from graphopt.errors import exception_summary
from graphopt.ir import graph as G
from graphopt.verify.comparison import _as_float64, sqnr_from_powers
from graphopt.verify.localization import _COMPUTE_OPS, _NodeByNodeInterpreter, _tensor_leaves


@dataclass(frozen=True)
class NodeError:
    """How far one value has drifted from the original graph's: SQNR in dB (``inf`` when
    equal; the lowest over the inputs) and the largest absolute difference."""

    sqnr_db: float
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        from graphopt.fileio import jsonable

        return {"sqnr_db": jsonable(self.sqnr_db), "max_abs": jsonable(self.max_abs)}

    def __str__(self) -> str:
        sqnr = "inf" if self.sqnr_db == math.inf else f"{self.sqnr_db:.1f}"
        return f"SQNR {sqnr} dB, max abs {self.max_abs:.2e}"


@dataclass
class RecordedValues:
    """The original graph's floating-point values by provenance, one list of tensors per input
    set, each tensor's summed squares (the SQNR's signal, computed once), and the provenances
    in graph order."""

    values: dict[str, list[list[torch.Tensor]]]
    order: list[str]
    signals: dict[str, list[list[float]]]


def _power(t: torch.Tensor) -> float:
    """Summed squares of the finite entries, accumulated in float64."""
    finite = t if bool(torch.isfinite(t.abs().max())) else t[torch.isfinite(t)]
    return float(torch.linalg.vector_norm(finite, dtype=torch.float64)) ** 2 if finite.numel() else 0.0


def _floating(value: Any) -> list[torch.Tensor] | None:
    leaves = _tensor_leaves(value)
    if not leaves or not all(t.is_floating_point() for t in leaves):
        return None
    return leaves


def _run(gm: fx.GraphModule, inputs: tuple[Any, ...], on_value) -> None:
    with torch.no_grad(), G.preserved_state(gm):
        _NodeByNodeInterpreter(gm, on_value).run(*G.fresh_copies(inputs))


def record(gm: fx.GraphModule, inputs_list: Sequence[tuple[Any, ...]]) -> RecordedValues:
    """Run ``gm`` node by node on each input set and keep each provenance's last floating value."""
    values: dict[str, list[list[torch.Tensor]]] = {}
    order: list[str] = []
    for k, inputs in enumerate(inputs_list):
        def keep(node: fx.Node, value: Any, k: int = k) -> None:
            if node.op not in _COMPUTE_OPS:
                return
            leaves = _floating(value)
            if leaves is None:
                return
            key = G.provenance(node)
            per_input = values.setdefault(key, [])
            if k == 0 and key not in order:
                order.append(key)
            clones = [t.detach().clone() for t in leaves]  # a later in-place op must not change them
            if len(per_input) > k:
                per_input[k] = clones
            else:
                per_input.append(clones)

        _run(gm, inputs, keep)
    complete = {key: v for key, v in values.items() if len(v) == len(inputs_list)}
    signals = {key: [[_power(t) for t in per_input] for per_input in v] for key, v in complete.items()}
    return RecordedValues(complete, [key for key in order if key in complete], signals)


def _error(refs: list[torch.Tensor], signals: list[float], cands: list[torch.Tensor]) -> tuple[float, float] | None:
    """(SQNR dB, max abs) of one value over all its tensors, or None when they do not correspond.

    Taken on the difference alone when it is finite everywhere (then so are both sides; the
    common case, about ten times cheaper than comparing in float64); otherwise positions
    non-finite in both and equal are left out and any other non-finite difference is -inf dB."""
    if len(refs) != len(cands) or any(r.shape != c.shape or r.dtype != c.dtype for r, c in zip(refs, cands)):
        return None
    signal = sum(signals)
    noise = max_abs = 0.0
    for r, c in zip(refs, cands):
        if r.numel() == 0 or torch.equal(r, c):
            continue
        diff = (c.detach() - r).abs()
        largest = float(diff.max())
        if not math.isfinite(largest):
            r64, c64 = _as_float64(r), _as_float64(c)
            finite = torch.isfinite(r64) & torch.isfinite(c64)
            if bool((~finite & (r64 != c64) & ~(torch.isnan(r64) & torch.isnan(c64))).any()):
                return -math.inf, math.inf  # a non-finite value that differs
            diff = (r64 - c64).abs()[finite]
            largest = float(diff.max()) if diff.numel() else 0.0
        noise += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
        max_abs = max(max_abs, largest)
    return sqnr_from_powers(signal, noise), max_abs


def _judge(original: RecordedValues, gm: fx.GraphModule, inputs: tuple[Any, ...],
           k: int) -> dict[str, tuple[float, float]]:
    """(SQNR dB, max abs) by provenance of ``gm``'s values on input set ``k``."""
    now: dict[str, tuple[float, float]] = {}

    def judge(node: fx.Node, value: Any) -> None:
        if node.op not in _COMPUTE_OPS:
            return
        key = G.provenance(node)
        ref = original.values.get(key)
        leaves = _floating(value) if ref is not None else None
        if leaves is None:
            return
        figures = _error(ref[k], original.signals[key][k], leaves)
        if figures is not None:
            now[key] = figures  # the last corresponding node of a provenance holds its value

    _run(gm, inputs, judge)
    return now


def node_errors(original: RecordedValues, gm: fx.GraphModule,
                inputs_list: Sequence[tuple[Any, ...]]) -> dict[str, NodeError]:
    """Each value of ``gm`` that still corresponds to one of ``original`` (same provenance, shape
    and dtype), with its error against it, by provenance in the original's graph order."""
    worst: dict[str, tuple[float, float]] = {}
    for k, inputs in enumerate(inputs_list):
        now = _judge(original, gm, inputs, k)
        if k == 0:
            worst = now
            continue
        # a value must correspond on every input set: the lowest SQNR, the largest difference
        worst = {key: (min(figures[0], now[key][0]), max(figures[1], now[key][1]))
                 for key, figures in worst.items() if key in now}
    return {key: NodeError(*worst[key]) for key in original.order if key in worst}


class RunHistory:
    """The numeric history of one run: the original graph's values, recorded once (on the first
    pass that changes values: until then the state before a pass is the original), and each
    changed state's per-node error against them."""

    def __init__(self, inputs_list: list[tuple]):
        self.inputs_list = inputs_list
        self.original: Any = None  # the state before the first pass that changed the graph
        self.values: Any = None
        self.stopped: str | None = None  # why recording stopped, for the report's notes

    def after(self, before: Any, gm: fx.GraphModule, pass_record: Any, contract: Any) -> dict[str, NodeError] | None:
        """Per-node errors after a pass, or None when it changed nothing (or was rolled back),
        or is exact and its outputs were bit-equal to the graph's before it."""
        if not pass_record.changed or not self.inputs_list:
            return None
        if self.values is None and self.original is None:
            self.original = before
        if not contract.lossy and pass_record.max_abs_error == 0:
            return None
        try:
            if self.values is None:
                self.values = record(self.original.module(), self.inputs_list)
                self.original = None  # its values are kept: the state itself is no longer needed
            return node_errors(self.values, gm, self.inputs_list)
        except Exception as exc:  # a diagnosis must not fail a run its checks passed: say so, stop it
            self.stopped = (f"numeric history stopped at pass {pass_record.name!r}: running the graph node by node "
                            f"raised {exception_summary(exc)}")
            self.inputs_list = []
            return None
