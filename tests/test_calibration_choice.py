"""Calibration ranges checked against min-max: the guard, calibration=auto, and the wide-range CNN
on which entropy calibration used to collapse."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import graphopt
from graphopt.app.examples import normal_batches, wide_range_cnn
from graphopt.quantization.observers import METHODS, HistogramObserver
from graphopt.quantization.qparams import affine_qparams
from graphopt.quantization.range_choice import FALLBACK_FACTOR, OUTLIER_SHARE, choose

BUDGET_DB = 15.0  # the quantize pass's contract
NAMED = [m for m in METHODS if m != "auto"]


def observed(method: str, batches: list[torch.Tensor]) -> HistogramObserver:
    observer = HistogramObserver(method)
    for batch in batches:
        observer.observe(batch, "test")
    return observer


def fake_quant_errors(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Squared error of each value, quantized to uint8 over [low, high] by torch's own kernels."""
    qp = affine_qparams(low, high, 0, 255, torch.uint8)
    q = torch.ops.quantized_decomposed.quantize_per_tensor(values, qp.scale, qp.zero_point, 0, 255, torch.uint8)
    back = torch.ops.quantized_decomposed.dequantize_per_tensor(q, qp.scale, qp.zero_point, 0, 255, torch.uint8)
    return (values.double() - back.double()) ** 2


def outliers_aside(errors: torch.Tensor, values: torch.Tensor) -> float:
    """Mean squared error leaving out the largest OUTLIER_SHARE of the non-zero values' errors."""
    drop = OUTLIER_SHARE * int((values != 0).sum())  # a fraction of a value counts in part
    largest_first = torch.sort(errors.reshape(-1), descending=True).values
    weights = 1.0 - (drop - torch.arange(errors.numel(), dtype=torch.float64)).clamp(0.0, 1.0)
    return float((largest_first * weights).sum()) / errors.numel()


# --------------------------------------------------------------------------- the wide-range CNN


def output_sqnr(model: torch.nn.Module, quantized: torch.nn.Module, held_out: list) -> float:
    with torch.no_grad():
        ref = torch.cat([model(x) for (x,) in held_out]).double()
        out = torch.cat([quantized(x) for (x,) in held_out]).double()
    return 10 * math.log10(float((ref**2).sum() / ((ref - out) ** 2).sum()))


