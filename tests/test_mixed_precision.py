"""Mixed precision by budget: quantize{min_sqnr=DB} and quantize(metric=fn, max_drop=D) keep the
fewest layers float, chosen from the sensitivity ranking, and verify the result.

The model is test_sensitivity's MLP with a planted bad weight in layer ``b``: int8 everywhere
misses the 15 dB budget; ``b`` float alone gets about 40 dB.
"""
from __future__ import annotations

import copy

import pytest
import torch

import graphopt
import graphopt.passes.quantize  # noqa: F401
from graphopt.errors import OptionError, QuantizationError
from graphopt.ir import ops
from graphopt.quantization import qdq
from graphopt.quantization.mixed_precision import smallest_passing
from test_sensitivity import X, data, planted


def run(pipeline: str = "fuse-conv-bn-relu,quantize", *, model=None, verify: str = "none",
        on_failure: str = "raise", **options):
    manager = graphopt.PassManager(pipeline, verify=verify, on_failure=on_failure,
                                   options={"quantize": options} if options else None)
    result = manager.run(model if model is not None else planted("weight"), (X,), calibration_data=data())
    return result, result.report.records[-1]


def float_layers(gm) -> set[str]:
    """Module paths of the linears whose weight is read in float."""
    return {str(ops.arg(n, "weight").target).rpartition(".")[0] for n in gm.graph.nodes
            if ops.is_op(n, "linear") and not qdq.is_weight_dequantize(ops.arg(n, "weight"))}


