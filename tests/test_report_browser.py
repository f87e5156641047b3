"""The HTML reports of the demo pipeline, of mobile-int8 on MobileNetV2 and of prune-channels on
ResNet-18, opened in headless Chromium: the page is drawn (the screenshot is not blank and shows
the diff colours), every node of every picture is there, each node's colour is what the pass's
record says happened to it, fusion units are boxed, int8 regions and float islands are marked as
the quantize record counts them, pruned layers show the channels the prune record kept and
removed, declines sit on their nodes, and hovering a node shows its data."""
from __future__ import annotations

import html
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import torch

import graphopt
from graphopt.app import examples
from graphopt.ir import diff as graph_diff
from graphopt.view import browser as report_browser

pytestmark = [
    pytest.mark.skipif(report_browser.chromium_path() is None,
                       reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"),
    pytest.mark.skipif(shutil.which("dot") is None,
                       reason="Graphviz dot is not installed (Debian: apt-get install graphviz; .ci/run installs it)"),
]

#: the fills the page's style gives each diff status (graphopt/report_template.html)
FILLS = {"added": (0xa5, 0xd6, 0xa7), "removed": (0xef, 0x9a, 0x9a), "changed": (0xff, 0xe0, 0x82)}


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    model, inputs = examples.get_example("resnet_cnn")  # graphopt demo's model and pipeline
    report = graphopt.optimize(model, inputs, "mobile-fp32", verify="each", keep_graphs=True).report
    page = report.save_html(tmp_path_factory.mktemp("report") / "report.html")
    return report, page


def _pictures(dom: str) -> dict[tuple[int, str], list[tuple[str, set[str]]]]:
    """(record index, side) -> [(node name, classes)] of the pictures the page's script filled."""
    body = dom.split('<script type="text/x-graph-gzip"', 1)[0]
    out = {}
    for record, chunk in re.findall(r'data-record="(\d+)"(.*?)(?=<details class="pass"|$)', body, re.S):
        for side, pictures in re.findall(r'<div class="side (before|after)">(.*?)(?=<div class="side |$)', chunk, re.S):
            nodes = re.findall(r'<g class="(node[^"]*)"[^>]*>\s*<title>([^<]*)</title>', pictures)
            out[(int(record), side)] = [(html.unescape(name), set(cls.split())) for cls, name in nodes]
    return out


def test_every_node_is_drawn_with_the_colour_of_what_the_pass_did_to_it(demo_page):
    report, page = demo_page
    dom = report_browser.dump_dom(page)
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    pictures = _pictures(dom)
    assert set(pictures) == {(i, side) for i, _ in report.graphs.items()
                             for side in (("before", "after") if report.records[i].changed else ("after",))}
    for (i, side), nodes in pictures.items():
        before, after = report.graphs[i]
        view = before if side == "before" else after
        assert sorted(n for n, _ in nodes) == sorted(view.nodes)  # one node element per graph node
        d = graph_diff.diff(before, after)
        expected = {"removed": set(d.removed), "changed": set(d.changed)} if side == "before" else \
            {"added": set(d.added), "changed": set(d.changed)}
        for status in ("added", "removed", "changed"):
            assert {n for n, cls in nodes if status in cls} == expected.get(status, set()), (report.records[i].name, side)
    fuse = next(i for i, r in enumerate(report.records) if r.name == "fuse-conv-bn-relu")
    assert any("added" in cls for _, cls in pictures[(fuse, "after")])  # the demo's fusion shows a diff


def test_the_screenshot_shows_the_graphs_in_the_diff_colours(demo_page, tmp_path):
    _, page = demo_page
    png = report_browser.screenshot(page, tmp_path / "report.png", 1400, 1800)
    width, height, pixels = report_browser.png_pixels(png)
    assert (width, height) == (1400, 1800)
    counts = Counter(pixels)
    white = counts[(255, 255, 255)]
    assert white < 0.97 * len(pixels) and len(counts) > 50  # not blank: text, tables and pictures drawn
    below_legend = Counter(pixels[width * 150:])  # the toolbar's legend shows each colour too
    for status, fill in FILLS.items():
        assert below_legend[fill] > 2000, f"no {status} node fill {fill} in the screenshot"


def test_hovering_a_node_shows_its_error_against_the_original_graph(demo_page, tmp_path):
    report, page = demo_page
    pictures = _probe(page, tmp_path)
    views = {(v["record"], side): v["history_" + side] for v in _page_data(page)["views"] for side in ("before", "after")}
    shown = 0
    for (i, side), picture in pictures.items():
        recorded = views[(i, side)]
        for name, (_, tip) in picture["nodes"].items():
            node = (report.graphs[i][0] if side == "before" else report.graphs[i][1]).nodes[name]
            error = None if recorded is None else report.numeric_history[recorded].get(node.provenance)
            if error is None:
                assert "vs original:" not in tip, (i, side, name)
            else:
                shown += 1
                assert (f"vs original: {error} (value of {node.provenance}, "
                        f"after pass #{recorded + 1} {report.records[recorded].name})") in tip
    assert shown  # the demo's fusion changes values by rounding: its nodes show their error


def _page_data(page: Path) -> dict:
    return json.loads(re.search(r'id="data">(.*?)</script>', page.read_text(encoding="utf-8"), re.S).group(1))


# ------------------------------------------------------------------ mobile-int8 and prune-channels

#: appended to a copy of a report: once the page's script is done, hover every node of every
#: picture (the page's own mouseover handler) and write what each shows into the DOM
_PROBE = """<script>(function () {
  function probe() {
    if (document.body.dataset.ready !== "1") return setTimeout(probe, 20);
    const tip = document.getElementById("tip"), out = [];
    for (const s of document.querySelectorAll(".pass[data-view]")) {
      for (const side of ["before", "after"]) {
        const holder = s.querySelector(".side." + side + " .pictures");
        if (!holder) continue;
        const nodes = [];
        for (const g of holder.querySelectorAll("g.node")) {
          if (g.closest(".overview")) continue;  // the collapsed view's module groups
          g.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
          nodes.push({name: g.dataset.node, cls: g.getAttribute("class").split(" "), tip: tip.textContent});
        }
        const boxes = Array.from(holder.querySelectorAll("g.cluster"), (c) => ({
          title: c.querySelector(":scope > title").textContent, drawn: !!c.querySelector("polygon, path")}));
        const groups = holder.querySelectorAll(".overview g.node").length;
        out.push({record: +s.dataset.record, side: side, nodes: nodes, boxes: boxes, groups: groups});
      }
    }
    const el = document.createElement("script");
    el.type = "application/json"; el.id = "probe"; el.textContent = "PROBE[" + JSON.stringify(out) + "]PROBE";
    document.body.appendChild(el);
  }
  probe();
})();</script>"""


def _probe(page: Path, tmp: Path) -> dict[tuple[int, str], dict]:
    """(record index, side) -> {"nodes": {name: (classes, hover text)}, "boxes": [fusion boxes],
    "groups": module groups of the collapsed view} of every picture, all filled (``#all``) and
    hovered in Chromium."""
    copy = tmp / "probed.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = report_browser.dump_dom(copy, fragment="all")
    found = re.search(r'id="probe">PROBE\[(.*?)\]PROBE</script>', dom, re.S)
    assert 'data-ready="1"' in dom and found, "the page's script or the probe did not finish"
    pictures = json.loads(found.group(1))
    return {(p["record"], p["side"]): {"nodes": {n["name"]: (set(n["cls"]), n["tip"]) for n in p["nodes"]},
                                       "boxes": p["boxes"], "groups": p["groups"]} for p in pictures}


def _check_diff_colours(report, pictures) -> None:
    assert set(pictures) == {(i, side) for i, _ in report.graphs.items()
                             for side in (("before", "after") if report.records[i].changed else ("after",))}
    for (i, side), picture in pictures.items():
        before, after = report.graphs[i]
        nodes = picture["nodes"]
        assert sorted(nodes) == sorted((before if side == "before" else after).nodes)
        d = graph_diff.diff(before, after)
        expected = {"removed": set(d.removed), "changed": set(d.changed)} if side == "before" else \
            {"added": set(d.added), "changed": set(d.changed)}
        for status in ("added", "removed", "changed"):
            assert {n for n, (cls, _) in nodes.items() if status in cls} == expected.get(status, set()), \
                (report.records[i].name, side, status)
        for name, (_, tip) in nodes.items():  # the hover names the node, its op and provenance
            node = (before if side == "before" else after).nodes[name]
            assert tip.startswith(name + "\n") and f"op:         {node.op} " in tip and f"provenance: {node.provenance}" in tip


def _record(report, name: str) -> int:
    return next(i for i, r in enumerate(report.records) if r.name == name)


#: qdq ops: they carry the int8 values, they are no compute unit of the quantize record
_QDQ_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
            "choose_qparams", "dequantize", "quantize")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    model, inputs = examples.get_example("mobilenet_v2")
    gen = torch.Generator().manual_seed(1)
    calibration = [tuple(torch.randn(x.shape, generator=gen) for x in inputs) for _ in range(2)]
    report = graphopt.optimize(model, inputs, "mobile-int8", verify="final", calibration_data=calibration,
                               progress=False, keep_graphs=True).report
    tmp = tmp_path_factory.mktemp("int8")
    return report, _probe(report.save_html(tmp / "report.html"), tmp)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    model, inputs = examples.get_example("resnet18")
    report = graphopt.optimize(model, inputs, "canonicalize,eliminate-dead-code,prune-channels", verify="final",
                               progress=False, keep_graphs=True).report
    tmp = tmp_path_factory.mktemp("pruned")
    return report, _probe(report.save_html(tmp / "report.html"), tmp)


