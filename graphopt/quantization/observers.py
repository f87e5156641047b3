"""Observers: they watch the values a tensor takes during calibration and choose its range.

Methods (``quantize{calibration=...}``):

- ``minmax``: the smallest and largest value seen. Never clips; one outlier widens the step.
- ``moving_average``: per-batch min and max, averaged with weight ``averaging_constant`` (0.01,
  torch's value) after the first batch. Smooths batch-to-batch outliers.
- ``histogram``: a histogram of every value seen; the range keeps the central ``percentile``
  percent of the mass (99.99 by default, on each tail where the values are signed).
- ``mse``: the same histogram; the range is the one that minimizes the expected squared error
  (rounding noise inside, clipping error outside), searched bound by bound.
- ``entropy``: the same histogram, folded onto magnitudes; the threshold is the one whose
  quantized distribution loses the least information (smallest KL divergence) against the
  distribution with everything beyond the threshold piled up at it. Clips long tails that a
  few outliers make, keeps distributions without them whole. See :func:`kl_best_bins`.
- ``auto``: the same histogram; of the ranges ``minmax``, ``histogram``, ``mse`` and
  ``entropy`` would choose, the one with the least expected squared error on the values seen
  (:func:`expected_squared_error`). One histogram serves every candidate.

The quantize pass checks every method's range against min-max's on the same histogram and
falls back where it is far worse (:mod:`graphopt.quantization.range_choice`).

Every observer refuses non-finite values with :class:`~graphopt.errors.QuantizationError`
naming the value: a scale computed from inf or NaN is meaningless, and silently skipping them
would hide a broken model or data set.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from graphopt.errors import OptionError, QuantizationError

CalibrationMethod = Literal["auto", "minmax", "moving_average", "histogram", "mse", "entropy"]
METHODS: tuple[str, ...] = ("auto", "minmax", "moving_average", "histogram", "mse", "entropy")
#: the candidates ``auto`` chooses among
AUTO_CANDIDATES: tuple[str, ...] = ("minmax", "histogram", "mse", "entropy")
#: relative difference in expected error (1%, 0.04 dB) below which ``auto`` calls two ranges
#: equally good: ranges a fraction of a histogram bin apart differ by less than that, and the
#: error model cannot tell them apart
AUTO_TIE = 0.01


class Observer:
    """Base class: ``observe(tensor, where)`` during calibration, then ``range()``."""

    def __init__(self) -> None:
        self.batches = 0

    def observe(self, value: torch.Tensor, where: str) -> None:
        if value.numel() == 0:
            return
        data = value.detach()
        if not data.is_floating_point():
            data = data.float()
        bad = ~torch.isfinite(data)
        if bool(bad.any()):
            kinds = sorted({"NaN" if torch.isnan(v) else ("+inf" if v > 0 else "-inf") for v in data[bad][:64]})
            raise QuantizationError(
                f"calibration saw {int(bad.sum())} non-finite value(s) ({', '.join(kinds)}) in {where}; "
                "a quantization range cannot be computed from them. Clean the calibration data "
                "(or find the op producing them: run the float model on the same batch)"
            )
        self.batches += 1
        self._update(float(data.min()), float(data.max()), data)

    def _update(self, low: float, high: float, data: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float] | None:
        """The chosen ``(low, high)``, or None when nothing was observed."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = np.inf, -np.inf

    def _update(self, low: float, high: float, data: torch.Tensor) -> None:
        self.low, self.high = min(self.low, low), max(self.high, high)

    def range(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.batches else None


class MovingAverageObserver(Observer):
    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.c = averaging_constant
        self.low = self.high = 0.0

    def _update(self, low: float, high: float, data: torch.Tensor) -> None:
        if self.batches == 1:
            self.low, self.high = low, high
        else:
            self.low += self.c * (low - self.low)
            self.high += self.c * (high - self.high)

    def range(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.batches else None


class HistogramObserver(Observer):
    """A fixed number of bins over the range seen so far; when a batch falls outside it the
    range grows to the union and the old counts are spread over the new bins in proportion
    to overlap (mass-conserving, so percentiles stay consistent).

    It also keeps the exact minimum and maximum and their moving averages, so one observer
    gives the range of every method (:meth:`candidate`) and the expected error of any range
    (:meth:`error`)."""

    def __init__(self, method: str = "histogram", bins: int = 2048, percentile: float = 99.99,
                 qlevels: int = 256) -> None:
        super().__init__()
        if method not in METHODS:
            raise OptionError(f"quantize: unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
        if not 50.0 < percentile <= 100.0:
            raise OptionError(f"quantize: percentile must be in (50, 100], got {percentile}")
        if method == "entropy" and bins < qlevels:
            raise OptionError(f"quantize: calibration=entropy needs bins >= {qlevels} (one per quantization level "
                              f"at least), got bins={bins}")
        self.method, self.bins, self.percentile, self.qlevels = method, bins, percentile, qlevels
        self.low = self.high = 0.0
        self.counts = np.zeros(bins, dtype=np.float64)
        self.seen = MinMaxObserver()
        self.averaged = MovingAverageObserver()
        self.zeros = 0  # values exactly 0 (representable exactly by every range)

    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def centers(self) -> np.ndarray:
        edges = self.edges()
        return (edges[:-1] + edges[1:]) / 2

    def _update(self, low: float, high: float, data: torch.Tensor) -> None:
        for tracker in (self.seen, self.averaged):
            tracker.batches = self.batches
            tracker._update(low, high, data)
        if self.batches == 1:
            self.low = low
            self.high = high if high > low else low + max(abs(low) * 1e-6, 1e-12)
        elif low < self.low or high > self.high:
            old_edges, old_cdf = self.edges(), np.concatenate([[0.0], np.cumsum(self.counts)])
            self.low, self.high = min(low, self.low), max(high, self.high)
            self.counts = np.diff(np.interp(self.edges(), old_edges, old_cdf))
        hist = torch.histc(data.float().reshape(-1), self.bins, self.low, self.high)
        self.counts += hist.double().numpy()
        self.zeros += int((data == 0).sum())

    def nonzero_fraction(self) -> float:
        """The fraction of the values seen that were not exactly 0."""
        total = self.counts.sum()
        return 1.0 - self.zeros / total if total > 0 else 0.0

    def range(self) -> tuple[float, float] | None:
        if not self.batches:
            return None
        if self.method == "auto":
            return self.best_candidate()[1]
        return self.candidate(self.method)

    def best_candidate(self) -> tuple[str, tuple[float, float]]:
        """``auto``'s choice: the method among :data:`AUTO_CANDIDATES` whose range has the least
        :meth:`error`, and that range. Errors within :data:`AUTO_TIE` of the least count as
        tied, and ties keep the earlier method (min-max first: it clips nothing). ``entropy``
        takes part when there are at least as many bins as levels."""
        ranges = {m: self.candidate(m) for m in AUTO_CANDIDATES if m != "entropy" or self.bins >= self.qlevels}
        errors = {m: self.error(r) for m, r in ranges.items()}
        least = min(errors.values())
        method = next(m for m in ranges if errors[m] <= least * (1 + AUTO_TIE))
        return method, ranges[method]

    def candidate(self, method: str) -> tuple[float, float]:
        """The range ``method`` (any of :data:`METHODS` but ``auto``) chooses from what was seen."""
        if method == "minmax":
            return self.seen.low, self.seen.high
        if method == "moving_average":
            return self.averaged.low, self.averaged.high
        if method == "histogram":
            return self._percentile_range()
        if method == "mse":
            return self._mse_range()
        if method == "entropy":
            return self._entropy_range()
        raise OptionError(f"quantize: no single range for calibration method {method!r}; "
                          f"choose one of {', '.join(m for m in METHODS if m != 'auto')}")

    def error(self, bounds: tuple[float, float], trim: float = 0.0) -> float:
        """Expected squared error per value seen when quantizing over ``bounds``
        (:func:`expected_squared_error` on this histogram), leaving out the fraction ``trim``
        of the values with the largest errors. Values exactly 0 count with no error: every
        range represents 0 exactly (see ``qparams``), and after a ReLU they are half the values."""
        total = self.counts.sum()
        if total <= 0:
            return 0.0
        counts = self.counts.copy()
        if self.low <= 0.0 <= self.high:
            at_zero = min(int((0.0 - self.low) / (self.high - self.low) * self.bins), self.bins - 1)
            counts[at_zero] = max(counts[at_zero] - self.zeros, 0.0)
        share = trim * total / max(counts.sum(), 1e-300)  # of the values that can be wrong
        return expected_squared_error(self.centers(), counts, *bounds, self.qlevels, min(share, 1.0)) / total

    def _percentile_range(self) -> tuple[float, float]:
        edges, cdf = self.edges(), np.concatenate([[0.0], np.cumsum(self.counts)])
        total = cdf[-1]
        tail = (100.0 - self.percentile) / 100.0 * total
        high = float(np.interp(total - tail, cdf, edges))
        low = float(np.interp(tail, cdf, edges)) if self.low < 0 else self.low
        return low, high

    def _mse_range(self) -> tuple[float, float]:
        """Coordinate search: the best upper bound for the current lower one, then the best
        lower bound for that, twice; candidates shrink each bound geometrically towards 0 (down
        to 1/1000), so one far outlier cannot hide the bulk of the values."""
        centers, counts = self.centers(), self.counts
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        shrink = np.geomspace(1.0, 1e-3, 128)

        def error(lo: float, hi: float) -> float:
            return expected_squared_error(centers, counts, lo, hi, self.qlevels)

        for _ in range(2):
            if high > 0:
                high = float(min((max(self.high, 0.0) * f for f in shrink), key=lambda hi: error(low, hi)))
            if low < 0:
                low = float(min((min(self.low, 0.0) * f for f in shrink), key=lambda lo: error(lo, high)))
        return low, high

    def _entropy_range(self) -> tuple[float, float]:
        """The KL threshold on magnitudes: signed values get a symmetric threshold with half the
        levels on each side, one-signed values all the levels on their side. The range is the
        threshold cut to what was seen (a mostly positive signed tensor keeps its small
        negative end)."""
        signed = self.low < 0.0 < self.high
        levels = self.qlevels // 2 if signed else self.qlevels
        largest = max(-self.low, self.high)
        magnitudes = np.linspace(0.0, largest, self.bins + 1)
        edges, cdf = self.edges(), np.concatenate([[0.0], np.cumsum(self.counts)])
        within = np.interp(magnitudes, edges, cdf) - np.interp(-magnitudes, edges, cdf)  # mass in [-t, t]
        threshold = largest * kl_best_bins(np.diff(within), levels) / self.bins
        return max(self.low, -threshold), min(self.high, threshold)


def squared_errors(centers: np.ndarray, low: float, high: float, qlevels: int) -> np.ndarray:
    """Squared error of one value at each of ``centers`` when quantized to ``qlevels`` levels
    over ``[low, high]`` widened to contain 0, as the quantizer does.

    A value outside the range is clipped to its nearest end (error: the distance, squared); a
    value inside is rounded to a step ``(high - low) / (qlevels - 1)``, with the uniform
    rounding noise ``step**2 / 12``. The same model for every method, so their ranges compare
    fairly on one histogram.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    step = (high - low) / (qlevels - 1)
    clipped = np.clip(centers, low, high)
    return np.where((centers >= low) & (centers <= high), step**2 / 12, (centers - clipped) ** 2)


def expected_squared_error(centers: np.ndarray, counts: np.ndarray, low: float, high: float, qlevels: int,
                           trim: float = 0.0) -> float:
    """Total squared error of quantizing a histogram (``counts`` values at ``centers``) over
    ``[low, high]`` (see :func:`squared_errors`), leaving out the fraction ``trim`` of the
    values with the largest errors."""
    errors = squared_errors(centers, low, high, qlevels)
    if trim <= 0:
        return float(np.sum(counts * errors))
    order = np.argsort(errors)[::-1]
    counts, errors = counts[order], errors[order]
    dropped = np.minimum(counts, np.maximum(trim * counts.sum() - (np.cumsum(counts) - counts), 0.0))
    return float(np.sum((counts - dropped) * errors))


def kl_best_bins(counts: np.ndarray, levels: int) -> int:
    """How many leading bins of the magnitude histogram ``counts`` (bin 0 holds the values
    around 0) to keep so that quantizing them to ``levels`` levels loses the least information.

    For a candidate of ``i`` bins, P is the histogram cut at ``i`` with the mass beyond piled
    into its last bin (what clipping does to the values), and Q is what rounding keeps: bins 1
    to ``i - 1`` merged into ``levels - 1`` groups of consecutive bins, each group's mass
    spread evenly over its non-empty bins. Bin 0 is its own level in Q: 0 is exactly
    representable (see ``qparams``), and spreading the spike of zeros after a ReLU over a group
    would make every long threshold look bad. The answer minimizes KL(P || Q): a short
    threshold is penalized by the piled-up tail, a long one by coarse groups. A candidate
    whose last bin is empty while mass is clipped onto it is not representable (Q is 0 where
    P is not). Among equal scores the longest candidate wins, and a histogram with no more
    bins than levels is kept whole: nothing is clipped for nothing.

    KL sees how much mass clipping piles onto the threshold, not how far it moves: a threshold
    that falls on a spike of its own (a nearly constant channel, common when channel ranges
    span decades) scores well while it clips saturated values far down. The quantize pass
    checks every range against min-max (:mod:`graphopt.quantization.range_choice`).

    All candidates are scored at once from prefix sums: with ``T`` the total and ``S`` the
    mass of the first ``i`` bins, ``KL = (sum p log p - sum p log q) / T + log(S / T)``; bin 0
    cancels out of both sums and the rest split into per-group terms.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    rest, groups = counts[1:], levels - 1
    if rest.size <= groups or groups < 1 or total <= 0:
        return counts.size
    candidates = np.arange(groups, rest.size + 1)  # bins kept besides bin 0
    plogp = np.where(rest > 0, rest * np.log(np.where(rest > 0, rest, 1.0)), 0.0)
    mass_before = np.concatenate([[0.0], np.cumsum(rest)])
    filled_before = np.concatenate([[0], np.cumsum(rest > 0)])
    plogp_before = np.concatenate([[0.0], np.cumsum(plogp)])

    # group boundaries per candidate: bin k of i belongs to group floor(k * groups / i)
    bounds = (np.arange(groups + 1)[None, :] * candidates[:, None] + groups - 1) // groups
    mass = np.diff(mass_before[bounds], axis=1)
    filled = np.diff(filled_before[bounds], axis=1)
    log_q = np.log(np.where(filled > 0, mass / np.maximum(filled, 1), 1.0))

    kept = counts[0] + mass_before[candidates]
    clipped = total - kept
    at_threshold = rest[candidates - 1]
    last = at_threshold + clipped  # the threshold bin of P, tail included
    p_log_p = plogp_before[candidates - 1] + np.where(last > 0, last * np.log(np.maximum(last, 1e-300)), 0.0)
    p_log_q = (mass * log_q).sum(axis=1) + clipped * log_q[:, -1]
    with np.errstate(divide="ignore"):
        kl = (p_log_p - p_log_q) / total + np.log(kept / total)
    kl[(clipped > 0) & (at_threshold == 0)] = np.inf
    best = np.flatnonzero(kl <= kl.min() + 1e-12)[-1]  # among equals, clip the least
    return int(candidates[best]) + 1


def make_observer(method: str, *, bins: int = 2048, percentile: float = 99.99, qlevels: int = 256) -> Observer:
    """A fresh observer for calibration ``method`` (see the module docstring)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageObserver()
    if method in ("histogram", "mse", "entropy", "auto"):
        return HistogramObserver(method, bins=bins, percentile=percentile, qlevels=qlevels)
    raise OptionError(f"quantize: unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
