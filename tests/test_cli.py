"""The command line: what a user types, what they see, and the exit codes scripts rely on."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from graphopt.cli import main
from graphopt.models import load


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
    assert [p["name"] for p in data["passes"]] == \
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
    from graphopt.examples import get_example
    from graphopt.models import save

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
