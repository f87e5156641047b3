"""Progress on stderr: off when stderr is not a terminal or with progress=False, on when asked (rich redraws a few times a second, so a fast run shows its last state)."""
from __future__ import annotations

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
