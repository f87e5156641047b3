"""The HTML report of the demo pipeline, opened in headless Chromium: the page is drawn (the
screenshot is not blank and shows the diff colours), every node of every picture is there, and
each node's colour is what the pass's record says happened to it."""
from __future__ import annotations

import html
import re
import shutil
from collections import Counter

import pytest

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
    report = graphopt.optimize(model, inputs, "mobile-fp32", verify="each").report
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
