"""Bisection: the first rewrite of a pipeline after which the graph stops matching the model
(as LLVM's opt-bisect finds the first bad transformation), or, for pipelines with lossy passes,
after which the output SQNR against the model falls below a budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx

from graphopt.errors import PipelineError
from graphopt.ir import graph as G
from graphopt.ir import structure
from graphopt.pipeline.manager import PassManager, _in_distribution, _run_all, verify
from graphopt.pipeline.passes import RewriteBudget


@dataclass
class BisectResult:
    """The first rewrite that breaks equivalence, or drops the output SQNR below ``min_sqnr``
    (``None`` fields when nothing does).

    ``node_errors``: each value of the graph with that rewrite included, against the model
    (provenance -> :class:`graphopt.verify.history.NodeError`); ``entered_at``: the first of them,
    in graph order, that the rewrite made worse, where the error entered."""

    total_rewrites: int
    first_bad: int | None  # 1-based index over all rewrites of the pipeline
    pass_name: str | None
    rewrite_in_pass: int | None  # 1-based within that pass
    description: str | None
    verdict: Any = None
    #: the output SQNR budget judged (dB), or None when equivalence was
    min_sqnr: float | None = None
    node_errors: dict[str, Any] = field(default_factory=dict, repr=False)
    entered_at: str | None = None

    @property
    def failure(self) -> str:
        return "equivalence" if self.min_sqnr is None else f"the {self.min_sqnr:g} dB output SQNR budget"

    def __str__(self) -> str:
        if self.first_bad is None:
            return f"no rewrite breaks {self.failure} ({self.total_rewrites} rewrites checked)"
        entered = ""
        if self.entered_at is not None:
            entered = f"; the error enters at {self.entered_at!r} ({self.node_errors[self.entered_at]} against the model)"
        judged = self.verdict
        if self.min_sqnr is not None and self.verdict is not None and self.verdict.ok:
            judged = (f"output SQNR {self.verdict.min_sqnr_db:.1f} dB < {self.min_sqnr:g} dB "
                      f"(max_abs {self.verdict.max_abs:.3g}; {self.verdict.inputs_checked} input(s))")
        return (f"rewrite {self.first_bad} of {self.total_rewrites} breaks {self.failure}: pass {self.pass_name!r}, "
                f"its rewrite #{self.rewrite_in_pass}: {self.description or '(no description)'}; {judged}{entered}")


def _budget_floor(pm: PassManager) -> float | None:
    """The lowest SQNR floor of the pipeline's lossy passes (None when it holds none); a lossy
    pass without an SQNR floor leaves nothing to bisect against."""
    lossy = [inv for inv in pm.invocations if inv.contract.lossy]
    if not lossy:
        return None
    floors = [inv.contract.min_sqnr_db for inv in lossy if getattr(inv.contract, "min_sqnr_db", None) is not None]
    if not floors:
        names = ", ".join(sorted({inv.name for inv in lossy}))
        raise PipelineError(f"bisect: the pipeline's lossy pass(es) ({names}) set no SQNR budget, so every rewrite "
                            "changes the outputs and none can be called the first bad one: pass min_sqnr=<dB>, the "
                            "output SQNR against the model below which a rewrite counts as bad")
    return min(floors)


def _entered_at(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """The first value (graph order) whose SQNR is worse with the bad rewrite than without it."""
    for key, error in after.items():
        previous = before.get(key)
        if error.sqnr_db < (math.inf if previous is None else previous.sqnr_db):
            return key
    return None


def bisect(model: Any, example_inputs: Any, pipeline: Any, *, tolerance: Any = None, min_sqnr: float | None = None,
           calibration_data: Iterable[Any] | None = None) -> BisectResult:
    """Find the first rewrite of ``pipeline`` after which the graph stops matching ``model``.

    Like LLVM's opt-bisect: the pipeline is re-run with a global rewrite budget (passes ask
    ``ctx.may_rewrite`` before each rewrite) and the budget is binary-searched.

    With ``min_sqnr`` (dB), a run is bad when its output SQNR against ``model`` is below it, on
    the in-distribution inputs (the example and synthesized uniform ones), and shapes and
    non-finite values must still match (``tolerance`` is not used). A pipeline holding lossy
    passes is judged that way by default, against the lowest SQNR floor of their budgets.
    The result names the first bad rewrite and, from per-node error against the model with and
    without it, the value where the error entered.
    """
    from graphopt.capture import capture
    from graphopt.verify import history

    inputs = G.as_input_tuple(example_inputs)
    if calibration_data is not None:
        calibration_data = list(calibration_data)  # every attempt re-runs the pipeline on it
    base = model if isinstance(model, fx.GraphModule) else capture(model, inputs)
    inputs = structure.graph_inputs(base, inputs)
    pm = PassManager(pipeline, verify="none", on_failure="raise")
    if min_sqnr is None:
        min_sqnr = _budget_floor(pm)
    check_inputs = verify.verification_inputs(inputs, synthesize=2, seed=0)
    labels = verify.input_labels(len(check_inputs))
    if min_sqnr is not None:  # an SQNR budget means something on inputs like the calibration data only
        kept = [i for i, label in enumerate(labels) if _in_distribution(label)]
        check_inputs, labels = [check_inputs[i] for i in kept], [labels[i] for i in kept]
    reference = _run_all(base, check_inputs)
    tol = tolerance if min_sqnr is None else verify.Tolerance(math.inf, math.inf)

    def attempt(limit: int | None):
        budget = RewriteBudget(limit)
        gm = pm.run(base, inputs, calibration_data=calibration_data, budget=budget).module
        verdict = verify.compare_outputs(reference, _run_all(gm, check_inputs), tol, input_labels=labels)
        ok = verdict.ok and (min_sqnr is None or verdict.min_sqnr_db >= min_sqnr)
        return ok, verdict, budget, gm

    ok, verdict, budget, bad_gm = attempt(None)
    total = len(budget.granted)
    if ok:
        return BisectResult(total, None, None, None, None, verdict, min_sqnr)
    zero_ok, zero_verdict, _, good_gm = attempt(0)
    if not zero_ok:
        return BisectResult(total, 0, None, None,
                            "the graph breaks with no rewrite granted: a pass changes it without asking "
                            "ctx.may_rewrite(), so bisection cannot narrow it down", zero_verdict, min_sqnr)
    lo, hi = 0, total  # invariant: budget lo is good, budget hi is bad
    bad_verdict = verdict
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_ok, v, _, gm = attempt(mid)
        if mid_ok:
            lo, good_gm = mid, gm
        else:
            hi, bad_verdict, bad_gm = mid, v, gm
    pass_name, description = budget.granted[hi - 1]
    within = sum(1 for n, _ in budget.granted[:hi] if n == pass_name)
    # where the error entered: per-node error against the model without and with the bad rewrite
    original = history.record(base, check_inputs)
    good = history.node_errors(original, good_gm, check_inputs)
    bad = history.node_errors(original, bad_gm, check_inputs)
    return BisectResult(total, hi, pass_name, within, description, bad_verdict, min_sqnr, bad, _entered_at(good, bad))