class TestMinSqnr:
    def test_without_a_budget_the_planted_layer_breaks_int8(self):
        result, record = run(on_failure="rollback")
        assert record.status == "rolled-back" and "below the 15 dB budget" in record.error

    def test_the_planted_layer_stays_float_and_the_others_go_int8(self):
        result, record = run("fuse-conv-bn-relu,quantize{min_sqnr=30}")
        assert float_layers(result.module) == {"b"}
        assert min(record.figures["held_out_sqnr_db"]) >= 30
        (kept,) = record.figures["kept_float"]
        assert kept == "linear_1" and "needed for output SQNR >= 30 dB" in record.figures["kept_float"][kept]
        assert record.figures["float_fraction"] == pytest.approx(1 / 3)
        assert [p["float_layers"] for p in record.figures["mixed_precision"]["probes"]] == [0, 1]
        assert any(node == "linear_1" and "kept float: needed for" in why for node, why in record.declines)
        assert any(note.startswith("mixed precision: 1 of 3 layers kept float for output SQNR >= 30 dB")
                   for note in record.notes)

    def test_min_sqnr_tightens_the_contract_and_never_loosens_it(self):
        result, record = run("fuse-conv-bn-relu,quantize{min_sqnr=30}", verify="each")
        assert record.status == "changed" and record.contract == "lossy(sqnr>=30dB)"
        assert result.report.sqnr_floor_db == 30
        loose = graphopt.PassManager("quantize{min_sqnr=10}").invocations[0]
        assert loose.contract.min_sqnr_db == 15

    def test_a_layer_hurt_by_its_input_is_kept_float_with_the_layer_that_writes_that_input(self):
        # c's input holds a huge constant channel that b writes: with b int8, c reads integers on
        # a range that channel stretches, float weights or not; with b float too it reads floats
        result, record = run(model=planted("activation"), min_sqnr=30.0)
        assert float_layers(result.module) == {"b", "c"}
        assert min(record.figures["held_out_sqnr_db"]) >= 30
        kept = record.figures["kept_float"]
        assert set(kept) == {"linear_1", "linear_2"}
        assert "its output feeds linear_2" in kept["linear_1"] and "needed for" in kept["linear_2"]
        assert [p["float_layers"] for p in record.figures["mixed_precision"]["probes"]] == [0, 1]
        assert record.figures["float_fraction"] == pytest.approx(2 / 3)

    def test_a_budget_below_the_floor_still_meets_the_floor(self):
        result, record = run(min_sqnr=10.0)
        assert float_layers(result.module) == {"b"}
        assert min(record.figures["held_out_sqnr_db"]) >= 15
        assert any("below the pass's 15 dB budget, which still holds" in note for note in record.notes)

    def test_a_model_that_meets_the_budget_keeps_nothing_float(self):
        result, record = run(model=planted(None), min_sqnr=30.0)
        assert float_layers(result.module) == set()
        assert "kept_float" not in record.figures and record.figures["float_fraction"] == 0.0
        assert len(record.figures["mixed_precision"]["probes"]) == 1

    def test_an_unreachable_budget_names_the_best_reached(self):
        with pytest.raises(QuantizationError, match=r"cannot reach output SQNR >= 90 dB .* the best reached is "
                                                    r"\d+\.\d dB with [0-2] of 3 layers float"):
            run(min_sqnr=90.0)

    def test_dynamic_mode_keeps_the_planted_layer_float_too(self):
        result, record = run("quantize{mode=dynamic,min_sqnr=30}")
        assert float_layers(result.module) == {"b"}
        assert min(record.figures["held_out_sqnr_db"]) >= 30

    def test_a_graph_without_convs_or_linears_is_judged_as_it_is(self):
        class Adds(torch.nn.Module):
            def forward(self, x):  # flattened: an add no int8 op reads would stay float
                return torch.flatten(torch.relu(x) + x * 0.5, 1)

        result, record = run("quantize{min_sqnr=25}", model=Adds().eval())
        assert record.figures["mixed_precision"]["layers"] == 0
        assert record.figures["units_by_op"] == {"add": 1, "flatten": 1}
        with pytest.raises(QuantizationError, match="with 0 of 0 layers float"):
            run("quantize{min_sqnr=80}", model=Adds().eval())

    def test_the_model_is_not_touched(self):
        model = planted("weight")
        before = copy.deepcopy(model.state_dict())
        run(model=model, min_sqnr=30.0)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TestMetric:
    @staticmethod
    def closeness(model):
        """Negative mean squared error against the float model: higher is better."""
        def score(outputs, batch):
            with torch.no_grad():
                return -float(((outputs - model(*batch)) ** 2).mean())
        return score

    def test_layers_stay_float_until_the_drop_is_within_max_drop(self):
        model = planted("weight")
        result, record = run(model=model, metric=self.closeness(model), max_drop=1e-4)
        assert float_layers(result.module) == {"b"}
        assert 0 <= record.figures["metric_drop"] <= 1e-4
        assert record.figures["mixed_precision"]["target"] == "output SQNR >= 15 dB and metric drop <= 0.0001"

    def test_an_unreachable_drop_is_an_error(self):
        model = planted(None)  # the float model scores 0, any int8 layer below it
        with pytest.raises(QuantizationError, match=r"cannot reach .*metric drop <= 0 .*\(metric drop \d"):
            run(model=model, metric=self.closeness(model), max_drop=0.0)

    def test_metric_needs_max_drop(self):
        with pytest.raises(OptionError, match="metric needs max_drop"):
            run(metric=lambda outputs, batch: 0.0)

    def test_a_failing_metric_is_named(self):
        def broken(outputs, batch):
            raise KeyError("logits")

        with pytest.raises(QuantizationError, match=r"metric 'broken' failed .*KeyError"):
            run(metric=broken, max_drop=0.1)

    def test_a_metric_cannot_come_from_a_pipeline_string(self):
        with pytest.raises(OptionError, match="pass it from Python"):
            graphopt.PassManager("quantize{metric=accuracy}")


class TestSearch:
    @pytest.mark.parametrize("answer", [0, 1, 2, 3, 5, 17, 39])
    def test_finds_the_smallest_passing_prefix_in_few_calls(self, answer):
        calls = []

        def passes(k):
            calls.append(k)
            return k >= answer

        assert smallest_passing(39, passes) == answer
        assert len(calls) <= 2 * max(answer, 1).bit_length() + 1

    def test_none_when_even_the_largest_fails(self):
        assert smallest_passing(10, lambda k: False) is None
        assert smallest_passing(-1, lambda k: True) is None
