"""Graph pictures: :class:`~graphopt.ir.diff.GraphView` laid out by Graphviz ``dot`` as SVG.

A graph of a few hundred nodes is one picture. A larger one is collapsed by module path: its
nodes are grouped by the module they came from (split deeper, then in runs of consecutive
nodes, until each group is small), one overview picture shows the groups and the edges between
them, and each group is a picture of its own. dot's layout time grows much faster than the
node count, so many small layouts in one dot process stay quick where one large layout does not.

Each node is an SVG ``<g class="node ...">`` whose ``<title>`` is the fx node name; classes name
its kind and precision (``k_call_function``, ``int8``, ``float``). Fusion groups are dot
clusters (``<g class="cluster">`` titled ``fused:LAYER``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from graphopt.errors import ReportError
from graphopt.ir.diff import GraphView, NodeView

#: graphs up to this size are one picture; larger ones are collapsed by module path
SINGLE_PICTURE_NODES = 400
#: the largest group of a collapsed graph
GROUP_NODES = 120
#: seconds dot may take for all the pictures of one graph
DOT_TIMEOUT = 300


def dot_path() -> str | None:
    return shutil.which("dot")


def require_dot() -> str:
    path = dot_path()
    if path is None:
        raise ReportError("the HTML report lays graphs out with Graphviz, but its `dot` program is not on PATH; "
                          "install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)")
    return path


@dataclass
class Layout:
    """The pictures of one graph: ``groups`` maps a group's label to its SVG, in graph order;
    ``overview`` is the SVG of the groups (None when the graph is one picture);
    ``members`` maps each group's label to its node names."""

    groups: dict[str, str]
    members: dict[str, list[str]]
    overview: str | None


def group_nodes(view: GraphView, limit: int = GROUP_NODES) -> dict[str, list[str]]:
    """Node names by group label, in graph order: by module path, deeper where a group is over
    ``limit``, then runs of consecutive nodes of at most ``limit``."""
    names = list(view.nodes)
    # a constant sits with the first node that reads it (its own name says nothing of a module)
    reader: dict[str, str] = {}
    for name, node in view.nodes.items():
        for source in node.inputs:
            reader.setdefault(source, name)

    def path_of(name: str) -> str:
        node = view.nodes[name]
        if node.kind == "get_attr" and name in reader:
            node = view.nodes[reader[name]]
        return node.module_path()

    def split(members: list[str], depth: int, label: str) -> dict[str, list[str]]:
        if len(members) <= limit:
            return {label: members}
        by_path: dict[str, list[str]] = {}
        for name in members:
            parts = path_of(name).split(".") if path_of(name) else []
            by_path.setdefault(".".join(parts[:depth]), []).append(name)
        if len(by_path) == 1:  # one module holds them all at this depth: deeper, or in runs
            only = next(iter(by_path))
            if only.count(".") + 1 >= depth and only and depth <= 32:
                return split(members, depth + 1, label)
            out = {}
            for i in range(0, len(members), limit):
                out[f"{label or '(top)'} [{i // limit + 1}]"] = members[i:i + limit]
            return out
        out: dict[str, list[str]] = {}
        for path, group in by_path.items():
            out.update(split(group, depth + 1, path or "(top)"))
        return out

    return _merge_small(split(names, 1, "(whole graph)"), limit)


def _merge_small(groups: dict[str, list[str]], limit: int) -> dict[str, list[str]]:
    """Consecutive groups joined while they fit in ``limit`` (a chain of 600 tiny blocks becomes
    a few dozen groups, not 600): labelled ``first .. last``."""
    out: dict[str, list[str]] = {}
    run: list[tuple[str, list[str]]] = []

    def flush():
        if run:
            label = run[0][0] if len(run) == 1 else f"{run[0][0]} .. {run[-1][0]}"
            out[label] = [n for _, members in run for n in members]
            run.clear()

    for label, members in groups.items():
        if run and sum(len(m) for _, m in run) + len(members) > limit:
            flush()
        run.append((label, members))
    flush()
    return out


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(node: NodeView) -> str:
    shape = "" if node.shape is None else "x".join(str(d) for d in node.shape) or "scalar"
    detail = " ".join(p for p in (node.op, shape) if p)
    return f"{node.name}\n{detail}" if detail != node.name else node.name


def _node_line(node: NodeView) -> str:
    classes = ["k_" + node.kind] + ([node.precision] if node.precision else [])
    shape = {"placeholder": "invhouse", "output": "house", "get_attr": "note"}.get(node.kind, "box")
    return f"{_quote(node.name)} [label={_quote(_label(node))} class={_quote(' '.join(classes))} shape={shape}];"


