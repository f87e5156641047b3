"""The graphs of a pipeline run in Google's Model Explorer (``pip install ai-edge-model-explorer``,
the ``explorer`` extra), with graphopt's per-node data as overlays.

:func:`graphs` turns each state of the graph a report recorded (:attr:`Report.graphs`) into a
Model Explorer graph: one node per fx node (id: its name, label: its op, namespace: its module
path with ``/``, so thousands of nodes fold into the module tree), its inputs as incoming edges,
kind/shape/dtype/provenance/precision/fusion as attributes. :func:`node_data` gives the overlays,
one per graph: ``pass`` (1-based index of the pass that added or changed the node, 0 if none did),
``int8`` (1 in an int8 region, 0 in a float island), ``channels removed`` (layers whose channel
dim shrank), and with a numeric history (``verify="each"``) ``SQNR dB vs original`` (each value's
error against the original graph, as of the latest pass that measured it; equal values left
out). :func:`explore` opens them in Model Explorer's local server.
"""
from __future__ import annotations

import math
from typing import Any

from graphopt.errors import ReportError
from graphopt.ir.diff import GraphView, diff


#: the overlay of per-node error against the original graph (runs with a numeric history)
SQNR_OVERLAY = "SQNR dB vs original"


def _require() -> Any:
    try:
        from model_explorer import graph_builder, node_data_builder
    except ImportError as exc:
        raise ReportError("Model Explorer is not installed: pip install ai-edge-model-explorer "
                          "(or graphopt's extra: pip install 'graphopt[explorer]')") from exc
    return graph_builder, node_data_builder


def require() -> None:
    """Raise :class:`ReportError` saying what to install when Model Explorer is not installed."""
    _require()


def _states(report: Any) -> list[tuple[str, GraphView]]:
    """(graph id, view) of each state of the graph, in order: as captured, then after each pass
    that changed it."""
    if not getattr(report, "graphs_kept", True):
        raise ReportError("this run did not keep its graphs, so there is nothing to show in Model Explorer: run it "
                          "with keep_graphs=True (graphopt.optimize(..., keep_graphs=True)); `graphopt explore` does")
    states: list[tuple[str, GraphView]] = []
    for i, (before, after) in sorted(report.graphs.items()):
        if not states:
            states.append(("0 captured", before))
        if after is not states[-1][1]:
            states.append((f"{i + 1} after {report.records[i].name}", after))
    return states


def graphs(report: Any, label: str = "graphopt") -> Any:
    """A Model Explorer ``GraphCollection`` of the report's graph states."""
    gb, _ = _require()
    collection = gb.GraphCollection(label=label, graphSorting="name_asc")
    for graph_id, view in _states(report):
        graph = gb.Graph(id=graph_id)
        for node in view.nodes.values():
            attrs = [gb.KeyValue(key=k, value=str(v)) for k, v in (
                ("kind", node.kind), ("provenance", node.provenance), ("precision", node.precision),
                ("fusion", node.fusion)) if v is not None]
            metadata = [gb.KeyValue(key="shape", value="x".join(map(str, node.shape)) if node.shape is not None
                                    else "unknown"), gb.KeyValue(key="dtype", value=node.dtype or "unknown")]
            graph.nodes.append(gb.GraphNode(
                id=node.name, label=node.op, namespace=node.module_path().replace(".", "/"), attrs=attrs,
                incomingEdges=[gb.IncomingEdge(sourceNodeId=src, targetNodeInputId=str(k))
                               for k, src in enumerate(node.inputs)],
                outputsMetadata=[gb.MetadataItem(id="0", attrs=metadata)],
            ))
        collection.graphs.append(graph)
    return collection


def node_data(report: Any) -> dict[str, Any]:
    """Overlay name -> Model Explorer ``ModelNodeData`` (per graph id, values per node id)."""
    _, nd = _require()
    states = _states(report)
    touched: dict[str, int] = {}  # node name -> 1-based index of the last pass that added or changed it
    channels: dict[str, tuple[int, int]] = {}
    by_view = {id(view): graph_id for graph_id, view in states}
    per_graph: dict[str, tuple[dict[str, int], dict[str, tuple[int, int]]]] = {states[0][0]: ({}, {})} if states else {}
    sqnr: dict[str, dict[str, float]] = {}  # graph id -> node name -> SQNR dB of its value against the original
    for i, (before, after) in sorted(report.graphs.items()):
        d = diff(before, after)
        for name in [*d.added, *d.changed]:
            touched[name] = i + 1
        channels = {k: v for k, v in channels.items() if k in after.nodes}
        channels.update(d.channels)
        per_graph[by_view[id(after)]] = ({n: touched[n] for n in after.nodes if n in touched}, dict(channels))
        history = [j for j in report.numeric_history if j <= i]
        if history:  # the error of each value against the original graph, as of the latest pass that measured it
            errors = report.numeric_history[max(history)]
            sqnr[by_view[id(after)]] = {n: errors[v.provenance].sqnr_db for n, v in after.nodes.items()
                                        if v.provenance in errors and math.isfinite(errors[v.provenance].sqnr_db)}
    overlays: dict[str, Any] = {"pass": {}, "int8": {}, "channels removed": {}}
    if report.numeric_history:
        overlays[SQNR_OVERLAY] = {graph_id: nd.GraphNodeData(
            results={n: nd.NodeDataResult(value=v) for n, v in values.items()}) for graph_id, values in sqnr.items()}
    for graph_id, view in states:
        passes, shrunk = per_graph.get(graph_id, ({}, {}))
        overlays["pass"][graph_id] = nd.GraphNodeData(
            results={n: nd.NodeDataResult(value=passes.get(n, 0)) for n in view.nodes})
        overlays["int8"][graph_id] = nd.GraphNodeData(
            results={n: nd.NodeDataResult(value=1 if v.precision == "int8" else 0)
                     for n, v in view.nodes.items() if v.precision is not None})
        overlays["channels removed"][graph_id] = nd.GraphNodeData(
            results={n: nd.NodeDataResult(value=before - after) for n, (before, after) in shrunk.items()})
    return {name: nd.ModelNodeData(graphsData=data) for name, data in overlays.items()}


def explore(report: Any, *, port: int = 8080, open_browser: bool = True) -> None:
    """Open the report's graphs and overlays in Model Explorer (serves until interrupted)."""
    _require()
    import model_explorer

    config = model_explorer.config()
    # what config.add_model_from_pytorch does with its converted graphs
    config.model_sources.append({"url": f"graphs://graphopt/{len(config.graphs_list)}"})
    config.graphs_list.append({"graphCollections": [graphs(report)]})
    for name, data in node_data(report).items():
        config.add_node_data(name, data)
    model_explorer.visualize_from_config(config, port=port, no_open_in_browser=not open_browser)
