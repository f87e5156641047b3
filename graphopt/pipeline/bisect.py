"""Bisection: the first rewrite of a pipeline after which the graph stops matching the model
(as LLVM's opt-bisect finds the first bad transformation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.ir import structure
from graphopt.pipeline.manager import PassManager, _run_all, verify
from graphopt.pipeline.passes import RewriteBudget


@dataclass
class BisectResult:
    """The first rewrite that breaks equivalence (``None`` fields when nothing breaks)."""

    total_rewrites: int
    first_bad: int | None  # 1-based index over all rewrites of the pipeline
    pass_name: str | None
    rewrite_in_pass: int | None  # 1-based within that pass
    description: str | None
    verdict: Any = None

    def __str__(self) -> str:
        if self.first_bad is None:
            return f"no rewrite breaks equivalence ({self.total_rewrites} rewrites checked)"
        return (f"rewrite {self.first_bad} of {self.total_rewrites} breaks equivalence: pass {self.pass_name!r}, "
                f"its rewrite #{self.rewrite_in_pass}: {self.description or '(no description)'}; {self.verdict}")


def bisect(model: Any, example_inputs: Any, pipeline: Any, *, tolerance: Any = None,
           calibration_data: Iterable[Any] | None = None) -> BisectResult:
    """Find the first rewrite of ``pipeline`` after which the graph stops matching ``model``.

    Like LLVM's opt-bisect: the pipeline is re-run with a global rewrite budget (passes ask
    ``ctx.may_rewrite`` before each rewrite) and the budget is binary-searched.
    """
    from graphopt.capture import capture

    inputs = G.as_input_tuple(example_inputs)
    if calibration_data is not None:
        calibration_data = list(calibration_data)  # every attempt re-runs the pipeline on it
    base = model if isinstance(model, fx.GraphModule) else capture(model, inputs)
    inputs = structure.graph_inputs(base, inputs)
    check_inputs = verify.verification_inputs(inputs, synthesize=2, seed=0)
    reference = _run_all(base, check_inputs)
    tol = tolerance
    pm = PassManager(pipeline, verify="none", on_failure="raise")

    def attempt(limit: int | None):
        budget = RewriteBudget(limit)
        gm = pm.run(base, inputs, calibration_data=calibration_data, budget=budget).module
        verdict = verify.compare_outputs(reference, _run_all(gm, check_inputs), tol)
        return verdict, budget

    verdict, budget = attempt(None)
    total = len(budget.granted)
    if verdict.ok:
        return BisectResult(total, None, None, None, None, verdict)
    zero_verdict, _ = attempt(0)
    if not zero_verdict.ok:
        return BisectResult(total, 0, None, None,
                            "the graph breaks with no rewrite granted: a pass changes it without asking "
                            "ctx.may_rewrite(), so bisection cannot narrow it down", zero_verdict)
    lo, hi = 0, total  # invariant: budget lo is good, budget hi is bad
    bad_verdict = verdict
    while hi - lo > 1:
        mid = (lo + hi) // 2
        v, _ = attempt(mid)
        if v.ok:
            lo = mid
        else:
            hi, bad_verdict = mid, v
    pass_name, description = budget.granted[hi - 1]
    within = sum(1 for n, _ in budget.granted[:hi] if n == pass_name)
    return BisectResult(total, hi, pass_name, within, description, bad_verdict)
