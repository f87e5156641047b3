"""A built wheel, not only the editable install, holds every package and module of graphopt.

pyproject.toml lists the packages by hand (``passes/`` and ``backends/`` install as
``graphopt.passes`` and ``graphopt.backends``), so a new subpackage can be forgotten there and
still work from a checkout. This test builds the wheel, installs it into a folder of its own and
imports every module and the console script's function from outside the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes", "graphopt.backends": ROOT / "backends"}


def _source_modules() -> set[str]:
    """Every module of the source tree, by the name it installs under."""
    names = set()
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(part.startswith(".") for part in rel.parts):
                continue
            if package == "graphopt" and parts and parts[0] in ("passes", "backends"):
                continue
            names.add(".".join([package, *parts]))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools keeps build/ in the source tree, and files left there by an
    # earlier build (a module since moved) would go into the wheel
    source = tmp_path_factory.mktemp("source") / "graphopt"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "No module named 'setuptools'" in done.stderr + done.stdout:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "setuptools>=77", "wheel"], check=True)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("graphopt-*.whl")
    return built


def test_the_wheel_holds_every_module_of_the_tree(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        entry_points = next(archive.read(f).decode() for f in files if f.endswith("entry_points.txt"))
    in_wheel = {f[:-3].replace("/", ".").removesuffix(".__init__") for f in files if f.endswith(".py")}
    missing = _source_modules() - in_wheel
    assert not missing, f"modules missing from the wheel (add their packages to pyproject.toml): {sorted(missing)}"
    assert not in_wheel - _source_modules(), f"modules in the wheel that the tree does not have: {in_wheel - _source_modules()}"
    assert {"graphopt/view/template.html", "graphopt/view/report.js"} <= set(files)  # the HTML report's assets
    assert "graphopt = graphopt.app.cli:main" in entry_points


def test_every_module_imports_from_the_installed_wheel_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    modules = sorted(m for m in _source_modules() if not m.endswith(".__main__"))  # that one runs the CLI
    script = (
        "import importlib, json, sys\n"
        f"names = {modules!r}\n"
        "where = {}\n"
        "for name in names:\n"
        "    where[name] = importlib.import_module(name).__file__\n"
        "from graphopt.app.cli import main\n"
        "assert callable(main)\n"
        "print(json.dumps(where))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    where = json.loads(done.stdout.strip().splitlines()[-1])
    outside = {name: path for name, path in where.items() if not path.startswith(str(target))}
    assert not outside, f"imported from outside the installed wheel: {outside}"
