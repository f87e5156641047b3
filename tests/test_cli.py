"""The command line: what a user types, what they see, and the exit codes scripts rely on."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from graphopt.app.cli import main
from graphopt.app.models import load


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_passes_lists_builtins_with_contracts_and_presets(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("canonicalize", "fold-constants", "fuse-conv-bn-relu", "eliminate-dead-code"):
        assert name in out
    assert "exact" in out and "mobile-fp32" in out


def test_models_lists_builtin_examples(capsys):
    assert main(["models"]) == 0
    assert "resnet_cnn" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "resnet_cnn", "--pipeline", "fuse-conv-bn-rleu"], "did you mean 'fuse-conv-bn-relu'"),
        (["optimize", "resnet_cnn", "--input", "1x3xbig"], "expected sizes joined by 'x'"),
        (["optimize", "resnet_cnnn"], "did you mean 'resnet_cnn'"),
        (["optimize", "resnet_cnn", "--option", "nonsense"], "expected PASS.NAME=VALUE"),
        (["optimize", "resnet_cnn", "--option", "fold-constants.max_bites=3"], "did you mean 'max_bytes'"),
        (["optimize", "resnet_cnn", "--backend", "onxx", "-o", "x"], "did you mean 'onnx'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_optimize_factory_file_writes_a_loadable_module(tmp_path):
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            bn = nn.BatchNorm2d(4)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU()).eval()
    """))
    out = tmp_path / "opt.pt"
    report = tmp_path / "report.json"
    code, stdout, stderr = run_cli("optimize", f"{model_file}:build", "--input", "1x3x8x8",
                                   "-o", str(out), "--report-json", str(report))
    assert code == 0, stderr
    assert "fuse-conv-bn-relu" in stdout and "changed" in stdout
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["records"]] == \
        [inv.name for inv in __import__("graphopt").PassManager("mobile-fp32").invocations]
    gm = load(out, trust_code=True)
    x = torch.randn(1, 3, 8, 8)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodel_check", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    ref = mod.build()
    assert not any(n.target is torch.nn.functional.batch_norm for n in gm.graph.nodes)
    assert gm(x).shape == ref(x).shape


def test_saved_module_refuses_to_run_code_unless_trusted(tmp_path):
    from graphopt.errors import ModelLoadError
    from graphopt.app.examples import get_example
    from graphopt.app.models import save

    model, inputs = get_example("mlp")
    gm = __import__("graphopt").capture(model, inputs)
    path = tmp_path / "m.pt"
    save(gm, path)
    with pytest.raises(ModelLoadError, match="trust_code=True"):
        load(path)
    assert torch.equal(load(path, trust_code=True)(*inputs), gm(*inputs))


def test_optimize_with_onnx_backend_writes_a_verified_artifact(tmp_path):
    out = tmp_path / "mlp.onnx"
    code, stdout, stderr = run_cli("optimize", "mlp", "--backend", "onnx", "-o", str(out))
    assert code == 0, stderr
    assert out.exists() and "verified in its runtime: ok" in stdout


# ------------------------------------------------------------------ outputs, checked before the pipeline runs


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_pipeline(monkeypatch):
    """Fail the test if the pipeline (or the demo) starts: the checks must come first."""
    import graphopt
    import graphopt.app.demo

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran before the output paths were checked")

    monkeypatch.setattr(graphopt, "optimize", refuse)
    monkeypatch.setattr(graphopt.app.demo, "run_demo", refuse)


