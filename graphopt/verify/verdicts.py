"""What a comparison reports: figures per output, the first divergent node, the verdict."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from graphopt.fileio import jsonable
from graphopt.verify.tolerance import Tolerance


def _json_float(value: float) -> float | str:
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    return value if math.isfinite(value) else str(value)


@dataclass
class OutputFigures:
    """Error figures of one output, worst case over the inputs checked.

    ``dtype``/``candidate_dtype`` are ``str(torch.dtype)``. ``max_rel`` is
    ``max|ref - out| / max|ref|``. Figures that cannot be computed (shape or dtype-kind
    mismatch, non-finite mismatch) are ``inf`` (errors) and ``-inf`` (SQNR).
    """

    index: int
    max_abs: float
    max_rel: float
    sqnr_db: float
    shape_ok: bool
    dtype: str
    nan_mismatch: bool
    inf_mismatch: bool = False
    ok: bool = True
    candidate_dtype: str | None = None
    tolerance: Tolerance | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class Divergence:
    """The first candidate node whose value departs from the reference's (or that raised)."""

    node: str
    provenance: str
    source_line: str | None
    max_abs: float
    message: str
    reference_node: str | None = None
    max_rel: float = math.inf
    op: str = ""

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class Verdict:
    """Outcome of a comparison. ``reason`` says what failed (None when ``ok``);
    ``failed_input`` is the index (into the inputs checked) of the first failure;
    ``divergence``/``localization_note`` are the culprit node or why none was found."""

    ok: bool
    outputs: list[OutputFigures]
    inputs_checked: int
    reason: str | None = None
    failed_input: int | None = None
    divergence: Divergence | None = None
    localization_note: str | None = None

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0 if self.ok else math.inf)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0 if self.ok else math.inf)

    @property
    def min_sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.inf if self.ok else -math.inf)

    def __str__(self) -> str:
        figures = (
            f"max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}, "
            f"min SQNR {self.min_sqnr_db:.1f} dB"
        )
        head = f"{self.inputs_checked} input(s) x {len(self.outputs)} output(s)"
        if self.ok:
            return f"ok: {head}; {figures}"
        text = f"MISMATCH: {self.reason} [{head}; {figures}]"
        if self.divergence is not None:
            text += f"\n  first divergence: {self.divergence.message}"
        elif self.localization_note:
            text += f"\n  not localized: {self.localization_note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs_checked": self.inputs_checked,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "min_sqnr_db": _json_float(self.min_sqnr_db),
            "reason": self.reason,
            "failed_input": self.failed_input,
            "outputs": [o.to_dict() for o in self.outputs],
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "localization_note": self.localization_note,
        }
