"""Contracts: what equivalence a pass keeps between the graph before and after it.

:class:`Exact` keeps the outputs up to floating-point reassociation; :class:`Lossy` lets them
move within a budget (SQNR, relative error). The PassManager checks every pass against its
contract and rolls back one that breaks it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch


class Contract:
    """What equivalence a pass keeps between the graph before and after it."""

    lossy: bool = False

    def check(self, verdict) -> str | None:
        """Reason the verdict breaks the contract, or None if it holds."""
        raise NotImplementedError

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        return verify.Tolerance.for_dtype(dtype)

    @property
    def has_budget(self) -> bool:
        """Whether the contract bounds how far outputs may move (a lossy one may only keep shapes)."""
        return True

    def for_options(self, options: dict[str, Any]) -> "Contract":
        """The contract of one invocation, given its resolved options (see ``Lossy.budget_option``)."""
        return self


@dataclass(frozen=True)
class Exact(Contract):
    """Same outputs up to floating-point reassociation.

    ``rtol``/``atol`` override the per-dtype defaults of ``graphopt.verify.Tolerance.for_dtype``
    (the rule is ``|a - b| <= atol + rtol * max|ref|`` per output).
    """

    rtol: float | None = None
    atol: float | None = None

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        if self.rtol is None and self.atol is None:
            return None  # each output gets the default of its own dtype
        base = verify.Tolerance.for_dtype(dtype)
        return verify.Tolerance(
            rtol=base.rtol if self.rtol is None else self.rtol,
            atol=base.atol if self.atol is None else self.atol,
        )

    def check(self, verdict) -> str | None:
        return None if verdict.ok else (verdict.reason or "outputs differ beyond tolerance")

    def __str__(self) -> str:
        return "exact"


@dataclass(frozen=True)
class Lossy(Contract):
    """Outputs may change within a budget.

    ``min_sqnr_db``: signal-to-quantization-noise ratio of every output against the graph
    before the pass; ``max_rel_error``: max |a-b| / max|ref| per output. Unset figures are not
    checked. Shapes and dtypes must still match. With neither figure set the contract has no
    budget: the manager measures and reports the SQNR but accepts any value ("no budget").
    ``budget_option``: the name of a pass option that, when not None, sets ``min_sqnr_db`` for
    that invocation (``prune-channels{min_sqnr=20}``); with ``budget_option_raises_only`` it may
    only raise the figure, never lower it (``quantize{min_sqnr=30}`` tightens its 15 dB floor,
    ``min_sqnr=10`` leaves it at 15).
    """

    min_sqnr_db: float | None = 20.0
    max_rel_error: float | None = None
    budget_option: str | None = None
    budget_option_raises_only: bool = False
    lossy: bool = dataclasses.field(default=True, init=False)

    @property
    def has_budget(self) -> bool:
        return self.min_sqnr_db is not None or self.max_rel_error is not None

    def for_options(self, options: dict[str, Any]) -> "Lossy":
        value = options.get(self.budget_option) if self.budget_option else None
        if value is None:
            return self
        figure = float(value)
        if self.budget_option_raises_only and self.min_sqnr_db is not None:
            figure = max(figure, self.min_sqnr_db)
        return dataclasses.replace(self, min_sqnr_db=figure)

    def tolerance(self, dtype: torch.dtype):
        from graphopt import verify

        return verify.Tolerance(rtol=math.inf, atol=math.inf)

    def check(self, verdict) -> str | None:
        if not verdict.ok:  # with an infinite tolerance only shape, NaN/inf or crashes fail
            return verdict.reason
        for out in verdict.outputs:
            if self.min_sqnr_db is not None and out.sqnr_db < self.min_sqnr_db:
                return f"output {out.index}: SQNR {out.sqnr_db:.1f} dB < budget {self.min_sqnr_db} dB"
            if self.max_rel_error is not None and out.max_rel > self.max_rel_error:
                return f"output {out.index}: relative error {out.max_rel:.3g} > budget {self.max_rel_error}"
        return None

    def __str__(self) -> str:
        parts = []
        if self.min_sqnr_db is not None:
            parts.append(f"sqnr>={self.min_sqnr_db:g}dB")
        if self.max_rel_error is not None:
            parts.append(f"rel<={self.max_rel_error:g}")
        return "lossy(" + (",".join(parts) or "no budget") + ")"
