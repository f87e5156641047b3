"""Progress on stderr, of optimize and of lower: off when stderr is not a terminal or with
progress=False, on when asked (rich redraws a few times a second, so a fast run shows its last
state; lowering draws each stage as it starts)."""
from __future__ import annotations

import pytest

import graphopt
from graphopt.app import examples


def test_no_progress_when_stderr_is_not_a_terminal(capfd):
    model, inputs = examples.get_example("mlp")
    graphopt.optimize(model, inputs, "mobile-fp32")  # under pytest stderr is a file
    assert capfd.readouterr().err == ""


def test_progress_false_is_silent_and_true_shows_every_pass(capfd):
    model, inputs = examples.get_example("mlp")
    graphopt.optimize(model, inputs, "mobile-fp32", progress=False)
    assert capfd.readouterr().err == ""
    result = graphopt.optimize(model, inputs, "mobile-fp32", progress=True)
    err = capfd.readouterr().err
    steps = len(result.report.records) + 1  # capture, then each pass
    assert f"{steps}/{steps}" in err and "optimizing" in err
    assert f"optimizing: {result.report.records[-1].name}" in err  # the bar's last state names the last pass


def _onnx_ready():
    from graphopt.lowering import get_backend

    missing = get_backend("onnx").unavailable()
    if missing is not None:
        pytest.skip(f"the onnx backend cannot run here: {missing}")


def test_lowering_is_silent_when_stderr_is_not_a_terminal_or_with_progress_false(capfd, tmp_path):
    _onnx_ready()
    model, inputs = examples.get_example("mlp")
    graphopt.lower(model, inputs, "onnx", tmp_path / "a.onnx")  # under pytest stderr is a file
    graphopt.lower(model, inputs, "onnx", tmp_path / "b.onnx", progress=False)
    assert capfd.readouterr().err == ""


def test_lowering_progress_true_shows_each_stage(capfd, tmp_path):
    _onnx_ready()
    model, inputs = examples.get_example("mlp")
    graphopt.lower(model, inputs, "onnx", tmp_path / "m.onnx", progress=True)  # a module: captured first
    err = capfd.readouterr().err
    stages = ["capture", "export", "load", "verify"]
    at = [err.find(f"lowering to onnx: {stage}") for stage in stages]
    assert all(i >= 0 for i in at) and at == sorted(at), err  # each stage drawn, in order
    assert "4/4" in err
    gm = graphopt.optimize(model, inputs, "mobile-fp32", progress=False).module
    graphopt.lower(gm, inputs, "onnx", tmp_path / "g.onnx", verify=False, progress=True)  # a graph: no capture
    err = capfd.readouterr().err
    assert "lowering to onnx: load" in err and "capture" not in err and "verify" not in err and "2/2" in err
