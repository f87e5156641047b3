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

Every observer refuses non-finite values with :class:`~graphopt.errors.QuantizationError`
naming the value: a scale computed from inf or NaN is meaningless, and silently skipping them
would hide a broken model or data set.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from graphopt.errors import OptionError, QuantizationError

CalibrationMethod = Literal["minmax", "moving_average", "histogram", "mse", "entropy"]
METHODS: tuple[str, ...] = ("minmax", "moving_average", "histogram", "mse", "entropy")


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
    to overlap (mass-conserving, so percentiles stay consistent)."""

    def __init__(self, method: Literal["histogram", "mse", "entropy"], bins: int = 2048, percentile: float = 99.99,
                 qlevels: int = 256) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise OptionError(f"quantize: percentile must be in (50, 100], got {percentile}")
        if method == "entropy" and bins < qlevels:
            raise OptionError(f"quantize: calibration=entropy needs bins >= {qlevels} (one per quantization level "
                              f"at least), got bins={bins}")
        self.method, self.bins, self.percentile, self.qlevels = method, bins, percentile, qlevels
        self.low = self.high = 0.0
        self.counts = np.zeros(bins, dtype=np.float64)

    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def _update(self, low: float, high: float, data: torch.Tensor) -> None:
        if self.batches == 1:
            self.low = low
            self.high = high if high > low else low + max(abs(low) * 1e-6, 1e-12)
        elif low < self.low or high > self.high:
            old_edges, old_cdf = self.edges(), np.concatenate([[0.0], np.cumsum(self.counts)])
            self.low, self.high = min(low, self.low), max(high, self.high)
            self.counts = np.diff(np.interp(self.edges(), old_edges, old_cdf))
        hist = torch.histc(data.float().reshape(-1), self.bins, self.low, self.high)
        self.counts += hist.double().numpy()

    def range(self) -> tuple[float, float] | None:
        if not self.batches:
            return None
        if self.method == "histogram":
            return self._percentile_range()
        if self.method == "entropy":
            return self._entropy_range()
        return self._mse_range()

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
        edges = self.edges()
        centers, counts = (edges[:-1] + edges[1:]) / 2, self.counts
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        shrink = np.geomspace(1.0, 1e-3, 128)

        def error(lo: float, hi: float) -> float:
            step = (hi - lo) / (self.qlevels - 1)
            inside = (centers >= lo) & (centers <= hi)
            clipped = np.clip(centers, lo, hi)
            return float(np.sum(counts * (centers - clipped) ** 2) + counts[inside].sum() * step**2 / 12)

        for _ in range(2):
            if high > 0:
                high = min((max(self.high, 0.0) * f for f in shrink), key=lambda hi: error(low, hi))
            if low < 0:
                low = min((min(self.low, 0.0) * f for f in shrink), key=lambda lo: error(lo, high))
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
    if method in ("histogram", "mse", "entropy"):
        return HistogramObserver(method, bins=bins, percentile=percentile, qlevels=qlevels)
    raise OptionError(f"quantize: unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
