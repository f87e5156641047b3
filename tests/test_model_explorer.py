"""The Model Explorer adapter's output, checked without a browser: the graph JSON validates
against Model Explorer's own schema classes and matches the FX graphs; the overlays name nodes
of their graph and say what the report says. ``graphopt explore`` and ``Result.explore()`` hand
the run's graphs to Model Explorer's server (checked with the serving function replaced, and once
with the real server on a free localhost port)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
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
    return graphopt.optimize(model, inputs, "mobile-fp32", keep_graphs=True)


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
    assert set(overlays) == {"pass", "int8", "channels removed", me.SQNR_OVERLAY}
    json.loads(overlays["pass"].to_json_string())  # Model Explorer's own serializer accepts it
    fuse = next(i for i, r in enumerate(fp32.report.records) if r.name == "fuse-conv-bn-relu")
    before, after = fp32.report.graphs[fuse]
    d = graph_diff.diff(before, after)
    results = overlays["pass"].graphsData[f"{fuse + 1} after fuse-conv-bn-relu"].results
    assert set(results) == set(after.nodes)
    assert {n for n, r in results.items() if r.value == fuse + 1} == set(d.added) | set(d.changed)


def test_the_sqnr_overlay_gives_each_node_the_error_of_its_value_against_the_original(fp32):
    report = fp32.report
    overlay = me.node_data(report)[me.SQNR_OVERLAY]
    json.loads(overlay.to_json_string())
    assert report.numeric_history and overlay.graphsData
    for i, (_, after) in sorted(report.graphs.items()):
        graph_id = f"{i + 1} after {report.records[i].name}"
        measured = [j for j in report.numeric_history if j <= i]
        if not measured:
            assert graph_id not in overlay.graphsData
            continue
        errors = report.numeric_history[max(measured)]
        expected = {n: errors[v.provenance].sqnr_db for n, v in after.nodes.items()
                    if v.provenance in errors and errors[v.provenance].sqnr_db != float("inf")}
        assert expected and {n: r.value for n, r in overlay.graphsData[graph_id].results.items()} == expected
    without = graphopt.optimize(*examples.get_example("mlp"), "mobile-fp32", verify="final", keep_graphs=True).report
    assert me.SQNR_OVERLAY not in me.node_data(without)


def test_int8_and_pruned_channel_overlays():
    model, inputs = examples.get_example("resnet_cnn")
    pruned = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5}", keep_graphs=True).report
    removed = me.node_data(pruned)["channels removed"].graphsData["1 after prune-channels"].results
    d = graph_diff.diff(*pruned.graphs[0])
    assert {n: r.value for n, r in removed.items()} == {n: b - a for n, (b, a) in d.channels.items()}
    with pytest.warns(UserWarning, match="no calibration data"):
        quantized = graphopt.optimize(model, inputs, "mobile-int8", keep_graphs=True).report
    overlays = me.node_data(quantized)["int8"].graphsData
    last = me.graphs(quantized).graphs[-1]
    marks = overlays[last.id].results
    assert marks and all(any(n.id == name for n in last.nodes) for name in marks)
    assert {r.value for r in marks.values()} == {0, 1}


# ------------------------------------------------------------------ graphopt explore, Result.explore


@pytest.fixture
def served(monkeypatch):
    """Model Explorer's serving function replaced: what it was asked to serve, without a server."""
    import model_explorer

    calls = []
    monkeypatch.setattr(model_explorer, "visualize_from_config",
                        lambda config, **kwargs: calls.append((config, kwargs)))
    return calls


def _served_graphs(config) -> list[tuple[str, list[str]]]:
    [entry] = config.graphs_list
    [collection] = entry["graphCollections"]
    return [(g.id, [n.id for n in g.nodes]) for g in collection.graphs]


def _report_graphs(report) -> list[tuple[str, list[str]]]:
    return [(graph_id, list(view.nodes)) for graph_id, view in me._states(report)]


def test_explore_command_serves_the_graphs_and_overlays_of_its_run(served, fp32, capsys):
    from graphopt.app.cli import main

    assert main(["explore", "resnet_cnn", "--port", "8765", "--no-browser"]) == 0  # the fixture's model and pipeline
    out = capsys.readouterr().out
    assert "fuse-conv-bn-relu" in out and "http://localhost:8765/" in out  # the pass table, then where to look
    [(config, kwargs)] = served
    assert kwargs == {"port": 8765, "no_open_in_browser": True}
    assert _served_graphs(config) == _report_graphs(fp32.report)  # one graph per state, every fx node
    assert [s.split("/")[2] for s in config.node_data_sources] == ["pass", "int8", "channels removed",
                                                                      me.SQNR_OVERLAY]
    served_pass = json.loads(config.node_data_list[0].to_json_string())
    assert served_pass == json.loads(me.node_data(fp32.report)["pass"].to_json_string())


def test_result_explore_serves_its_report(served, fp32):
    fp32.explore(port=8123, open_browser=False)
    [(config, kwargs)] = served
    assert kwargs == {"port": 8123, "no_open_in_browser": True}
    assert _served_graphs(config) == _report_graphs(fp32.report)


def test_explore_command_checks_its_port_and_model_explorer_before_running(monkeypatch, capsys):
    from graphopt.app.cli import main

    assert main(["explore", "mlp", "--port", "0"]) == 2
    assert "--port 0: give a port number between 1 and 65535" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "model_explorer", None)  # as if the extra were not installed
    monkeypatch.setattr(graphopt, "optimize", lambda *a, **k: pytest.fail("ran the pipeline before the check"))
    assert main(["explore", "mlp"]) == 2
    assert "pip install ai-edge-model-explorer" in capsys.readouterr().err


_SERVE = """
import sys
import graphopt
from graphopt.app import examples
model, inputs = examples.get_example("mlp")
graphopt.optimize(model, inputs, "mobile-fp32", progress=False, keep_graphs=True).explore(port=int(sys.argv[1]), open_browser=False)
"""


def test_model_explorer_server_starts_and_serves_the_graphs(tmp_path):
    """The real server, once: started in a subprocess on a free port, its page and the graphs
    fetched over localhost, then stopped."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    model, inputs = examples.get_example("mlp")
    expected = _report_graphs(graphopt.optimize(model, inputs, "mobile-fp32", progress=False, keep_graphs=True).report)
    log = tmp_path / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        page = None
        for _ in range(1200):  # up to ~120 s on a busy machine; the server says when it is up
            if server.poll() is not None:
                pytest.fail(f"the server exited with {server.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/", timeout=5) as response:
                    page = response.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.1)
        assert page is not None and "<html" in page.lower(), log.read_text()[-2000:]
        with urllib.request.urlopen(f"http://localhost:{port}/api/v1/load_graphs_json?graph_index=0",
                                    timeout=30) as response:
            served = json.loads(response.read())
        [collection] = served["graphCollections"]
        assert [(g["id"], [n["id"] for n in g["nodes"]]) for g in collection["graphs"]] == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
