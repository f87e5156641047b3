"""The Model Explorer adapter's output, checked without a browser: the graph JSON validates
against Model Explorer's own schema classes and matches the FX graphs; the overlays name nodes
of their graph and say what the report says."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

import graphopt
from graphopt.app import examples
from graphopt.ir import diff as graph_diff

pytest.importorskip("model_explorer", reason="Model Explorer is an optional extra (pip install ai-edge-model-explorer)")

from graphopt.view import explorer as me  # noqa: E402


@pytest.fixture(scope="module")
def fp32():
    model, inputs = examples.get_example("resnet_cnn")
    return graphopt.optimize(model, inputs, "mobile-fp32")


def test_each_graph_state_matches_its_fx_graph(fp32):
    collection = me.graphs(fp32.report)
    data = json.loads(json.dumps(asdict(collection)))  # what Model Explorer's server sends
    changed = [r for r in fp32.report.records if r.changed]
    assert [g["id"] for g in data["graphs"]][0] == "0 captured" and len(data["graphs"]) == len(changed) + 1
    last = data["graphs"][-1]
    fx_nodes = list(fp32.module.graph.nodes)
    assert [n["id"] for n in last["nodes"]] == [n.name for n in fx_nodes]
    for node, fx_node in zip(last["nodes"], fx_nodes):
        assert [e["sourceNodeId"] for e in node["incomingEdges"]] == [a.name for a in fx_node.all_input_nodes]
        assert node["namespace"] == graph_diff.view(fp32.module).nodes[fx_node.name].module_path().replace(".", "/")
    for graph in data["graphs"]:
        ids = [n["id"] for n in graph["nodes"]]
        assert len(ids) == len(set(ids))
        assert all(e["sourceNodeId"] in ids for n in graph["nodes"] for e in n["incomingEdges"])


def test_the_pass_overlay_names_the_pass_that_added_or_changed_each_node(fp32):
    overlays = me.node_data(fp32.report)
    assert set(overlays) == {"pass", "int8", "channels removed"}
    json.loads(overlays["pass"].to_json_string())  # Model Explorer's own serializer accepts it
    fuse = next(i for i, r in enumerate(fp32.report.records) if r.name == "fuse-conv-bn-relu")
    before, after = fp32.report.graphs[fuse]
    d = graph_diff.diff(before, after)
    results = overlays["pass"].graphsData[f"{fuse + 1} after fuse-conv-bn-relu"].results
    assert set(results) == set(after.nodes)
    assert {n for n, r in results.items() if r.value == fuse + 1} == set(d.added) | set(d.changed)


def test_int8_and_pruned_channel_overlays():
    model, inputs = examples.get_example("resnet_cnn")
    pruned = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5}").report
    removed = me.node_data(pruned)["channels removed"].graphsData["1 after prune-channels"].results
    d = graph_diff.diff(*pruned.graphs[0])
    assert {n: r.value for n, r in removed.items()} == {n: b - a for n, (b, a) in d.channels.items()}
    with pytest.warns(UserWarning, match="no calibration data"):
        quantized = graphopt.optimize(model, inputs, "mobile-int8").report
    overlays = me.node_data(quantized)["int8"].graphsData
    last = me.graphs(quantized).graphs[-1]
    marks = overlays[last.id].results
    assert marks and all(any(n.id == name for n in last.nodes) for name in marks)
    assert {r.value for r in marks.values()} == {0, 1}
