"""The report of a pipeline run: the table's figures, the graph diffs per pass, the HTML page
(checked here without a browser; tests/test_report_browser.py opens it in Chromium)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.app import examples
from graphopt.ir import diff as graph_diff
from graphopt.errors import ReportError

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz dot is not installed (apt-get install graphviz); the HTML report needs it")


@pytest.fixture(scope="module")
def fp32_run():
    model, inputs = examples.get_example("resnet_cnn")
    return graphopt.optimize(model, inputs, "mobile-fp32", keep_graphs=True)


def _record(report, name, nth=0):
    return [(i, r) for i, r in enumerate(report.records) if r.name == name][nth]


class TestTable:
    def test_fusion_does_not_count_the_tensors_it_leaves_for_dead_code_elimination(self, fp32_run):
        _, fuse = _record(fp32_run.report, "fuse-conv-bn-relu")
        _, dce = _record(fp32_run.report, "eliminate-dead-code", 1)
        assert fuse.param_bytes_after <= fuse.param_bytes_before  # folding never adds bytes the graph reads
        assert fuse.nodes_after < fuse.nodes_before
        # what dead code elimination removed shows as held tensors, not as a node count that stays
        assert dce.changed and dce.tensors_after < dce.tensors_before
        assert dce.param_bytes_after == fuse.param_bytes_after

    @needs_dot
    def test_html_table_has_the_text_tables_cells(self, fp32_run):
        import html

        from graphopt.view.html import build_html

        page = build_html(fp32_run.report)
        body = page.split('<table class="passes">', 1)[1].split("</table>", 1)[0]
        shown = [[html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", row)]
                 for row in re.findall(r"<tr class=[^>]*>(.*?)</tr>", body)]
        assert shown == fp32_run.report.rows()
        assert [html.unescape(c) for c in re.findall(r"<th>([^<]*)</th>", body)] == list(graphopt.Report.COLUMNS)

    def test_to_dict_names_its_records_as_the_report_does(self, fp32_run):
        data = json.loads(json.dumps(fp32_run.report.to_dict()))
        assert "passes" not in data
        assert [r["name"] for r in data["records"]] == [r.name for r in fp32_run.report.records]

    def test_a_rolled_back_pass_states_the_tables_error_in_its_detail_line(self, registry):
        @registry("t-scale", contract=graphopt.Exact())
        def scale(gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                scaled = gm.graph.call_function(torch.mul, (out.args[0], 1.001))
            out.args = (scaled,)
            return 1

        report = graphopt.optimize(nn.Linear(8, 8).eval(), (torch.randn(2, 8),), "t-scale").report
        record = report.records[0]
        assert record.status == "rolled-back" and record.max_abs_error is not None
        table_cell = report.rows()[0][Report_column("max abs err")]
        assert any(line.startswith("t-scale:") and f"max abs error {table_cell} over all inputs" in line
                   for line in report.details())

    def test_a_lossy_run_below_its_budget_is_not_reported_ok(self, registry):
        @registry("t-zero", contract=graphopt.Lossy(min_sqnr_db=20.0))
        def zero(gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                zeroed = gm.graph.call_function(torch.mul, (out.args[0], 0.0))
            out.args = (zeroed,)
            return 1

        report = graphopt.optimize(nn.Linear(8, 8).eval(), (torch.randn(2, 8),), "t-zero", verify="final").report
        assert report.records[0].changed
        assert report.final_check == "over budget"
        last = report.details()[-1]
        assert last.startswith("final check against the captured model: OVER BUDGET") and "20 dB" in last
        assert report.to_dict()["final_check"] == "over budget"


def Report_column(name: str) -> int:
    return graphopt.Report.COLUMNS.index(name)


class TestGraphDiff:
    def test_fusion_removes_batch_norms_adds_folded_weights_and_boxes_units(self, fp32_run):
        i, _ = _record(fp32_run.report, "fuse-conv-bn-relu")
        before, after = fp32_run.report.graphs[i]
        d = graph_diff.diff(before, after)
        assert d.removed and all(before.nodes[n].op in ("batch_norm", "constant") for n in d.removed)
        assert any(before.nodes[n].op == "batch_norm" for n in d.removed)
        assert d.added and all(after.nodes[n].kind == "get_attr" for n in d.added)
        fused = {n.fusion for n in after.nodes.values() if n.fusion}
        assert fused and all(after.nodes[layer].op == "conv2d" for layer in fused)
        # the views are the graph's: every node of the result, by name
        assert list(fp32_run.report.graphs[max(fp32_run.report.graphs)][1].nodes) == \
            [n.name for n in fp32_run.module.graph.nodes]

    def test_consecutive_passes_share_the_view_between_them(self, fp32_run):
        keys = sorted(fp32_run.report.graphs)
        for a, b in zip(keys, keys[1:]):
            assert fp32_run.report.graphs[a][1] is fp32_run.report.graphs[b][0]

    def test_int8_regions_and_float_islands_are_marked(self):
        model, inputs = examples.get_example("resnet_cnn")
        with pytest.warns(UserWarning, match="no calibration data"):
            report = graphopt.optimize(model, inputs, "mobile-int8", keep_graphs=True).report
        i, _ = _record(report, "quantize")
        before, after = report.graphs[i]
        assert not any(n.precision for n in before.nodes.values())
        marks = {n.precision for n in after.nodes.values()}
        assert {"int8", "float"} <= marks
        convs = [n for n in after.nodes.values() if n.op == "conv2d"]
        assert sum(n.precision == "int8" for n in convs) >= len(convs) - 1 >= 1
        for conv in convs:  # a float conv (kept float by the config) reads a value that is not dequantized
            read = [after.nodes[i] for i in conv.inputs if after.nodes[i].kind != "get_attr"]
            dequantized = all(r.op.startswith("dequantize") or "dequantize" in r.name for r in read)
            assert (conv.precision == "int8") == dequantized

    def test_pruned_layers_record_channels_kept(self):
        model, inputs = examples.get_example("resnet_cnn")
        report = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5}", keep_graphs=True).report
        before, after = report.graphs[0]
        d = graph_diff.diff(before, after)
        convs = {n: c for n, c in d.channels.items() if after.nodes[n].op == "conv2d"}
        assert convs and all(kept == total // 2 for total, kept in convs.values())


@needs_dot
class TestHtml:
    def test_page_is_self_contained_and_holds_every_changed_pass(self, fp32_run, tmp_path):
        from graphopt.view.html import graph_markup

        path = fp32_run.report.save_html(tmp_path / "sub" / "report.html")
        page = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from anywhere
        data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
        shown = [v["pass"] for v in data["views"]]
        assert shown == [r.name for r in fp32_run.report.records if r.changed or r.declines]
        for k, graph in enumerate(data["graphs"]):
            template = graph_markup(page, k)
            titles = re.findall(r'<g class="node[^"]*">\s*<title>([^<]*)</title>', template)
            assert sorted(t.replace("&#45;", "-") for t in titles) == sorted(graph)

    def test_each_side_of_a_pass_carries_the_latest_numeric_history_at_or_before_it(self, fp32_run):
        from graphopt.view.html import build_html

        report = fp32_run.report
        assert report.numeric_history  # fusion and channels-last change values (by rounding)
        page = build_html(report)
        data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
        recorded = sorted(report.numeric_history)
        for view in data["views"]:
            i = view["record"]
            earlier = [j for j in recorded if j < i]
            assert view["history_before"] == (earlier[-1] if earlier else None)
            assert view["history_after"] == (i if i in recorded else view["history_before"])
            for j in (view["history_before"], view["history_after"]):
                if j is not None:
                    shown = data["history"][str(j)]
                    assert shown["label"] == f"after pass #{j + 1} {report.records[j].name}"
                    assert shown["nodes"] == {k: str(e) for k, e in report.numeric_history[j].items()}

    def test_a_run_without_graphs_says_how_to_keep_them(self, tmp_path):
        from graphopt.view.html import build_html

        model, inputs = examples.get_example("resnet_cnn")
        report = graphopt.optimize(model, inputs, "mobile-fp32").report
        page = build_html(report)
        assert "did not keep its graphs" in page and "keep_graphs=True" in page
        assert '<table class="passes">' in page

    def test_declines_are_attached_to_their_nodes(self, tmp_path):
        model, inputs = examples.get_example("resnet_cnn")
        report = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5}", keep_graphs=True).report
        page = report.save_html(tmp_path / "r.html").read_text()
        data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
        declines = data["views"][0]["declines"]
        assert declines == {n: [r for m, r in report.records[0].declines if m == n] for n, _ in report.records[0].declines}
        assert set(declines) <= set(data["graphs"][data["views"][0]["after"]])

    def test_a_large_graph_is_collapsed_by_module_path(self):
        from graphopt.view import layout as graph_layout

        chain = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(300)])
        gm = graphopt.capture(chain.eval(), (torch.randn(1, 4),))
        view = graph_diff.view(gm)
        pictures = graph_layout.layout(view)
        assert pictures.overview is not None and len(pictures.groups) > 1
        assert sorted(n for m in pictures.members.values() for n in m) == sorted(view.nodes)
        assert all(len(m) <= graph_layout.GROUP_NODES for m in pictures.members.values())

    def test_missing_graphviz_is_a_report_error_saying_what_to_install(self, fp32_run, tmp_path, monkeypatch):
        monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
        with pytest.raises(ReportError, match="apt-get install graphviz"):
            fp32_run.report.save_html(tmp_path / "r.html")
        assert not (tmp_path / "r.html").exists()


class TestSensitivityChart:
    """quantize{per_layer_report=true} draws each layer's int8 sensitivity into the page, worst first."""

    @pytest.fixture(scope="class")
    def int8_run(self):
        model, inputs = examples.get_example("resnet_cnn")
        pipeline = ("canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,eliminate-dead-code,"
                    "quantize{per_layer_report=true}")
        return graphopt.optimize(model, inputs, pipeline)

    def test_the_chart_ranks_the_recorded_layers_worst_first(self, int8_run):
        from graphopt.view import charts

        i, record = _record(int8_run.report, "quantize")
        rows = record.figures["per_layer"]
        page = charts.sensitivity_sections(int8_run.report.records)
        assert f'data-record="{i}"' in page
        drawn = re.findall(r'<g class="layer" data-layer="([^"]*)"', page)
        expected = [r["layer"] for r in sorted((r for r in rows if r["sensitivity_sqnr_db"] is not None),
                                               key=lambda r: r["sensitivity_sqnr_db"])]
        assert drawn == expected[:charts.MAX_LAYERS] and len(drawn) >= 3
        # bar lengths follow the figures: the worst layer's "both" bar is the shortest of the "both" bars
        widths = [float(w) for w in re.findall(r'<rect class="sensitivity_sqnr_db" x="\d+" y="\d+" width="([\d.]+)"', page)]
        assert widths == sorted(widths) and widths[0] < widths[-1]

    @needs_dot
    def test_the_page_holds_the_chart_and_a_run_without_the_figures_does_not(self, int8_run, fp32_run, tmp_path):
        page = int8_run.report.save_html(tmp_path / "int8.html").read_text()
        assert "Int8 sensitivity per layer" in page and page.count('<g class="layer"') >= 3
        plain = fp32_run.report.save_html(tmp_path / "fp32.html").read_text()
        assert "Int8 sensitivity per layer" not in plain