def _graph_source(name: str, view: GraphView, members: list[str]) -> str:
    inside = set(members)
    lines = [f"digraph {_quote(name)} {{",
             'graph [rankdir=TB nodesep=0.2 ranksep=0.3 fontname="Helvetica"];',
             'node [fontname="Helvetica" fontsize=9 height=0.3 style=filled fillcolor=white];',
             'edge [arrowsize=0.5];']
    fused: dict[str, list[str]] = {}
    for name in members:
        node = view.nodes[name]
        if node.fusion and node.fusion in inside:
            fused.setdefault(node.fusion, []).append(name)
    clustered = {n for group in fused.values() for n in group if len(group) > 1}
    for layer, group in fused.items():
        if len(group) > 1:
            lines.append(f"subgraph {_quote('cluster_fused_' + layer)} {{ label={_quote('fused: ' + layer)} "
                         f"style=dashed color=\"#6a1b9a\" fontsize=8 class=\"fusion\"; "
                         + " ".join(_node_line(view.nodes[n]) for n in group) + " }")
    for name in members:
        if name not in clustered:
            lines.append(_node_line(view.nodes[name]))
    for name in members:
        for source in view.nodes[name].inputs:
            if source in inside:
                lines.append(f"{_quote(source)} -> {_quote(name)};")
    lines.append("}")
    return "\n".join(lines)


def _overview_source(view: GraphView, groups: dict[str, list[str]]) -> str:
    where = {n: label for label, members in groups.items() for n in members}
    lines = ["digraph overview {", 'graph [rankdir=TB nodesep=0.2 ranksep=0.3];',
             'node [fontname="Helvetica" fontsize=9 shape=box3d style=filled fillcolor=white];']
    for label, members in groups.items():
        text = _quote(f"{label}\n{len(members)} nodes")
        lines.append(f"{_quote('group:' + label)} [label={text} class=\"group\"];")
    edges = set()
    for label, members in groups.items():
        for name in members:
            for source in view.nodes[name].inputs:
                if source in where and where[source] != label:
                    edges.add((where[source], label))
    lines += [f"{_quote('group:' + a)} -> {_quote('group:' + b)};" for a, b in sorted(edges)]
    lines.append("}")
    return "\n".join(lines)


_SVG = re.compile(r"<svg\b.*?</svg>", re.S)
_IDS = re.compile(r'\s(?:id|xlink:title)="[^"]*"')
_COMMENTS = re.compile(r"<!--.*?-->\n?", re.S)
#: the font every label has, set once by the page's style (a large report is a fifth smaller)
_FONT = re.compile(r'<text text-anchor="middle"( x="[^"]*" y="[^"]*") font-family="Helvetica,sans-Serif" font-size="9.00"')



def _run_dot(sources: list[str]) -> list[str]:
    dot = require_dot()
    try:
        done = subprocess.run([dot, "-Tsvg"], input="\n".join(sources), capture_output=True, text=True, check=False,
                              timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ReportError(f"Graphviz dot took over {DOT_TIMEOUT} s to lay out {len(sources)} picture(s); "
                          "please report the model (its graph's module paths may not collapse well)") from exc
    except OSError as exc:
        raise ReportError(f"running Graphviz {dot} failed: {exc}") from exc
    svgs = _SVG.findall(done.stdout)
    if done.returncode != 0 or len(svgs) != len(sources):
        raise ReportError(f"Graphviz dot failed (exit {done.returncode}): {done.stderr.strip()[:400]}; "
                          "the report cannot lay this graph out")
    # dot numbers its elements per graph (id="node1"): the same picture may appear twice in a page
    return [_FONT.sub(r'<text class="l"\1', _COMMENTS.sub("", _IDS.sub("", svg))) for svg in svgs]


def layout(view: GraphView) -> Layout:
    """Lay ``view`` out: one picture, or collapsed by module path when it is large."""
    if len(view) <= SINGLE_PICTURE_NODES:
        groups = {"(whole graph)": list(view.nodes)}
    else:
        groups = group_nodes(view)
    sources = [_graph_source(label, view, members) for label, members in groups.items()]
    if len(groups) > 1:
        sources.append(_overview_source(view, groups))
    svgs = _run_dot(sources)
    pictures = dict(zip(groups, svgs))
    return Layout(pictures, groups, svgs[-1] if len(groups) > 1 else None)
