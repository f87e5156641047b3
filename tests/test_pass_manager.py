"""PassManager, registry and pipelines: what users rely on when they write and run passes."""
from __future__ import annotations

import io
import json
import operator
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir import graph as G
from graphopt.pipeline import passes as pass_infra
from graphopt.errors import OptionError, PassError, PipelineError, VerificationError


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = x @ self.w
        return torch.relu(y * 1.0) + 0.0


@pytest.fixture
def gm():
    torch.manual_seed(0)
    g = fx.symbolic_trace(Small())
    return g


@pytest.fixture
def x():
    return (torch.randn(2, 4),)


def _mul_one_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul and n.args[1] == 1.0]


def test_function_pass_options_come_from_keyword_only_parameters(registry, gm, x):
    seen = {}

    @registry("t-remember")
    def remember(gm, ctx, *, factor: int = 2, label: str = "a", on: bool = False):
        seen.update(factor=factor, label=label, on=on)
        return 0

    graphopt.PassManager("t-remember{factor=5,label=hello,on=true}").run(gm, x)
    assert seen == {"factor": 5, "label": "hello", "on": True}
    assert set(graphopt.get_pass("t-remember").options) == {"factor", "label", "on"}


def test_class_pass_options_are_dataclass_fields(registry, gm, x):
    from dataclasses import dataclass

    @registry("t-class")
    @dataclass
    class Count:
        threshold: float = 0.5

        def run(self, gm, ctx):
            ctx.record("threshold", self.threshold)
            return 0

    result = graphopt.PassManager("t-class{threshold=0.25}").run(gm, x)
    assert result.report.records[0].figures["threshold"] == 0.25


def test_fold_mul_one_rewrites_are_counted_and_outputs_kept(registry, gm, x):
    @registry("t-fold-mul-one", contract=graphopt.Exact())
    def fold_mul_one(gm, ctx):
        n = 0
        for node in _mul_one_nodes(gm):
            if ctx.may_rewrite(node.name):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                n += 1
        return n

    result = graphopt.PassManager("t-fold-mul-one").run(gm, x)
    rec = result.report.records[0]
    assert (rec.status, rec.rewrites, rec.changed) == ("changed", 1, True)
    assert rec.nodes_after == rec.nodes_before - 1
    assert not _mul_one_nodes(result.module)
    assert torch.equal(result.module(*x), gm(*x))
    assert result.report.final_verdict.ok


def test_changed_is_computed_not_trusted(registry, gm, x):
    @registry("t-liar")
    def liar(gm, ctx):
        return 7  # claims rewrites, changes nothing

    rec = graphopt.PassManager("t-liar").run(gm, x).report.records[0]
    assert rec.changed is False and rec.status == "unchanged"


