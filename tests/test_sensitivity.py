"""Per-layer int8 sensitivity (graphopt.quantization.analyze, quantize{per_layer_report=true}).

Small MLPs with one planted bad layer: a weight with one huge column that multiplies a channel
that is always zero (every row's scale is set by it, the rest of the row rounds to zero), or an
input with one huge constant channel that the layer ignores (it sets the input's range, the other
channels round to zero). The planted layer must rank first, for the right cause.
"""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.passes.quantize  # noqa: F401  (registers the pass analyze takes its options from)
from graphopt.errors import OptionError, ReportError, TrainingModeError
from graphopt.quantization import LayerSensitivity, SensitivityReport, analyze


class PlantedMlp(nn.Module):
    """a -> relu -> b -> relu -> c, with b's weights (``bad="weight"``) or c's input
    (``bad="activation"``) made hard to quantize."""

    def __init__(self, bad: str | None):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        with torch.no_grad():
            if bad == "weight":
                self.a.bias[3] = -1e3  # channel 3 of b's input is always 0 after the relu
                self.b.weight[:, 3] = 1e3
            elif bad == "activation":
                self.b.bias[5] = 1e3  # channel 5 of c's input is a huge constant ...
                self.c.weight[:, 5] = 0.0  # ... that c ignores

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def planted(bad: str | None) -> nn.Module:
    torch.manual_seed(0)
    return PlantedMlp(bad).eval()


def data(n: int = 6) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 16, generator=g),) for _ in range(n)]


X = data(1)[0][0]


@pytest.fixture(scope="module")
def weight_report() -> SensitivityReport:
    return analyze(planted("weight"), (X,), data())


class TestRanking:
    def test_a_weight_with_a_huge_column_ranks_first_and_is_blamed_on_the_weights(self, weight_report):
        first, *rest = weight_report.layers
        assert (first.module, first.op, first.cause) == ("b", "linear", "weights")
        assert first.weight_sqnr_db < 15 and first.sqnr_db < 15
        assert first.activation_sqnr_db > 40
        assert all(s.sqnr_db > 35 for s in rest)
        assert {s.module for s in weight_report.layers} == {"a", "b", "c"}

    def test_an_input_with_an_outlier_channel_ranks_first_and_is_blamed_on_the_activations(self):
        report = analyze(planted("activation"), X, data())
        first, *rest = report.layers
        assert (first.module, first.cause) == ("c", "activations")
        assert first.activation_sqnr_db < 15 and first.weight_sqnr_db > 35
        assert all(s.sqnr_db > 35 for s in rest)

    def test_layers_are_ranked_worst_first(self, weight_report):
        values = [s.sqnr_db for s in weight_report.layers]
        assert values == sorted(values)

    def test_the_model_is_not_touched(self):
        model = planted("weight")
        before = copy.deepcopy(model.state_dict())
        analyze(model, X, data())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def test_a_model_in_training_mode_is_refused_as_mobile_int8_refuses_it(self):
        model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).train()
        with pytest.raises(TrainingModeError, match=r"model.eval\(\)"):
            analyze(model, (X,), data())

    def test_options_are_checked_as_quantize_checks_them(self):
        with pytest.raises(OptionError, match=r"did you mean 'x86'"):
            analyze(planted(None), X, data(), config="x87")
        with pytest.raises(OptionError, match="percentile must be in"):
            analyze(planted(None), X, data(), percentile=20.0)

    def test_the_calibration_method_is_quantize_s_unless_given(self, weight_report):
        assert weight_report.calibration.startswith(graphopt.get_pass("quantize").options["calibration"].default)
        assert analyze(planted(None), X, data(), calibration="minmax").calibration == "minmax"


class TestOutputs:
    def test_json_round_trips(self, weight_report, tmp_path):
        again = SensitivityReport.from_json(weight_report.to_json())
        assert again == weight_report
        path = weight_report.save_json(tmp_path / "sensitivity.json")
        saved = json.loads(path.read_text())
        assert saved["layers"][0]["module"] == "b" and saved["layers"][0]["cause"] == "weights"
        assert SensitivityReport.from_dict(saved) == weight_report

    def test_an_exact_layer_s_infinite_sqnr_survives_json(self):
        layer = LayerSensitivity("linear", "fc", "linear", math.inf, 40.0, 40.0)
        report = SensitivityReport([layer], "x86", "minmax", "no data")
        text = report.to_json()
        json.loads(text)  # valid JSON: no bare Infinity
        assert SensitivityReport.from_json(text).layers[0].weight_sqnr_db == math.inf

    def test_the_table_lists_every_layer_worst_first(self, weight_report):
        text = str(weight_report)
        rows = [line for line in text.splitlines() if "linear" in line]
        assert [row.split("│")[3].strip() for row in rows] == [s.module for s in weight_report.layers]
        assert "weights" in rows[0]

    def test_plot_writes_a_png(self, weight_report, tmp_path):
        pytest.importorskip("matplotlib")
        path = weight_report.plot(tmp_path / "sensitivity.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p.name for p in tmp_path.iterdir()] == ["sensitivity.png"]  # nothing staged left behind

    def test_plot_without_matplotlib_says_what_to_install(self, weight_report, tmp_path, monkeypatch):
        for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
            monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ReportError, match=r"pip install graphopt\[charts\]"):
            weight_report.plot(tmp_path / "sensitivity.png")
        assert not (tmp_path / "sensitivity.png").exists()


class TestPerLayerReport:
    def test_the_pass_records_the_three_sensitivities_per_layer(self, weight_report):
        manager = graphopt.PassManager("fuse-conv-bn-relu,quantize{per_layer_report=true}", verify="none")
        result = manager.run(planted(None), (X,), calibration_data=data())
        rows = {row["provenance"]: row for row in result.report.records[-1].figures["per_layer"]}
        assert set(rows) == {"a", "b", "c"}
        for row in rows.values():
            assert {"isolated_sqnr_db", "cumulative_sqnr_db"} <= set(row)  # the existing columns stay
            assert 25 < row["weight_sqnr_db"] < math.inf and 25 < row["activation_sqnr_db"] < math.inf
            assert row["sensitivity_sqnr_db"] <= min(row["weight_sqnr_db"], row["activation_sqnr_db"]) + 1.0

    def test_the_pass_and_analyze_measure_the_same(self, weight_report):
        manager = graphopt.PassManager("fuse-conv-bn-relu,quantize{per_layer_report=true,keep_float_worst=1}",
                                       verify="none")
        result = manager.run(planted("weight"), (X,), calibration_data=data())
        rows = {row["provenance"]: row for row in result.report.records[-1].figures["per_layer"]}
        assert set(rows) == {"a", "c"}  # b, the worst, kept float
        by_module = {s.module: s for s in weight_report.layers}
        for module in ("a", "c"):
            assert rows[module]["weight_sqnr_db"] == pytest.approx(by_module[module].weight_sqnr_db, abs=1e-6)
            assert rows[module]["activation_sqnr_db"] == pytest.approx(by_module[module].activation_sqnr_db, abs=1e-6)
