"""Each activation range, checked against min-max before it is used.

A calibration method that clips (``histogram``, ``mse``, ``entropy``) or smooths
(``moving_average``) bets that what it drops matters less than the finer step it buys. The bet
can go badly wrong: KL divergence does not see how far clipped values move, so a threshold on a
spike of near-constant values can clip a ReLU6's saturated channels from 6 to 2, and the
output SQNR collapses. Min-max never clips, so its error is a safe reference that is always at
hand.

The guard: every range is scored on the tensor's own calibration histogram with one error
model (:func:`~graphopt.quantization.observers.squared_errors`: clipping distance squared
outside, ``step**2 / 12`` inside), over all values but the :data:`OUTLIER_SHARE` of the
non-zero ones with the largest errors under that range (each range is allowed its outliers:
clipping a few far values is what an outlier-resistant method is for, and a single value 30
deviations out would otherwise dominate any squared error; counting the share among non-zero
values keeps a mostly-zero tensor's few real values from all passing as outliers). A method's range whose error exceeds
:data:`FALLBACK_FACTOR` times min-max's falls back to min-max, and the pass report says which
tensors did and by how much.

``auto`` takes, per tensor, whichever candidate range
(:data:`~graphopt.quantization.observers.AUTO_CANDIDATES`) has the least expected squared
error over all the calibration values, outliers included: it fits the data it saw, and it
never needs the guard, min-max being one of its candidates.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from graphopt.quantization.observers import HistogramObserver

#: How much more expected squared error than min-max a method's range may have before it falls
#: back: 4x is one bit of resolution (6.02 dB of SQNR), the most a deliberate clipping choice
#: may cost on the calibration data itself. Methods clip on purpose (to resist outliers that
#: the calibration data under-represents, or that held-out data lacks), so a small loss on the
#: calibration values is the price of that choice; a loss of more than a bit is a range that
#: misjudged the distribution, not a trade-off.
FALLBACK_FACTOR = 4.0

#: The fraction of non-zero calibration values (1 in 100) a range may give up as outliers
#: before the guard counts their error: rare far values (a hot pixel, a bad sample) are what
#: clipping methods exist to ignore, whereas a range that clips a real part of the
#: distribution (the saturated values of a ReLU6, whole channels) clips far more than that.
OUTLIER_SHARE = 0.01


@dataclass(frozen=True)
class RangeChoice:
    """The range used for one tensor and why."""

    low: float
    high: float
    method: str  # the method whose range is used
    error: float  # expected squared error per calibration value, of this range
    minmax_error: float  # the same for min-max's range
    fallback: str | None = None  # why the asked method's range was replaced by min-max's

    @property
    def bounds(self) -> tuple[float, float]:
        return self.low, self.high


def _db(worse: float, better: float) -> float:
    if worse <= 0:
        return 0.0
    return math.inf if better <= 0 else 10 * math.log10(worse / better)


def choose(observer: HistogramObserver, method: str) -> RangeChoice | None:
    """The range for ``method`` (``auto`` or one of the named methods) from what ``observer``
    saw, with min-max's in its place when it is more than :data:`FALLBACK_FACTOR` times worse.
    None when the observer saw nothing."""
    if not observer.batches:
        return None
    minmax = observer.candidate("minmax")
    reference = observer.error(minmax)
    if method == "auto":
        chosen, (low, high) = observer.best_candidate()
        return RangeChoice(low, high, chosen, observer.error((low, high)), reference)
    low, high = observer.candidate(method)
    error = observer.error((low, high))
    share = OUTLIER_SHARE * observer.nonzero_fraction()
    robust, robust_reference = observer.error((low, high), share), observer.error(minmax, share)
    if robust > FALLBACK_FACTOR * robust_reference:
        why = (f"{method} range [{low:.4g}, {high:.4g}] has {_db(robust, robust_reference):.1f} dB more expected "
               f"squared error than min-max's [{minmax[0]:.4g}, {minmax[1]:.4g}] on the calibration values, "
               f"outliers ({OUTLIER_SHARE:.0%} of non-zero values) aside (limit {_db(FALLBACK_FACTOR, 1.0):.1f} dB)")
        return RangeChoice(minmax[0], minmax[1], "minmax", reference, reference, why)
    return RangeChoice(low, high, method, error, reference)


def report(ctx: Any, method: str, choices: dict[str, RangeChoice]) -> None:
    """Notes and records for the pass report: the methods chosen (counts in a note) and the
    fallbacks (named in a note), every tensor's choice in ``ctx.record("calibration_ranges")``."""
    if not choices:
        return
    if method == "auto":
        counts = Counter(c.method for c in choices.values())
        ctx.note("calibration auto: per tensor, the candidate range with the least expected squared error on the "
                 "calibration values: " + ", ".join(f"{m} {n}" for m, n in counts.most_common()))
    fell_back = {name: c for name, c in choices.items() if c.fallback}
    if fell_back:
        ctx.note(f"{len(fell_back)} tensor(s) fell back from {method} to min-max, whose range had over "
                 f"{FALLBACK_FACTOR:g}x less expected squared error: " + "; ".join(
                     f"{name}: {c.fallback}" for name, c in fell_back.items()))
    ctx.record("calibration_ranges", {
        name: {"method": c.method, "low": float(c.low), "high": float(c.high), "mse": float(c.error),
               "minmax_mse": float(c.minmax_error),
               **({"fallback": c.fallback} if c.fallback else {})}
        for name, c in choices.items()
    })
    ctx.record("calibration_methods", dict(Counter(c.method for c in choices.values())))