def test_int8_report_diff_colours_and_hover_match_the_records(int8_run):
    _check_diff_colours(*int8_run)


def test_int8_report_marks_the_units_quantize_counted_int8_and_the_rest_float(int8_run):
    report, pictures = int8_run
    i = _record(report, "quantize")
    units = report.records[i].figures["units_by_op"]
    nodes = pictures[(i, "after")]["nodes"]
    after = report.graphs[i][1]
    compute = {n: after.nodes[n] for n in nodes if after.nodes[n].kind in ("call_function", "call_method", "call_module")
               and not after.nodes[n].op.split(".")[0] in _QDQ_OPS}
    int8 = Counter(compute[n].op for n, (cls, _) in nodes.items() if n in compute and "int8" in cls)
    assert dict(int8) == units  # each unit quantize counted is drawn int8, no other compute node is
    floats = {n for n, (cls, _) in nodes.items() if n in compute and "float" in cls}
    assert floats and floats == {n for n in compute if "int8" not in nodes[n][0]}  # the rest: float islands
    for n in floats:
        assert "precision:  float" in nodes[n][1]
    for n, (cls, tip) in nodes.items():  # every qdq node is int8 too, and says so on hover
        if after.nodes[n].op.split(".")[0] in _QDQ_OPS:
            assert "int8" in cls and "precision:  int8" in tip
    before = pictures[(i, "before")]["nodes"]
    assert not any("int8" in cls or "float" in cls for cls, _ in before.values())  # no int8 before it