def test_users_graph_module_is_never_mutated(registry, gm, x):
    @registry("t-erase-mul")
    def erase(gm, ctx):
        for node in _mul_one_nodes(gm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return 1

    code_before = gm.code
    graphopt.PassManager("t-erase-mul").run(gm, x)
    assert gm.code == code_before and _mul_one_nodes(gm)


def _wreck_then_raise(gm, ctx):
    """A pass that damages the graph, then fails: rollback must undo the damage."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            node.target = torch.sigmoid  # damage first, then fail
    raise RuntimeError("boom")


def test_raising_pass_is_rolled_back_and_named(registry, gm, x):
    registry("t-crash")(_wreck_then_raise)

    result = graphopt.PassManager("t-crash").run(gm, x)
    rec = result.report.records[0]
    assert rec.status == "rolled-back" and "boom" in rec.error and "t-crash" in rec.error
    assert torch.equal(result.module(*x), gm(*x))
    assert "t-crash" in str(result.report) and "rolled back" in str(result.report)


def test_contract_breaking_pass_is_rolled_back_with_the_divergent_node(registry, gm, x):
    @registry("t-break", contract=graphopt.Exact())
    def brk(gm, ctx):
        for node in gm.graph.nodes:
            if node.target is torch.relu:
                node.target = torch.sigmoid
        return 1

    result = graphopt.PassManager("t-break").run(gm, x)
    rec = result.report.records[0]
    assert rec.status == "rolled-back"
    assert "relu" in rec.error  # names the first divergent node
    assert torch.equal(result.module(*x), gm(*x))
    with pytest.raises(VerificationError, match="t-break"):
        graphopt.PassManager("t-break", on_failure="raise").run(gm, x)


def test_on_failure_raise_gives_pass_error(registry, gm, x):
    @registry("t-crash2")
    def crash(gm, ctx):
        raise ValueError("bad")

    with pytest.raises(PassError, match="t-crash2.*ValueError: bad"):
        graphopt.PassManager("t-crash2", on_failure="raise").run(gm, x)


def test_in_place_tensor_mutation_is_named(registry, gm, x):
    @registry("t-inplace")
    def inplace(gm, ctx):
        with torch.no_grad():
            gm.w.mul_(2)
        return 1

    with pytest.raises(PassError, match="modified tensor 'w' in place"):
        graphopt.PassManager("t-inplace", on_failure="raise").run(gm, x)


def test_lossy_contract_checks_its_budget(registry, gm, x):
    @registry("t-noise", contract=graphopt.Lossy(min_sqnr_db=20.0))
    def noise(gm, ctx, *, scale: float = 1e-4):
        name = graphopt.ir.graph.add_parameter(gm, "w_noisy", gm.w + scale * torch.randn_like(gm.w))
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == "w":
                node.target = name
        return 1

    ok = graphopt.PassManager("t-noise").run(gm, x).report.records[0]
    assert ok.status == "changed" and ok.min_sqnr_db > 20
    bad = graphopt.PassManager("t-noise{scale=10.0}").run(gm, x).report.records[0]
    assert bad.status == "rolled-back" and "SQNR" in bad.error


def _noise_pass(gm, ctx, *, scale: float = 1e-4, budget: float | None = None):
    name = graphopt.ir.graph.add_parameter(gm, "w_noisy", gm.w + scale * torch.randn_like(gm.w))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == "w":
            node.target = name
    return 1


@pytest.mark.parametrize("verify", ["each", "final"])
def test_a_lossy_pass_without_a_budget_reports_its_sqnr_and_no_budget_not_ok(registry, gm, x, verify):
    registry("t-unbudgeted", contract=graphopt.Lossy(min_sqnr_db=None))(_noise_pass)
    torch.manual_seed(0)
    report = graphopt.PassManager("t-unbudgeted{scale=3.0}", verify=verify).run(gm, x).report
    (record,) = report.records
    assert record.status == "changed" and record.check == "no budget" and record.contract == "lossy(no budget)"
    if verify == "each":  # measured against the graph before the pass, and far below any sane budget
        assert record.min_sqnr_db < 10
    assert report.final_verdict.ok and report.final_check == "no budget" and report.unbudgeted == ["t-unbudgeted"]
    final = next(line for line in report.details() if line.startswith("final check"))
    assert final.startswith("final check against the captured model: no budget: output SQNR ")
    assert f"{report.final_verdict.min_sqnr_db:.1f} dB" in final and "t-unbudgeted" in final
    text = str(report)
    assert "changed, no budget" in text and "t-unbudgeted: no budget: " in text
    assert "captured model: ok" not in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["final_check"] == "no budget" and data["unbudgeted_lossy_passes"] == ["t-unbudgeted"]
    assert data["records"][0]["check"] == "no budget"
    if verify == "each":
        assert data["records"][0]["min_sqnr_db"] == pytest.approx(record.min_sqnr_db)


def test_exact_and_budgeted_passes_still_say_ok(registry, gm, x):
    registry("t-budgeted", contract=graphopt.Lossy(min_sqnr_db=20.0))(_noise_pass)
    report = graphopt.PassManager("t-budgeted").run(gm, x).report
    assert report.records[0].check == "ok" and report.final_check == "ok" and not report.unbudgeted
    assert "final check against the captured model: ok: " in str(report)
    assert report.to_dict()["final_check"] == "ok"


def test_a_budget_option_sets_the_lossy_contract_of_each_invocation(registry, gm, x):
    registry("t-optional-budget", contract=graphopt.Lossy(min_sqnr_db=None, budget_option="budget"))(_noise_pass)
    unbudgeted = graphopt.PassManager("t-optional-budget{scale=10.0}").run(gm, x).report.records[0]
    assert unbudgeted.status == "changed" and unbudgeted.check == "no budget"
    # the manager's contract check rolls it back, as it does quantize's fixed budget
    bad = graphopt.PassManager("t-optional-budget{scale=10.0,budget=20}").run(gm, x).report.records[0]
    assert bad.status == "rolled-back" and bad.contract == "lossy(sqnr>=20dB)"
    assert "broke its lossy(sqnr>=20dB) contract" in bad.error and "< budget 20" in bad.error
    good = graphopt.PassManager("t-optional-budget{budget=20}").run(gm, x).report.records[0]
    assert good.status == "changed" and good.check == "ok" and good.min_sqnr_db > 20


def test_unknown_pass_and_option_fail_before_running_with_suggestions(registry, gm, x):
    ran = []

    @registry("t-ran")
    def r(gm, ctx, *, level: int = 1):
        ran.append(1)
        return 0

    with pytest.raises(PipelineError, match="did you mean 't-ran'"):
        graphopt.PassManager("t-ran,t-rna")
    with pytest.raises(OptionError, match="did you mean 'level'"):
        graphopt.PassManager("t-ran{levle=2}")
    with pytest.raises(OptionError, match="expected int"):
        graphopt.PassManager("t-ran{level=high}")
    with pytest.raises(PipelineError, match="cannot parse"):
        graphopt.PassManager("t-ran{level=2")
    assert not ran


def test_ordering_constraints_are_reported_not_reordered(registry):
    registry("t-first")(lambda gm, ctx: 0)
    registry("t-second", after=("t-first",))(lambda gm, ctx: 0)
    with pytest.raises(PipelineError, match="'t-second'.*must run after 't-first'.*never reorders"):
        graphopt.PassManager("t-second,t-first")
    assert [i.name for i in graphopt.PassManager("t-first,t-second").invocations] == ["t-first", "t-second"]
    # a constraint on a pass absent from the pipeline does not apply
    graphopt.PassManager("t-second")


def test_presets_expand_inside_pipeline_strings(registry):
    registry("t-a")(lambda gm, ctx: 0)
    registry("t-b")(lambda gm, ctx: 0)
    graphopt.register_preset("t-preset", "t-a,t-b")
    pm = graphopt.PassManager("t-preset,t-a{}")
    assert [i.name for i in pm.invocations] == ["t-a", "t-b", "t-a"]


def test_pipeline_accepts_lists_of_names_passes_and_callables(registry, gm, x):
    registry("t-n")(lambda gm, ctx: 0)

    def my_callable(gm, ctx):
        return 0

    pm = graphopt.PassManager(["t-n", graphopt.get_pass("t-n"), my_callable])
    assert [i.name for i in pm.invocations] == ["t-n", "t-n", "my-callable"]
    assert len(pm.run(gm, x).report.records) == 3


def test_report_is_a_table_and_json(registry, gm, x):
    @registry("t-decline")
    def decline(gm, ctx):
        ctx.decline("mul", "because it is a test")
        return 0

    report = graphopt.PassManager("t-decline").run(gm, x).report
    text = str(report)
    assert "t-decline" in text and "declined at mul: because it is a test" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["records"][0]["declines"] == [{"node": "mul", "reason": "because it is a test"}]


def test_print_graph_hook_prints_a_diff_after_changing_passes(registry, gm, x):
    @registry("t-fold")
    def fold(gm, ctx):
        for node in _mul_one_nodes(gm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return 1

    registry("t-noop")(lambda gm, ctx: 0)
    out = io.StringIO()
    graphopt.PassManager("t-fold,t-noop", hooks=[graphopt.PrintGraph(file=out)]).run(gm, x)
    text = out.getvalue()
    assert "after t-fold" in text and "-    mul = " in text and "after t-noop" not in text


def test_fixed_point_repeats_until_nothing_changes(registry, gm, x):
    @registry("t-one-at-a-time")
    def one(gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (operator.mul, operator.add) and node.args[1] in (0.0, 1.0):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                return 1
        return 0

    result = graphopt.PassManager("t-one-at-a-time", fixed_point=True).run(gm, x)
    assert [r.changed for r in result.report.records] == [True, True, False]


def test_bisect_finds_the_first_bad_rewrite(registry):
    class Chain(nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(torch.relu(x) - 0.5) + 0.25)

    @registry("t-bad-third")
    def bad(gm, ctx):
        n = 0
        for i, node in enumerate([n for n in gm.graph.nodes if n.target is torch.relu]):
            if not ctx.may_rewrite(f"relu #{i}"):
                continue
            n += 1
            if i == 1:  # the second relu is not redundant: removing it is wrong
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        return n

    found = graphopt.bisect(Chain(), (torch.randn(8, 8),), "t-bad-third")
    assert (found.pass_name, found.first_bad, found.rewrite_in_pass, found.description) == ("t-bad-third", 2, 2, "relu #1")
    assert found.total_rewrites == 3


class _ReluChain(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(x) - 0.5) + 0.25)


def _register_noisy_relus(registry, contract, scales):
    """A lossy pass scaling the value of each relu by its entry of ``scales``, one rewrite each;
    returns the provenance of each relu it rewrote, in order."""
    rewritten = []

    @registry("t-noisy-relus", contract=contract)
    def noisy(gm, ctx):
        n = 0
        for i, node in enumerate([n for n in gm.graph.nodes if n.target is torch.relu]):
            if not ctx.may_rewrite(f"scale relu #{i} ({node.name})"):
                continue
            with gm.graph.inserting_after(node):
                scaled = gm.graph.call_function(torch.mul, (node, scales[i]))
            node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
            G.copy_provenance(scaled, node)
            rewritten.append(G.provenance(node))
            n += 1
        return n

    return rewritten


def test_lossy_bisect_finds_the_rewrite_that_drops_output_sqnr_below_the_budget(registry):
    # relu #0 and #2 lose ~60 dB each, relu #1 ~20 dB: with a 30 dB budget the second rewrite is the bad one
    rewritten = _register_noisy_relus(registry, graphopt.Lossy(min_sqnr_db=None), [1.001, 1.1, 1.001])
    found = graphopt.bisect(_ReluChain(), (torch.randn(8, 8),), "t-noisy-relus", min_sqnr=30)
    assert (found.pass_name, found.first_bad, found.rewrite_in_pass, found.total_rewrites) == ("t-noisy-relus", 2, 2, 3)
    assert found.description.startswith("scale relu #1")
    assert found.min_sqnr == 30 and found.verdict.ok and found.verdict.min_sqnr_db < 30
    relus = list(dict.fromkeys(rewritten))
    # the error entered at the second relu: worse than the budget there, the first relu's is not
    assert found.entered_at == relus[1]
    assert found.node_errors[relus[1]].sqnr_db < 30 < found.node_errors[relus[0]].sqnr_db
    assert "breaks the 30 dB output SQNR budget" in str(found) and repr(relus[1]) in str(found)


def test_lossy_bisect_judges_against_the_lowest_budget_of_the_lossy_passes_by_default(registry):
    _register_noisy_relus(registry, graphopt.Lossy(min_sqnr_db=50.0), [1.001, 1.001, 1.01])
    found = graphopt.bisect(_ReluChain(), (torch.randn(8, 8),), "t-noisy-relus")
    assert found.min_sqnr == 50.0 and (found.first_bad, found.rewrite_in_pass) == (3, 3)
    within = graphopt.bisect(_ReluChain(), (torch.randn(8, 8),), "t-noisy-relus", min_sqnr=20)
    assert within.first_bad is None and "no rewrite breaks the 20 dB output SQNR budget" in str(within)


def test_lossy_bisect_of_int8_names_a_quantize_rewrite_and_the_value_it_degraded():
    from graphopt.app import examples

    model, inputs = examples.get_example("resnet_cnn")
    with pytest.warns(UserWarning, match="no calibration data"):
        full = graphopt.optimize(model, inputs, "mobile-int8").report.final_verdict.min_sqnr_db
        found = graphopt.bisect(model, inputs, "mobile-int8", min_sqnr=full + 2)  # a budget the whole run misses
    assert found.pass_name == "quantize" and found.description.startswith("quantize ")
    assert 0 < found.first_bad <= found.total_rewrites and found.verdict.min_sqnr_db < full + 2
    assert found.entered_at is not None and found.node_errors[found.entered_at].sqnr_db < float("inf")


def test_lossy_bisect_without_any_budget_asks_for_one(registry):
    _register_noisy_relus(registry, graphopt.Lossy(min_sqnr_db=None), [1.1, 1.1, 1.1])
    with pytest.raises(PipelineError, match="pass min_sqnr="):
        graphopt.bisect(_ReluChain(), (torch.randn(8, 8),), "t-noisy-relus")


def test_exact_bisect_names_the_node_where_the_difference_entered(registry):
    rewritten = _register_noisy_relus(registry, graphopt.Exact(), [1.0, 1.5, 1.0])
    found = graphopt.bisect(_ReluChain(), (torch.randn(8, 8),), "t-noisy-relus")
    assert found.min_sqnr is None and found.first_bad == 2
    assert found.entered_at == list(dict.fromkeys(rewritten))[1]


def test_entry_point_passes_are_discovered(tmp_path, monkeypatch):
    pkg = tmp_path / "graphopt_dummy_plugin.py"
    pkg.write_text(textwrap.dedent('''
        import graphopt
        @graphopt.register_pass("dummy-plugin-pass")
        def dummy(gm, ctx):
            """A pass shipped by a third-party distribution."""
            return 0
    '''))
    dist = tmp_path / "graphopt_dummy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-dummy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[graphopt.passes]\ndummy = graphopt_dummy_plugin\nbroken-pass = graphopt_missing_plugin_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pass_infra.PASSES, "_discovered", False)
    monkeypatch.setattr(pass_infra.PASSES, "plugin_errors", {})
    try:
        # one policy with backends: a broken plug-in is warned about and named on lookup
        with pytest.warns(UserWarning, match="pass plug-in 'broken-pass' could not be loaded"):
            passes = graphopt.available_passes()
        assert "dummy-plugin-pass" in passes
        assert passes["dummy-plugin-pass"].summary == "A pass shipped by a third-party distribution."
        with pytest.raises(PipelineError, match="pass plug-in 'broken-pass' failed to load"):
            graphopt.optimize(nn.Linear(2, 2), (torch.randn(1, 2),), pipeline="broken-pass")
    finally:
        graphopt.unregister_pass("dummy-plugin-pass")
        sys.modules.pop("graphopt_dummy_plugin", None)


def test_pass_names_must_be_kebab_case():
    with pytest.raises(PipelineError, match="kebab-case"):
        graphopt.register_pass("Bad_Name")


def test_rollback_without_snapshots_restores_the_right_state_and_never_touches_the_caller(registry, x):
    """A captured module carries shapes, so the manager holds the caller's module as the state
    to roll back to until a pass changes something (no snapshot copy), and a snapshot after."""
    torch.manual_seed(0)
    captured = graphopt.capture(Small(), x)
    structure = [(n.op, n.target, n.args) for n in captured.graph.nodes]
    want = captured(*x)

    @registry("t-noop")
    def noop(gm, ctx):
        return 0

    registry("t-wreck")(_wreck_then_raise)

    @registry("t-drop-add")
    def drop_add(gm, ctx):
        for node in [n for n in gm.graph.nodes if n.target is operator.add and n.args[1] == 0.0]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return 1

    result = graphopt.PassManager("t-noop,t-wreck,t-wreck,t-drop-add,t-wreck,t-noop").run(captured, x)
    statuses = [r.status for r in result.report.records]
    assert statuses == ["unchanged", "rolled-back", "rolled-back", "changed", "rolled-back", "unchanged"]
    out = result.module
    assert out is not captured
    assert not [n for n in out.graph.nodes if n.target is operator.add]  # the change survived the rollback
    assert not [n for n in out.graph.nodes if n.target is torch.sigmoid]
    assert torch.equal(out(*x), want)
    assert [(n.op, n.target, n.args) for n in captured.graph.nodes] == structure


# --------------------------------------------------------------------------- training mode


def _bn_dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 4, 1))


class _PassesRun(graphopt.Hook):
    def __init__(self):
        self.names = []

    def before_pass(self, inv, gm, ctx):
        self.names.append(inv.name)


@pytest.mark.parametrize("preset", ["mobile-fp32", "mobile-int8", "mobile-pruned"])
def test_a_model_in_training_mode_is_refused_by_inference_presets_before_any_pass(preset):
    model, inputs = _bn_dropout_net().train(), (torch.randn(2, 3, 8, 8),)
    hook = _PassesRun()
    with pytest.raises(graphopt.TrainingModeError, match=r"training mode .* Call model\.eval\(\)") as info:
        graphopt.optimize(model, inputs, preset, hooks=[hook])
    assert isinstance(info.value, graphopt.GraphoptError) and hook.names == []
    message = str(info.value)
    assert "batch norm '1'" in message and "dropout '3'" in message and repr(preset) in message
    assert "channels-last" not in message  # no pass is blamed
    model.eval()  # what the message asks for: then nothing is rolled back
    assert not graphopt.optimize(model, inputs, preset, calibration_data=[inputs] * 4).report.failed


def test_one_submodule_in_training_mode_is_enough_and_named():
    model, inputs = _bn_dropout_net().eval(), (torch.randn(2, 3, 8, 8),)
    model[1].train()
    with pytest.raises(graphopt.TrainingModeError) as info:
        graphopt.optimize(model, inputs)  # the default pipeline: mobile-fp32
    assert info.value.parts == ["batch norm '1' normalizes with batch statistics and updates its running ones"]
    # a nested preset counts, and so does a graph module (refused before it runs, so the
    # caller's batch-norm statistics stay as they were)
    traced = fx.symbolic_trace(model)
    mean = traced.get_submodule("1").running_mean.clone()
    with pytest.raises(graphopt.TrainingModeError, match="'mobile-fp32'"):
        graphopt.PassManager("canonicalize,mobile-fp32").run(traced, inputs)
    assert torch.equal(traced.get_submodule("1").running_mean, mean)


def test_a_training_flag_that_changes_nothing_is_not_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)).train()
    result = graphopt.optimize(model, (torch.randn(2, 3, 8, 8),), "mobile-fp32")
    assert not result.report.failed and result.report.notes == []


def test_other_pipelines_get_one_note_about_training_mode(registry, x):
    registry("t-noop2")(lambda gm, ctx: 0)
    model, inputs = _bn_dropout_net().train(), (torch.randn(2, 3, 8, 8),)
    report = graphopt.PassManager("t-noop2,t-noop2").run(model, inputs).report
    notes = [line for line in report.details() if "training mode" in line]
    assert len(notes) == 1 and "model.eval()" in notes[0] and notes == report.notes
    assert json.loads(json.dumps(report.to_dict()))["notes"] == notes