@pytest.fixture(scope="module")
def wide_range_runs() -> dict[str, tuple[float, graphopt.pipeline.report.PassRecord]]:
    model, (x,) = wide_range_cnn(0)
    calibration, held_out = normal_batches(x, 9, seed=1), normal_batches(x, 4, seed=2)
    runs = {}
    for method in METHODS:
        manager = graphopt.PassManager("mobile-int8", verify="none", on_failure="raise",
                                       options={"quantize": {"calibration": method}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = manager.run(model, (x,), calibration_data=calibration)
        (record,) = [r for r in result.report.records if r.name == "quantize"]
        runs[method] = output_sqnr(model, result.module, held_out), record
    return runs


class TestWideRangeCNN:
    def test_the_builder_is_deterministic_and_its_channel_ranges_span_four_decades(self):
        rng = torch.get_rng_state()
        model, (x,) = wide_range_cnn(0)
        again, (x_again,) = wide_range_cnn(0)
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(x, x_again)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        assert not any(m.training for m in model.modules())
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            gain = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()  # each channel's output scale
            assert float(gain.max() / gain.min()) > 1e3

    def test_every_method_stays_within_a_few_db_of_minmax_and_above_the_budget(self, wide_range_runs):
        minmax = wide_range_runs["minmax"][0]
        for method, (sqnr, record) in wide_range_runs.items():
            assert record.status == "changed", method
            assert sqnr > BUDGET_DB, method
            assert sqnr > minmax - 3.0, (method, sqnr, minmax)

    def test_auto_is_as_good_as_the_best_single_method(self, wide_range_runs):
        best = max(sqnr for method, (sqnr, _) in wide_range_runs.items() if method != "auto")
        assert wide_range_runs["auto"][0] >= best - 1.0

    def test_entropy_falls_back_on_the_relu6_output_it_would_clip_and_the_report_says_so(self, wide_range_runs):
        _, record = wide_range_runs["entropy"]
        ranges = record.figures["calibration_ranges"]
        fell_back = {name for name, r in ranges.items() if "fallback" in r}
        assert fell_back and all(ranges[name]["method"] == "minmax" for name in fell_back)
        assert all(ranges[name]["high"] == pytest.approx(6.0) for name in fell_back)  # ReLU6 outputs keep 0..6
        note = next(n for n in record.notes if "fell back from entropy to min-max" in n)
        assert all(name in note for name in fell_back) and "dB more expected squared error" in note
        assert record.figures["calibration_methods"]["minmax"] == len(fell_back)

    def test_auto_records_the_method_chosen_per_tensor_and_counts_them_in_a_note(self, wide_range_runs):
        _, record = wide_range_runs["auto"]
        ranges, counts = record.figures["calibration_ranges"], record.figures["calibration_methods"]
        assert sum(counts.values()) == len(ranges) > 0
        assert set(counts) <= {"minmax", "histogram", "mse", "entropy"}
        assert not any("fallback" in r for r in ranges.values())
        assert all(r["mse"] <= r["minmax_mse"] for r in ranges.values())  # min-max is always a candidate
        note = next(n for n in record.notes if n.startswith("calibration auto:"))
        assert all(f"{m} {n}" in note for m, n in counts.items())

    def test_auto_is_the_default(self, wide_range_runs):
        _, record = wide_range_runs["auto"]
        assert any("calibration: auto" in n for n in record.notes)
        model, (x,) = wide_range_cnn(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = graphopt.PassManager("mobile-int8", verify="none").run(
                model, (x,), calibration_data=normal_batches(x, 3, seed=1))
        (default,) = [r for r in result.report.records if r.name == "quantize"]
        assert "calibration_methods" in default.figures and any("calibration: auto" in n for n in default.notes)


# --------------------------------------------------------------------------- the guard, unit by unit


class TestGuard:
    def test_a_threshold_that_clips_a_fifth_of_the_values_falls_back(self):
        values = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 6
        values[:4000] = 6.0  # saturated, as after ReLU6
        observer = observed("histogram", [values])
        observer.percentile = 70.0  # a range that clips everything above the 70th percentile
        choice = choose(observer, "histogram")
        assert choice.method == "minmax" and choice.bounds == (float(values.min()), 6.0)
        assert "histogram range" in choice.fallback and "min-max's" in choice.fallback

    def test_rare_far_outliers_may_be_clipped(self):
        values = torch.randn(4, 50000, generator=torch.Generator().manual_seed(1))
        values[0, :5] = 30.0
        choice = choose(observed("entropy", list(values)), "entropy")
        assert choice.method == "entropy" and choice.fallback is None and choice.high < 10

    def test_a_mostly_zero_tensor_cannot_pass_its_few_values_off_as_outliers(self):
        values = torch.zeros(100000)
        values[:500] = torch.rand(500, generator=torch.Generator().manual_seed(2)) + 1.0  # 0.5% of the values
        observer = observed("histogram", [values])
        observer.percentile = 99.8  # clips half of the non-zero values to ~1.2
        assert choose(observer, "histogram").method == "minmax"

    def test_nothing_observed_gives_no_choice(self):
        assert choose(HistogramObserver("auto"), "auto") is None

    def test_auto_prefers_minmax_among_equally_good_ranges(self):
        values = torch.clamp(torch.randn(50000, generator=torch.Generator().manual_seed(3)) * 3, 0, 6)
        assert choose(observed("auto", [values]), "auto").method == "minmax"


# --------------------------------------------------------------------------- property


@st.composite
def distributions(draw) -> list[torch.Tensor]:
    kind = draw(st.sampled_from(["gaussian", "heavy", "relu", "relu6", "mostly_zero", "constant", "outliers",
                                 "channels", "spikes"]))
    n, batches = draw(st.integers(200, 5000)), draw(st.integers(1, 4))
    scale = 10.0 ** draw(st.floats(-3, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batches, n, generator=g)
    if kind == "heavy":
        x = x / torch.rand(batches, n, generator=g).clamp_min(1e-3) ** draw(st.sampled_from([0.5, 1.0]))
    elif kind == "relu":
        x = torch.relu(x + draw(st.floats(-2, 2)))
    elif kind == "relu6":
        x = torch.clamp(x * draw(st.floats(0.5, 20)), 0, 6)
    elif kind == "mostly_zero":
        x = torch.where(torch.rand(batches, n, generator=g) < draw(st.floats(0.9, 0.999)), 0.0, x)
    elif kind == "constant":
        x = torch.full((batches, n), draw(st.sampled_from([-1.0, 0.5, 3.0])))
    elif kind == "channels":  # ReLU6 channels whose scales span four decades, as in wide_range_cnn
        channels = draw(st.integers(4, 64))
        spread = 10.0 ** (4 * torch.rand(channels, 1, generator=g) - 2)
        shift = torch.rand(channels, 1, generator=g) * 1.5 - 0.5
        x = torch.clamp(spread * (x.reshape(-1)[: n // channels * channels].reshape(channels, -1) + shift), 0, 6)
        x = x.reshape(1, -1).repeat(batches, 1)
    elif kind == "spikes":  # zeros, a saturated top, a near-constant channel inside: KL's blind spot
        u = torch.rand(batches, n, generator=g)
        top, at = 6.0, draw(st.floats(0.2, 0.8)) * 6.0
        spike_share = draw(st.floats(0.05, 0.15))
        spread = torch.rand(batches, n, generator=g) * top
        x = torch.where(u < 0.35, 0.0, torch.where(u < 0.46, top, torch.where(u < 0.46 + spike_share, at, spread)))
    elif kind == "outliers":
        x[torch.rand(batches, n, generator=g) < 1e-3] = draw(st.floats(-50, 50))
    return list(x * scale)


#: slack between the guard's histogram estimate and torch's real rounding of the values
HISTOGRAM_SLACK = 2.0


@given(distributions())
def test_no_method_is_far_worse_than_minmax_on_any_distribution(batches):
    values = torch.cat(batches)
    # The guard estimates rounding noise by its mean, step**2 / 12 per value; the few values of
    # a mostly-zero tensor may all round by up to half a step, so allow that once per non-zero
    # value (at min-max's step, the coarsest), plus float32 rounding of the scale.
    step = (max(float(values.max()), 0.0) - min(float(values.min()), 0.0)) / 255
    floor = float((values != 0).double().mean()) * (step / 2) ** 2 + (1e-6 * float(values.abs().max())) ** 2
    minmax = fake_quant_errors(values, float(values.min()), float(values.max()))
    reference = outliers_aside(minmax, values)
    for method in METHODS:
        choice = choose(observed(method, batches), method)
        errors = fake_quant_errors(values, *choice.bounds)
        seen = float(values.min()), float(values.max())
        where = (f"{method}: range {choice.bounds} ({choice.method}), min-max {seen}; "
                 f"{len(batches)} batch(es) of {batches[0].numel()}, {int((values != 0).sum())} non-zero")
        assert outliers_aside(errors, values) <= FALLBACK_FACTOR * HISTOGRAM_SLACK * reference + floor, \
            f"{where}: {outliers_aside(errors, values):.3g} vs min-max {reference:.3g}"
        if method == "auto":  # min-max is one of its candidates: never worse, outliers included
            assert float(errors.mean()) <= HISTOGRAM_SLACK * float(minmax.mean()) + floor, \
                f"{where}: {float(errors.mean()):.3g} vs min-max {float(minmax.mean()):.3g}"
