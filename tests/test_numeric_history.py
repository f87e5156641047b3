"""Per-node numeric history: with verify="each" the report keeps, after each pass that changed
values, each node's error against the ORIGINAL graph (by provenance), and says where a node's
error first fell below a figure."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import PipelineError
from graphopt.ir import graph as G
from graphopt.verify import history


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


INPUTS = (torch.randn(3, 8),)


def _scale_after(gm, provenance: str, factor: float) -> None:
    """Multiply the value of ``provenance`` by ``factor``: a new node that takes its provenance."""
    node = [n for n in gm.graph.nodes if n.op != "output" and G.provenance(n) == provenance][-1]
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(torch.mul, (node, factor))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    G.copy_provenance(scaled, node)


@pytest.fixture
def scaling_passes(registry):
    @registry("t-scale-act", contract=graphopt.Lossy(min_sqnr_db=10.0))
    def scale_act(gm, ctx):
        _scale_after(gm, "act", 1.01)
        return 1

    @registry("t-times-one", contract=graphopt.Exact())
    def times_one(gm, ctx):  # x * 1.0 on the last layer: a change whose outputs stay bit-equal
        _scale_after(gm, "fc2", 1.0)
        return 1


class TestRecordedErrors:
    def test_a_scaled_value_has_the_sqnr_of_its_scale_and_values_before_it_none(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        errors = report.numeric_history[0]
        assert list(errors) == ["fc1", "act", "fc2"]  # the original graph's order
        assert errors["fc1"].sqnr_db == math.inf and errors["fc1"].max_abs == 0
        assert errors["act"].sqnr_db == pytest.approx(40.0, abs=1e-3)  # 10*log10(1 / 0.01**2)
        assert 0 < errors["act"].max_abs and errors["fc2"].max_abs > 0 and errors["fc2"].sqnr_db < math.inf

    def test_max_abs_is_the_largest_difference_over_the_verification_inputs(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        model = TwoLayers().eval()
        inputs = graphopt.verify.verification_inputs(INPUTS, synthesize=2, seed=0)[:2]  # example, uniform
        with torch.no_grad():
            largest = max(float(torch.relu(model.fc1(x)).abs().max()) for (x,) in inputs)
        assert report.numeric_history[0]["act"].max_abs == pytest.approx(0.01 * largest, rel=1e-5)

    def test_error_is_against_the_original_graph_not_the_previous_one(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act,t-scale-act").report
        first, second = report.numeric_history[0]["act"], report.numeric_history[1]["act"]
        assert first.sqnr_db == pytest.approx(40.0, abs=1e-3)
        # two scalings by 1.01 are one by 1.0201 against the original (against the graph before
        # the second pass it would be 40 dB again)
        assert second.sqnr_db == pytest.approx(20 * math.log10(1 / 0.0201), abs=1e-3)
        # the pass table stays per pass: its output SQNR is against the graph before the pass, where
        # the output error is about half of the one against the original (6 dB higher)
        assert report.records[1].min_sqnr_db - report.numeric_history[1]["fc2"].sqnr_db > 5

    def test_a_value_that_no_longer_corresponds_is_left_out(self):
        gm = graphopt.capture(TwoLayers().eval(), INPUTS)
        original = history.record(gm, [INPUTS])
        other = graphopt.capture(nn.Sequential().eval(), INPUTS)  # no provenance in common
        assert history.node_errors(original, other, [INPUTS]) == {}
        wider = nn.Linear(8, 5)  # fc1 of another shape: same provenance, another shape
        model = TwoLayers().eval()
        model.fc1, model.fc2 = wider, nn.Linear(5, 4)
        errors = history.node_errors(original, graphopt.capture(model, INPUTS), [INPUTS])
        assert "fc1" not in errors and "act" not in errors and "fc2" in errors


class TestWhatIsRecorded:
    def test_exact_bit_equal_and_unchanged_passes_have_no_entry(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "canonicalize,t-times-one,t-scale-act").report
        assert not report.records[0].changed
        assert report.records[1].changed and report.records[1].max_abs_error == 0
        assert sorted(report.numeric_history) == [2]

    def test_the_original_is_recorded_once_and_each_changed_pass_once(self, scaling_passes, monkeypatch):
        calls = {"record": 0, "node_errors": 0}
        for name in calls:
            real = getattr(history, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(history, name, counted)
        graphopt.optimize(TwoLayers().eval(), INPUTS, "t-times-one,t-scale-act,t-scale-act")
        assert calls == {"record": 1, "node_errors": 2}

    def test_a_run_whose_outputs_never_change_runs_nothing_node_by_node(self, scaling_passes, monkeypatch):
        monkeypatch.setattr(history, "record", lambda *a, **k: pytest.fail("recorded the original for nothing"))
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-times-one,eliminate-dead-code").report
        assert report.numeric_history == {}

    def test_the_original_is_the_graph_before_the_first_change(self, scaling_passes):
        # the bit-equal pass changed the graph first; the history still compares with the captured values
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-times-one,t-scale-act").report
        assert report.numeric_history[1]["fc1"].sqnr_db == math.inf
        assert report.numeric_history[1]["act"].sqnr_db == pytest.approx(40.0, abs=1e-3)

    def test_a_rolled_back_pass_has_no_entry(self, registry):
        @registry("t-ruin", contract=graphopt.Lossy(min_sqnr_db=60.0))
        def ruin(gm, ctx):
            _scale_after(gm, "act", 1.01)  # 40 dB, below the pass's own 60 dB budget
            return 1

        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-ruin").report
        assert report.records[0].status == "rolled-back" and report.numeric_history == {}

    def test_only_verify_each_records_it(self, scaling_passes):
        for mode in ("final", "none"):
            assert graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act", verify=mode).report.numeric_history == {}
        off = graphopt.PassManager("t-scale-act", numeric_history=False).run(TwoLayers().eval(), INPUTS)
        assert off.report.numeric_history == {}
        with pytest.raises(PipelineError, match="numeric_history=True needs verify='each'"):
            graphopt.PassManager("t-scale-act", verify="final", numeric_history=True)


    def test_a_graph_that_cannot_be_run_node_by_node_stops_the_history_not_the_run(self, scaling_passes, monkeypatch):
        def broken(*args, **kwargs):
            raise RuntimeError("no interpreter today")

        monkeypatch.setattr(history, "node_errors", broken)
        result = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act,t-scale-act")
        assert [r.status for r in result.report.records] == ["changed", "changed"]
        assert result.report.numeric_history == {}
        assert any(n.startswith("numeric history stopped at pass 't-scale-act'") and "no interpreter today" in n
                   for n in result.report.notes)

    def test_optimize_can_leave_it_out(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act", numeric_history=False).report
        assert report.records[0].changed and report.numeric_history == {}


class TestReading:
    def test_first_below_names_the_pass_after_which_a_node_fell_below(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-times-one,t-scale-act,t-scale-act").report
        found = report.first_below("act", 38.0)  # 40 dB after the first scaling, 33.9 after the second
        assert (found.record, found.pass_name) == (2, "t-scale-act")
        assert found.error.sqnr_db == pytest.approx(33.94, abs=0.01)
        assert report.first_below("act", 45.0).record == 1
        assert report.first_below("fc1", 200.0) is None  # never changed
        assert report.first_below("no-such-node", 10.0) is None
        assert [p.record for p in report.node_history("act")] == [1, 2]

    def test_text_report_lists_the_worst_values_per_pass(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        [line] = [line for line in report.details() if "per-node error" in line]
        worst = min(report.numeric_history[0].items(), key=lambda item: item[1].sqnr_db)
        assert line.startswith("t-scale-act (#1): per-node error against the original graph, 3 value(s) compared")
        assert f"lowest: {worst[0]} {worst[1]}" in line
        assert "per-node error" in str(report)

    def test_json_report_holds_every_value(self, scaling_passes):
        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        data = json.loads(json.dumps(report.to_dict()))
        [entry] = data["numeric_history"]
        assert entry["record"] == 0 and entry["pass"] == "t-scale-act"
        assert entry["nodes"]["fc1"] == {"sqnr_db": "inf", "max_abs": 0.0}
        assert entry["nodes"]["act"]["sqnr_db"] == pytest.approx(40.0, abs=1e-3)


class TestGraphsOnRequest:
    def test_graphs_are_kept_only_when_asked(self, scaling_passes):
        plain = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        assert plain.graphs == {} and not plain.graphs_kept
        kept = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act", keep_graphs=True).report
        assert kept.graphs_kept and list(kept.graphs) == [0]
        before, after = kept.graphs[0]
        assert len(after) == len(before) + 1  # the scaling node

    def test_model_explorer_refuses_a_run_without_graphs_and_says_how(self, scaling_passes):
        from graphopt.errors import ReportError
        from graphopt.view import explorer

        report = graphopt.optimize(TwoLayers().eval(), INPUTS, "t-scale-act").report
        with pytest.raises(ReportError, match="keep_graphs=True"):
            explorer._states(report)
