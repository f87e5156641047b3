"""Observers: they watch the values a tensor takes during calibration and choose its range.

Methods (``quantize{calibration=...}``):

- ``minmax``: the smallest and largest value seen. Never clips; one outlier widens the step.
- ``moving_average``: per-batch min and max, averaged with weight ``averaging_constant`` (0.01,
  torch's value) after the first batch. Smooths batch-to-batch outliers.
- ``histogram``: a histogram of every value seen; the range keeps the central ``percentile``
  percent of the mass (99.99 by default, on each tail where the values are signed).
- ``mse``: the same histogram; the range is the one that minimizes the expected squared error
  (rounding noise inside, clipping error outside), searched bound by bound.

Every observer refuses non-finite values with :class:`~graphopt.errors.QuantizationError`
naming the value: a scale computed from inf or NaN is meaningless, and silently skipping them
would hide a broken model or data set.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import OptionError, QuantizationError

CalibrationMethod = Literal["minmax", "moving_average", "histogram", "mse"]
METHODS: tuple[str, ...] = ("minmax", "moving_average", "histogram", "mse")


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

    def __init__(self, method: Literal["histogram", "mse"], bins: int = 2048, percentile: float = 99.99,
                 qlevels: int = 256) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise OptionError(f"quantize: percentile must be in (50, 100], got {percentile}")
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


def make_observer(method: str, *, bins: int = 2048, percentile: float = 99.99, qlevels: int = 256) -> Observer:
    """A fresh observer for calibration ``method`` (see the module docstring)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "moving_average":
        return MovingAverageObserver()
    if method in ("histogram", "mse"):
        return HistogramObserver(method, bins=bins, percentile=percentile, qlevels=qlevels)
    raise OptionError(f"quantize: unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