def test_missing_output_folders_are_created(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "m.pt"
    report = tmp_path / "c" / "d" / "report.json"
    assert main(["optimize", "mlp", "-o", str(out), "--report-json", str(report)]) == 0
    assert json.loads(report.read_text())["pipeline"]
    gm = load(out, trust_code=True)  # .pt keeps writing a graph module file
    assert gm(torch.randn(4, 64)).shape == (4, 10)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["m.pt"]  # no staging left over


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda t: ["-o", str(t / "file.txt" / "m.pt")], "file.txt is a file, not a folder"),
        (lambda t: ["-o", str(t / "file.txt" / "deeper" / "m.onnx")], "file.txt is a file, not a folder"),
        (lambda t: ["-o", str(t)], "is a folder; give a file path"),
        (lambda t: ["--backend", "onnx", "-o", str(t)], "is a folder; give a file path"),
        (lambda t: ["-o", ""], "-o: empty path"),
        (lambda t: ["--report-json", str(t)], "--report-json"),
        (lambda t: ["--report-json", str(t / "file.txt" / "r.json")], "file.txt is a file, not a folder"),
        (lambda t: ["-o", str(t / "same"), "--report-json", str(t / "same")], "name the same file"),
    ],
)
def test_unwritable_output_paths_fail_in_one_line_before_the_pipeline(make_argv, message, tmp_path, capsys, no_pipeline):
    (tmp_path / "file.txt").write_text("not a folder")
    assert main(["optimize", "mlp", *make_argv(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("graphopt: error: ") and message in err
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_output_in_a_folder_we_may_not_write_fails_in_one_line(tmp_path, capsys, monkeypatch, no_pipeline):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode, **kw))
    try:
        for argv in (["optimize", "mlp", "-o", str(locked / "sub" / "m.pt")],
                     ["optimize", "mlp", "--report-json", str(locked / "r.json")],
                     ["demo", "--out", str(locked / "demo")]):
            assert main(argv) == 2
            assert f"cannot write in folder {locked} (permission denied)" in _one_line_error(capsys)
    finally:
        locked.chmod(0o700)
    assert not any(locked.iterdir())


def test_demo_out_that_is_a_file_fails_in_one_line(tmp_path, capsys, no_pipeline):
    target = tmp_path / "demo"
    target.write_text("a file")
    assert main(["demo", "--out", str(target)]) == 2
    assert f"--out {target}: {target} is a file, not a folder" in _one_line_error(capsys)
    assert main(["demo", "--out", str(target / "inside")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)


def test_report_json_is_written_atomically(tmp_path, monkeypatch):
    from graphopt.pipeline.report import Report

    report = tmp_path / "report.json"
    report.write_text('{"old": true}\n')
    # json streams into the file; a value it cannot encode fails midway through the write
    monkeypatch.setattr(Report, "to_dict", lambda self: {"pipeline": self.pipeline, "bad": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        main(["optimize", "mlp", "--report-json", str(report)])
    assert report.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_oserror_while_writing_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    import graphopt.app.models

    def disk_full(gm, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(graphopt.app.models, "save", disk_full)
    assert main(["optimize", "mlp", "-o", str(tmp_path / "m.pt")]) == 2
    assert f"graphopt: error: {tmp_path / 'm.pt'}: No space left on device" == _one_line_error(capsys)


# ------------------------------------------------------------------ backend from the -o suffix


def test_onnx_suffix_without_backend_lowers_to_onnx(tmp_path, capsys):
    import zipfile

    import onnx

    out = tmp_path / "m.onnx"
    assert main(["optimize", "mlp", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"onnx: {out}" in stdout and "verified in its runtime: ok" in stdout
    assert not zipfile.is_zipfile(out)  # not a torch zip named .onnx
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("name, backend", [("m.onnx", "onnx"), ("m.ptl", "torchscript-mobile"),
                                           ("m.pte", "executorch"), ("m.ONNX", "onnx")])
def test_output_suffix_picks_the_backend(name, backend, tmp_path, capsys, monkeypatch):
    import graphopt.lowering

    chosen = {}

    def fake_lower(module, inputs, backend, path, **kw):
        chosen.update(backend=backend, path=path)
        return "lowered"

    monkeypatch.setattr(graphopt.lowering, "lower", fake_lower)
    monkeypatch.setattr(graphopt.lowering.get_backend(backend), "unavailable", classmethod(lambda cls: None))
    assert main(["optimize", "mlp", "-o", str(tmp_path / name)]) == 0
    assert chosen == {"backend": backend, "path": tmp_path / name}


def test_backend_that_contradicts_the_output_suffix_fails_in_one_line(tmp_path, capsys, no_pipeline):
    assert main(["optimize", "mlp", "--backend", "torchscript-mobile", "-o", str(tmp_path / "m.onnx")]) == 2
    err = _one_line_error(capsys)
    assert ".onnx is the onnx backend's suffix but --backend is torchscript-mobile" in err
    assert "m.ptl" in err
    assert not (tmp_path / "m.onnx").exists()


def test_unavailable_backend_picked_by_suffix_fails_before_the_pipeline(tmp_path, capsys, monkeypatch, no_pipeline):
    import graphopt.lowering

    cls = graphopt.lowering.get_backend("executorch")
    monkeypatch.setattr(cls, "unavailable", classmethod(lambda c: "install graphopt[executorch]"))
    assert main(["optimize", "mlp", "-o", str(tmp_path / "m.pte")]) == 2
    assert "executorch: cannot run on this machine: install graphopt[executorch]" in _one_line_error(capsys)


# ------------------------------------------------------------------ models, dtypes, error lines


def test_package_in_the_current_directory_resolves_without_it_on_sys_path(tmp_path, capsys, monkeypatch):
    """The `graphopt` console script does not put the current directory on sys.path."""
    import os

    pkg = tmp_path / "gopt_cwd_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    here = os.path.realpath(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.realpath(p or os.curdir) != here])
    for name in ("gopt_cwd_pkg", "gopt_cwd_pkg.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert main(["optimize", "gopt_cwd_pkg.nets:build", "--input", "1x4", "-o", "m.pt"]) == 0, capsys.readouterr().err
        assert load(tmp_path / "m.pt", trust_code=True)(torch.randn(1, 4)).shape == (1, 2)
        assert main(["optimize", "gopt_no_such_pkg.nets:build", "--input", "1x4"]) == 2
        assert "No module named 'gopt_no_such_pkg'" in _one_line_error(capsys)
    finally:
        for name in ("gopt_cwd_pkg", "gopt_cwd_pkg.nets"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_converts_the_model_and_the_builtin_example_inputs(dtype, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["optimize", "mlp", "--dtype", dtype, "-o", str(out)]) == 0, capsys.readouterr().err
    gm = load(out, trust_code=True)
    assert {t.dtype for t in gm.state_dict().values()} == {getattr(torch, dtype)}
    assert gm(torch.randn(4, 64, dtype=getattr(torch, dtype))).dtype == getattr(torch, dtype)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "mlp", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["optimize", "mlp", "--input", "2x5"], "graphopt: error: MLP raised RuntimeError"),  # was exit code 1
    ],
)
def test_every_failure_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_multi_line_error_messages_are_joined_into_one_line(tmp_path, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text("def build():\n    raise ValueError('first line\\n  second line')\n")
    assert main(["optimize", f"{model_file}:build", "--input", "1x4"]) == 2
    assert "raised ValueError: first line; second line" in _one_line_error(capsys)


# ------------------------------------------------------------------------------ dynamic dims


@pytest.mark.parametrize("text, expected", [
    ("batch", "batch"),
    ("static", "static"),
    ("0.0=batch,0.1=seq", ({0: "batch", 1: "seq"},)),
    ("1.0=batch", (None, {0: "batch"})),
    ("input_ids.0=batch,input_ids.1=seq,mask.0=batch", {"input_ids": {0: "batch", 1: "seq"}, "mask": {0: "batch"}}),
])
def test_dynamic_specs_parse(text, expected):
    from graphopt.app.cli import parse_dynamic

    assert parse_dynamic(text) == expected


@pytest.mark.parametrize("text", ["0.0", "x.y=batch", "0.0=batch,x.0=batch", "0.0=2"])
def test_bad_dynamic_specs_are_one_line_usage_errors(text, capsys):
    assert main(["optimize", "mlp", "--dynamic", text]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dynamic" in err


def test_static_shapes_from_the_command_line_are_reported_and_refused_at_other_sizes(tmp_path, capsys):
    out, report = tmp_path / "m.pt", tmp_path / "r.json"
    assert main(["optimize", "mlp", "--dynamic", "static", "-o", str(out), "--report-json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["checked_at"] == {} and "static shapes: other sizes are refused" in capsys.readouterr().out
    module = load(out, trust_code=True)
    (placeholder,) = [n for n in module.graph.nodes if n.op == "placeholder"]
    shape = placeholder.meta["graphopt_dims"].shape
    with pytest.raises(Exception, match="specialized"):
        module(torch.randn(shape[0] + 1, *shape[1:]))


def test_lowering_from_the_command_line_checks_the_second_batch_and_the_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["optimize", "mlp", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "every check also at batch=" in printed
    assert "verified in its runtime: ok" in printed
