"""The README's Python examples run as written (in one namespace, in order)."""
from __future__ import annotations

import re
from pathlib import Path

import graphopt

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        for name in list(graphopt.available_passes()):
            if graphopt.get_pass(name).fn.__module__ in (None, "builtins", "__main__") or name == "drop-relu-of-nonnegative":
                graphopt.unregister_pass(name)
    assert (tmp_path / "model.onnx").exists()
    assert namespace["artifact"].verdict.ok
    assert namespace["drop_relu_of_nonnegative"].__name__ == "drop_relu_of_nonnegative"
    model_params = sum(p.numel() for p in namespace["model"].parameters())
    assert sum(p.numel() for p in namespace["pruned"].parameters()) < 0.5 * model_params
