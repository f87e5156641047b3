"""The HTML report of a pipeline run: one self-contained page (inline SVG, CSS and script; it
opens offline, from the file).

It shows the pass table (the same cells as the text report, :meth:`Report.rows`), the detail
lines (declines with their reasons, rollbacks with the check that failed), and for every pass
that changed the graph or declined somewhere, the graph before and after it: nodes added,
removed and changed coloured (by fx node name, :mod:`graphopt.ir.diff`), fusion units boxed,
int8 regions and float islands marked, layers whose channels shrank outlined, decline reasons
on the nodes they name. Graphs are laid out by Graphviz ``dot`` (:mod:`graphopt.view.layout`);
each state of the graph is laid out once and shared by the two passes it sits between.

    result = graphopt.optimize(model, inputs, "mobile-fp32", keep_graphs=True)
    result.report.save_html("report.html")

Without ``keep_graphs=True`` the run keeps no graphs and the page holds the table and the
detail lines only. With ``verify="each"`` hovering a node also shows its value's error against
the original graph (``Report.numeric_history``), as of the pass the picture shows.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from graphopt.view import charts
from graphopt.view import layout as graph_layout
from graphopt.errors import ReportError
from graphopt.ir.diff import GraphView, diff

#: reports whose graphs hold at most this many nodes in all fill every picture when opened;
#: larger ones fill a pass's pictures when its section is opened
EAGER_NODES = 3000


def _asset(name: str) -> str:
    return resources.files("graphopt.view").joinpath(name).read_text(encoding="utf-8")


def _status_class(status: str) -> str:
    return "s-" + {"changed, no budget": "no-budget", "rolled back": "rolled-back"}.get(status, status)


def _table(report: Any) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in report.COLUMNS)
    rows = []
    for row in report.rows():
        cells = [f'<td class="name">{html.escape(row[0])}</td>', f'<td class="status">{html.escape(row[1])}</td>']
        cells += [f'<td class="num">{html.escape(c)}</td>' for c in row[2:]]
        rows.append(f'<tr class="{_status_class(row[1])}">{"".join(cells)}</tr>')
    return f'<table class="passes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _graph_template(index: int, pictures: graph_layout.Layout) -> str:
    """The pictures of one graph as gzip-compressed, base64 script text: the browser parses a
    picture only when a pass showing it is opened, and SVG compresses about tenfold."""
    parts = []
    if pictures.overview is not None:
        parts.append(f'<div class="overview"><h3>collapsed by module path: {len(pictures.groups)} groups '
                     f'(click one to open it)</h3>{pictures.overview}</div>')
    single = len(pictures.groups) == 1
    for label, svg in pictures.groups.items():
        count = len(pictures.members[label])
        parts.append(f'<details class="group" data-group="{html.escape(label)}"{" open" if single else ""}>'
                     f'<summary>{html.escape(label)} ({count} nodes)</summary>{svg}</details>')
    packed = base64.b64encode(gzip.compress("".join(parts).encode("utf-8"), compresslevel=6)).decode("ascii")
    return f'<script type="text/x-graph-gzip" id="graph-{index}">{packed}</script>'


def graph_markup(page: str, index: int) -> str:
    """The markup of graph ``index`` of a page :func:`build_html` made (for tests and tools)."""
    packed = page.split(f'<script type="text/x-graph-gzip" id="graph-{index}">', 1)[1].split("</script>", 1)[0]
    return gzip.decompress(base64.b64decode(packed)).decode("utf-8")


def _layouts(graphs: list[GraphView]) -> list[graph_layout.Layout]:
    """Each graph laid out, in dot processes running side by side (one per core)."""
    if len(graphs) <= 1:
        return [graph_layout.layout(g) for g in graphs]
    with ThreadPoolExecutor(max_workers=min(len(graphs), os.cpu_count() or 1)) as pool:
        return list(pool.map(graph_layout.layout, graphs))


def _error_text(record: Any) -> str:
    if record.max_abs_error is None:
        return "not measured (verify='each' measures it)"
    sqnr = "-" if record.min_sqnr_db is None else f"{record.min_sqnr_db:.1f} dB"
    return f"max abs {record.max_abs_error:.2e}, SQNR {sqnr}"


def build_html(report: Any) -> str:
    """The page of ``report`` as a string."""
    graph_ids: dict[int, int] = {}  # id(GraphView) -> template index
    graphs: list[GraphView] = []

    def graph_index(view: GraphView) -> int:
        if id(view) not in graph_ids:
            graph_ids[id(view)] = len(graphs)
            graphs.append(view)
        return graph_ids[id(view)]

    views, sections = [], []
    recorded = sorted(report.numeric_history)
    history_used: set[int] = set()
    # a large report opens with its passes closed: each fills its pictures when opened
    eager = sum(len(g) for pair in report.graphs.values() for g in {id(v): v for v in pair}.values()) <= EAGER_NODES
    for i, (before, after) in sorted(report.graphs.items()):
        record = report.records[i]
        d = diff(before, after)
        declines: dict[str, list[str]] = {}
        for node, reason in record.declines:
            declines.setdefault(node, []).append(reason)
        b, a = graph_index(before), graph_index(after)
        # the error of each value against the original graph: the latest entry at or before a side
        history_before = max((j for j in recorded if j < i), default=None)
        history_after = i if i in report.numeric_history else history_before
        history_used.update(j for j in (history_before, history_after) if j is not None)
        views.append({
            "record": i, "pass": record.name, "before": b, "after": a,
            "before_status": {**{n: "removed" for n in d.removed}, **{n: "changed" for n in d.changed}},
            "after_status": {**{n: "added" for n in d.added}, **{n: "changed" for n in d.changed}},
            "changed": d.changed, "channels": {k: list(v) for k, v in d.channels.items()},
            "declines": declines, "error": _error_text(record),
            "history_before": history_before, "history_after": history_after,
        })
        counts = (f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed"
                  + (f", tensors held {record.tensors_before} -> {record.tensors_after}"
                     if record.tensors_before != record.tensors_after else "")
                  + (f", {len(d.channels)} layer(s) with fewer channels" if d.channels else "")
                  + (f", declined at {len(declines)} node(s)" if declines else ""))
        decline_lines = "".join(f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, rs in declines.items() for r in rs)
        sides = "".join(
            f'<div class="side {side}"><h3>{side}</h3><div class="pictures"></div></div>' for side in ("before", "after")
        ) if record.changed else '<div class="side after"><h3>unchanged (declines marked)</h3><div class="pictures"></div></div>'
        shown = " open" if eager and (d.added or d.removed or d.changed or declines) else ""
        sections.append(
            f'<details class="pass"{shown} data-view="{len(views) - 1}" data-record="{i}" data-pass="{html.escape(record.name)}">'
            f'<summary><b>#{i + 1} {html.escape(record.name)}</b>: {html.escape(record.status)}; {counts}; '
            f'outputs {html.escape(_error_text(record))}</summary>'
            + (f'<ul class="declines">{decline_lines}</ul>' if decline_lines else "")
            + f'<div class="sides">{sides}</div></details>'
        )
    rollbacks = [r for r in report.records if r.status in ("rolled-back", "failed")]
    rollback_html = "" if not rollbacks else "<h2>Rolled back</h2>" + "".join(
        f'<div class="rollback"><b>{html.escape(r.name)}</b> ({html.escape(r.status)}): {html.escape(r.error or "")}</div>'
        for r in rollbacks)
    data = {
        "views": views,
        # what a node's hover shows (its inputs are the picture's edges)
        "graphs": [{name: {k: v for k, v in node.to_dict().items() if k not in ("name", "inputs") and v is not None}
                    for name, node in g.nodes.items()} for g in graphs],
        # per-node error against the original graph (keyed by provenance) after the passes that recorded it
        "history": {str(j): {"label": f"after pass #{j + 1} {report.records[j].name}",
                             "nodes": {k: str(e) for k, e in report.numeric_history[j].items()}}
                    for j in sorted(history_used)},
        "total_nodes": sum(len(g) for g in graphs),
        "eager_nodes": EAGER_NODES,
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    caption = ("rewrites: edits the pass made; nodes: graph nodes but inputs and output (constants included); "
               "tensors: parameters and buffers held; param bytes: those the graph reads")
    page = Template(_asset("template.html")).substitute(
        title=html.escape(report.pipeline), table=_table(report), caption=caption, seconds=f"{report.seconds:.2f}",
        details="".join(f"<li>{html.escape(line)}</li>" for line in report.details()),
        rollbacks=rollback_html + charts.sensitivity_sections(report.records),
        views="".join(sections) or ("<p>No pass changed the graph.</p>" if report.graphs_kept else
                                    "<p>This run did not keep its graphs: run it with keep_graphs=True "
                                    "(graphopt.optimize(..., keep_graphs=True)) to see each pass's graph here.</p>"),
        templates="".join(_graph_template(k, p) for k, p in enumerate(_layouts(graphs))),
        data=payload, script=_asset("report.js"),
    )
    return page


def write_html(report: Any, path: Any) -> Path:
    """Write the page of ``report`` to ``path`` (atomically; missing folders are made)."""
    from graphopt.fileio import atomic_write

    path = Path(path)
    graph_layout.require_dot()  # before any work: say what to install
    page = build_html(report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as staged, open(staged, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise ReportError(f"cannot write the HTML report to {path}: {exc.strerror or exc}") from exc
    return path