def test_int8_report_boxes_each_fusion_unit_of_the_fusion_pass(int8_run):
    report, pictures = int8_run
    i = _record(report, "fuse-conv-bn-relu")
    after = report.graphs[i][1]
    units = {}
    for n in pictures[(i, "after")]["nodes"]:
        if after.nodes[n].fusion:
            units.setdefault(after.nodes[n].fusion, set()).add(n)
    boxed = {b["title"].removeprefix("cluster_fused_") for b in pictures[(i, "after")]["boxes"] if b["drawn"]}
    assert boxed == {unit for unit, members in units.items() if len(members) > 1}
    assert len(boxed) == report.records[i].figures["fusion_units"]
    for unit, members in units.items():
        for n in members:
            assert f"fused into: {unit}" in pictures[(i, "after")]["nodes"][n][1]


def test_pruned_report_diff_colours_and_hover_match_the_records(pruned_run):
    _check_diff_colours(*pruned_run)


def test_pruned_layers_show_the_channels_the_pass_kept_and_removed(pruned_run):
    report, pictures = pruned_run
    i = _record(report, "prune-channels")
    groups = report.records[i].figures["groups"]
    assert groups
    after = report.graphs[i][1]
    nodes = pictures[(i, "after")]["nodes"]
    for group in groups:
        kept, was = group["channels"][1], group["channels"][0]
        for layer in group["layers"]:
            conv = [n for n in nodes if after.nodes[n].provenance == layer and after.nodes[n].kind == "call_function"]
            assert len(conv) == 1, (layer, conv)
            cls, tip = nodes[conv[0]]
            assert "pruned" in cls, layer
            assert f"channels:   {kept} kept of {was} ({was - kept} removed)" in tip, (layer, tip)
    pruned = {n for n, (cls, _) in nodes.items() if "pruned" in cls}
    assert pruned == set(graph_diff.diff(*report.graphs[i]).channels)  # and nothing else is outlined


def test_declines_sit_on_the_nodes_they_name_with_their_reasons(pruned_run):
    report, pictures = pruned_run
    i = _record(report, "prune-channels")
    declines = report.records[i].declines
    assert declines  # the classifier's channels stay whole: the output's shape must not change
    nodes = pictures[(i, "after")]["nodes"]
    for name, reason in declines:
        cls, tip = nodes[name]
        assert "declined" in cls and f"declined:   {reason}" in tip
    assert {n for n, (cls, _) in nodes.items() if "declined" in cls} == {n for n, _ in declines}
