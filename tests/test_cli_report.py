"""The command line's report flags: --report (HTML), --print-ir-after*, --calibration-data."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

import graphopt
from graphopt.app.cli import main
from graphopt.errors import CalibrationDataError

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz dot is not installed (apt-get install graphviz); --report needs it")

HEADER = re.compile(r"^// -----// IR Dump After (\S+) \((\S+)\) //----- //$", re.M)


def _dumps(err: str) -> list[tuple[str, str]]:
    return HEADER.findall(err)


@needs_dot
def test_report_writes_the_html_page_and_says_where(tmp_path, capsys):
    page = tmp_path / "out" / "report.html"
    assert main(["optimize", "resnet_cnn", "--report", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "fuse-conv-bn-relu" in text


def test_report_and_report_json_may_not_name_one_file(tmp_path, capsys):
    same = tmp_path / "r"
    assert main(["optimize", "mlp", "--report", str(same), "--report-json", str(same)]) == 2
    assert "--report-json and --report name the same file" in capsys.readouterr().err


def test_print_ir_after_a_pass_prints_after_each_of_its_runs(capsys):
    assert main(["optimize", "resnet_cnn", "--print-ir-after", "eliminate-dead-code"]) == 0
    err = capsys.readouterr().err
    assert [name for name, _ in _dumps(err)] == ["eliminate-dead-code", "eliminate-dead-code"]
    assert "def forward(self, x" in err


def test_print_ir_after_change_alone_prints_after_each_pass_that_changed(capsys):
    assert main(["optimize", "resnet_cnn", "--print-ir-after-change"]) == 0
    dumps = _dumps(capsys.readouterr().err)
    assert dumps and all(status == "changed" for _, status in dumps)
    assert "canonicalize" not in [name for name, _ in dumps]  # unchanged on this model
    assert "fuse-conv-bn-relu" in [name for name, _ in dumps]


def test_print_ir_after_change_with_a_pass_skips_its_unchanged_runs(capsys):
    assert main(["optimize", "resnet_cnn", "--print-ir-after", "fold-constants,fuse-conv-bn-relu",
                 "--print-ir-after-change"]) == 0
    assert _dumps(capsys.readouterr().err) == [("fuse-conv-bn-relu", "changed")]


def test_print_ir_after_failure_prints_the_graph_the_failing_pass_left(registry, capsys):
    @registry("t-break", contract=graphopt.Exact())
    def break_it(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        return 1

    assert main(["optimize", "mlp", "--pipeline", "t-break", "--print-ir-after-failure"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^// -----// IR Dump After t-break Failed \(rolled-back\) //----- //$", err, re.M)
    assert "torch.mul" in err.split("IR Dump After t-break Failed", 1)[1]


def test_print_ir_after_an_unknown_pass_is_a_usage_error(capsys):
    assert main(["optimize", "mlp", "--print-ir-after", "fuse-conv-bn"]) == 2
    err = capsys.readouterr().err
    assert "--print-ir-after fuse-conv-bn: no such pass; did you mean fuse-conv-bn-relu" in err


def _calibrated_batches(capsys, path) -> str:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["optimize", "resnet_cnn", "--pipeline", "mobile-int8", "--calibration-data", str(path)]) == 0
    assert not any("no calibration data" in str(w.message) for w in seen)
    out = capsys.readouterr().out
    return re.search(r"calibration: .*? over (\d+) calibration batch", out.replace("\n", " ")).group(1)


class TestCalibrationData:
    example = torch.randn(2, 3, 32, 32)

    def test_a_pt_list_of_input_tuples_is_used(self, tmp_path, capsys):
        path = tmp_path / "calib.pt"
        torch.save([(torch.randn(2, 3, 32, 32),) for _ in range(6)], path)
        assert int(_calibrated_batches(capsys, path)) >= 1

    def test_an_npy_array_is_split_along_its_first_axis(self, tmp_path, capsys):
        path = tmp_path / "calib.npy"
        np.save(path, np.random.default_rng(0).standard_normal((6, 2, 3, 32, 32)).astype(np.float32))
        assert int(_calibrated_batches(capsys, path)) >= 1

    def test_an_npz_holds_one_array_per_input_in_savez_order(self, tmp_path):
        from graphopt.app.calibration_files import load_calibration_file

        a, b = torch.randn(5, 2, 4), torch.randn(5, 2, 3)
        path = tmp_path / "calib.npz"
        np.savez(path, a.numpy(), b.numpy())
        batches = load_calibration_file(path, (torch.randn(2, 4), torch.randn(2, 3)))
        assert len(batches) == 5 and all(torch.equal(x, a[i]) and torch.equal(y, b[i])
                                         for i, (x, y) in enumerate(batches))

    @pytest.mark.parametrize("make, message", [
        (lambda p: torch.save([(torch.full((2, 3, 32, 32), float("nan")),)], p / "c.pt") or p / "c.pt",
         "calibration batch #0, input 0: 6144 non-finite value(s)"),
        (lambda p: torch.save([(torch.randn(2, 3, 16, 16),)], p / "c.pt") or p / "c.pt",
         "shape 2x3x16x16 does not fit the example input's 2x3x32x32"),
        (lambda p: torch.save(torch.randn(2, 3, 32, 32), p / "c.pt") or p / "c.pt", "holds a Tensor"),
        (lambda p: np.save(p / "c.npy", np.zeros((3, 2, 3, 32, 32), dtype=np.float64)) or p / "c.npy",
         "dtype float64 where the example input is float32"),
        (lambda p: ((p / "c.pt").write_text("not a tensor file"), p / "c.pt")[1], "cannot read it as .pt"),
        (lambda p: ((p / "c.csv").write_text("1,2"), p / "c.csv")[1], "unknown suffix '.csv'"),
        (lambda p: p / "missing.pt", "no such file"),
    ])
    def test_bad_files_are_calibration_data_errors_naming_the_file(self, make, message, tmp_path, capsys):
        from graphopt.app.calibration_files import load_calibration_file

        path = make(tmp_path)
        with pytest.raises(CalibrationDataError, match=re.escape(message)):
            load_calibration_file(path, (self.example,))
        assert main(["optimize", "resnet_cnn", "--pipeline", "mobile-int8", "--calibration-data", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("graphopt: error: ") and str(path.name) in err and message in err

    def test_a_pt_file_runs_no_code_when_loaded(self, tmp_path):
        from graphopt.app.calibration_files import load_calibration_file

        class Payload:
            def __reduce__(self):
                return (print, ("code from the file ran",))

        path = tmp_path / "evil.pt"
        torch.save([Payload()], path)
        with pytest.raises(CalibrationDataError, match="cannot read it as .pt"):
            load_calibration_file(path, (self.example,))


def test_demo_without_graphviz_skips_its_report_and_says_why(tmp_path, monkeypatch, capsys):
    """`make demo` must work on a machine without Graphviz: the report is skipped with the
    reason, every other step still runs."""
    from graphopt.app import cli
    from graphopt.view import layout

    monkeypatch.setattr(layout, "dot_path", lambda: None)
    code = cli.main(["demo", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0
    assert "HTML report skipped" in out and "apt-get install graphviz" in out
    assert not (tmp_path / "demo" / "report.html").exists()
    assert any(p.suffix == ".onnx" for p in (tmp_path / "demo").iterdir())
