"""The benchmark harness: one command, every figure, one report.

    python -m benchmarks.run [--quick] [--threads 1,2] [--models resnet18,mobilenet_v2] [--out DIR]

Sections (``--sections``, default all):

- ``latency``: per model, graphopt's registered presets (``mobile-fp32``, and ``mobile-int8``,
  ``mobile-pruned`` once registered) in each runtime against the peers, timed round robin in
  this process (:mod:`benchmarks.bench_fp32`, :mod:`benchmarks.peers`).
- ``quantize``, ``accuracy``, ``prune``: ``benchmarks/bench_quantize.py``,
  ``benchmarks/bench_accuracy.py`` and ``benchmarks/bench_prune.py`` (int8 and pruning peers,
  the digits-CNN accuracy tables; int8 accuracy on MNIST-1D and a synthetic CIFAR-sized task
  that min-max calibration does not saturate), each run as
  ``python -m benchmarks.bench_X [--quick] [--threads T] [--out DIR]`` (the flags its
  ``--help`` lists); the JSON and Markdown it writes into DIR join the report.
- ``executorch``: ``benchmarks/bench_executorch.py`` run the same way: graphopt's fp32 and
  int8 results lowered to ExecuTorch against ExecuTorch's own flow (latency, ``.pte`` size,
  error, delegation, compile time, digits-CNN accuracy in the ExecuTorch runtime).
- ``corpus`` (only when asked for: hours on 2 cores): ``benchmarks/bench_corpus.py``, every
  model of the Hugging Face / timm / torchvision corpus through each stage in a process of its
  own, resumable; it writes ``corpus.json`` and ``corpus.md`` into the output folder itself.
- ``scaling``: ``benchmarks/bench_spine.py`` (capture + canonicalize + DCE vs
  ``symbolic_trace``) and the fusion scaling of :func:`benchmarks.bench_fp32.fusion_scaling`.

A failure anywhere is recorded with its reason and the run goes on. ``--quick`` (CI): the small
built-in models, 10 timed calls, small graphs, a couple of minutes. The full mode takes the
built-in models plus torchvision's when it imports, 30 timed calls, graphs up to ~45k nodes.
Results go to ``benchmarks/results`` (``benchmarks/results/quick`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("latency", "quantize", "accuracy", "prune", "executorch", "scaling", "corpus")
#: what runs without --sections: the corpus takes hours, so it runs only when named
DEFAULT_SECTIONS = ("latency", "quantize", "accuracy", "prune", "executorch", "scaling")
#: the benchmark modules run in processes of their own, by section
EXTERNAL = {"quantize": "bench_quantize", "accuracy": "bench_accuracy", "prune": "bench_prune",
            "executorch": "bench_executorch"}

#: layer width of the second spine run (bench_spine's default is 4)
WIDE_CHANNELS = 32

#: per mode: timed calls, spine sizes (bench_spine's target nodes), fusion sizes, time-outs in s
MODES = {
    # quick: the ExecuTorch section alone takes about 2 CPU-minutes, and CI runs it beside other tests
    "quick": {"runs": 10, "spine_sizes": "500", "wide_spine_sizes": None, "fusion_sizes": [300],
              "external_timeout": 600, "spine_timeout": 240, "fusion_timeout": 120},
    # accuracy trains two models before quantizing them a dozen ways: it gets longer than the others
    "full": {"runs": 30, "spine_sizes": "500,2000,5000,20000,50000", "wide_spine_sizes": "2000,20000",
             "fusion_sizes": [500, 2000, 5000], "external_timeout": 480, "accuracy_timeout": 1200,
             "spine_timeout": 900, "fusion_timeout": 300},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, fewer runs, small graphs (CI)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--models", default=None,
                    help="comma-separated: built-in example names and torchvision:NAME (default: per mode)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results, or .../quick)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per path and thread count (default 30, quick 10)")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"any of {', '.join(SECTIONS)} (default: all but corpus)")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads takes comma-separated integers, not {args.threads!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")  # torch's deprecation notices would tear the progress display
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from benchmarks import bench_fp32, report

    mode = MODES["quick" if args.quick else "full"]
    runs = args.runs or mode["runs"]
    models = args.models.split(",") if args.models else bench_fp32.default_models(args.quick)
    sections = args.sections.split(",")
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    presets = bench_fp32.registered_presets()
    console = Console(stderr=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "environment": report.environment(args.threads),
        "settings": {"quick": args.quick, "threads": args.threads, "runs": runs, "models": models,
                     "presets": presets, "sections": sections,
                     "torchvision": bench_fp32.torchvision_available()},
        "rows": [], "goals": [], "external": {}, "scaling": {},
    }
    results["environment"]["load_samples"] = []  # [seconds into the run, 1-minute load average, step]
    units = len(models) * ("latency" in sections) + sum(s in sections for s in EXTERNAL) + 2 * ("scaling" in sections) \
        + ("corpus" in sections)
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=units)

        def show(what: str) -> None:
            # the load while each step runs says how far its figures can be trusted
            results["environment"]["load_samples"].append([round(time.perf_counter() - started), os.getloadavg()[0], what])
            progress.update(task, description=what[:100])
            if not console.is_terminal:  # no live display in CI logs: one timestamped line per step instead
                console.print(f"{time.perf_counter() - started:7.0f} s  {what}", markup=False, highlight=False)

        if "latency" in sections:
            for name in models:
                show(f"{name}: loading")
                try:
                    results["rows"] += bench_fp32.bench_model(name, args.threads, runs, presets, show)
                except Exception as exc:  # the model itself failed to load or run: one row says why
                    results["rows"].append(bench_fp32.failed_model_row(name, exc))
                progress.advance(task)
            results["goals"] = bench_fp32.goals(results["rows"])
        for section, module in EXTERNAL.items():
            if section in sections:
                show(f"{module} (its own process)")
                timeout = mode.get(f"{section}_timeout", mode["external_timeout"])
                results["external"][module] = run_external(module, args, out / section, timeout)
                progress.advance(task)
        if "scaling" in sections:
            show("bench_spine scaling (its own processes)")
            results["scaling"]["spine"] = run_spine(args.quick, mode["spine_sizes"], out / "scaling", mode["spine_timeout"])
            if mode["wide_spine_sizes"]:  # the same with 32-channel layers: parameters as large as the graph
                results["scaling"]["spine_wide"] = run_spine(args.quick, mode["wide_spine_sizes"], out / "scaling",
                                                             mode["spine_timeout"], channels=WIDE_CHANNELS)
            progress.advance(task)
            show("fusion scaling (a process per size)")
            results["scaling"]["fusion"] = bench_fp32.fusion_scaling(mode["fusion_sizes"], mode["fusion_timeout"])
            progress.advance(task)
        if "corpus" in sections:
            show("bench_corpus (a process per model; resumes from corpus.json)")
            results["external"]["bench_corpus"] = run_corpus(out)
            progress.advance(task)
        show("writing the report")
        results["environment"]["load_average_at_end"] = list(os.getloadavg())
        results["wall_s"] = time.perf_counter() - started
        written = report.write(results, out, REPO_ROOT)
        progress.update(task, description="done")
    _print_summary(console, results, written)
    return 0


def _print_summary(console: Any, results: dict[str, Any], written: dict[str, Path]) -> None:
    from benchmarks import report

    if results["rows"]:
        for t in results["settings"]["threads"]:
            console.print(f"\nspeed-up over eager fp32, {t} thread(s):", highlight=False)
            console.print(report.headline_table(results, t), markup=False, highlight=False, soft_wrap=True)
    for line in report.goals_summary(results):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    if failed:
        console.print(f"{len(failed)} row(s) failed or unavailable: see the report", highlight=False)
    console.print(f"\nwall time {results['wall_s'] / 60:.1f} min; written:", highlight=False)
    for name, path in written.items():
        console.print(f"  {name}: {path}", markup=False, highlight=False)


# ------------------------------------------------------------------------- other modules


def _subprocess(args: list[str], timeout: float | None) -> tuple[int | None, str, str]:
    """(exit code or None on time-out, stdout, stderr) of ``python -m ...`` from the repo root."""
    try:
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as exc:
        return None, _text(exc.stdout), _text(exc.stderr)
    return done.returncode, done.stdout, done.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _last_line(stderr: str, code: int | None) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit code {code}"


def run_external(module: str, args: argparse.Namespace, out: Path, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks.<module>`` in its own process with the flags its ``--help`` offers and
    collect the JSON and Markdown files it writes into ``out``."""
    if not (REPO_ROOT / "benchmarks" / f"{module}.py").exists():
        return {"status": "not present", "reason": f"benchmarks/{module}.py does not exist yet"}
    code, usage, err = _subprocess([f"benchmarks.{module}", "--help"], 120)
    if code != 0:
        return {"status": "failed", "reason": f"--help: {_last_line(err, code)}"}
    flags = set(re.findall(r"--[a-z][a-z-]*", usage))
    command = [f"benchmarks.{module}"]
    if args.quick and "--quick" in flags:
        command.append("--quick")
    if "--threads" in flags:
        command += ["--threads", ",".join(map(str, args.threads))]
    if "--out" in flags:
        out.mkdir(parents=True, exist_ok=True)
        command += ["--out", str(out)]
    started = time.perf_counter()
    code, stdout, stderr = _subprocess(command, timeout)
    ran = {"command": "python -m " + " ".join(command), "seconds": time.perf_counter() - started}
    if code is None:
        return {**ran, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if code != 0:
        return {**ran, "status": "failed", "reason": _last_line(stderr, code)}
    collected = {**ran, "status": "ran", "json": {}, "markdown": {}}
    if "--out" not in flags:
        collected["reason"] = "it takes no --out: its figures are wherever it writes them, not in this report"
        collected["markdown"]["stdout"] = stdout[-20000:]
        return collected
    for path in sorted(out.glob("*.json")):
        try:
            collected["json"][path.name] = json.loads(path.read_text())
        except ValueError as exc:
            collected["json"][path.name] = {"error": f"not JSON: {exc}"}
    for path in sorted(out.glob("*.md")):
        collected["markdown"][path.name] = path.read_text()
    return collected


def run_corpus(out: Path) -> dict[str, Any]:
    """``benchmarks.bench_corpus --out out``: no overall time-out (each model has its own); its
    summary and table. Models already in ``out/corpus.json`` are not rerun."""
    out.mkdir(parents=True, exist_ok=True)
    command = ["benchmarks.bench_corpus", "--out", str(out)]
    started = time.perf_counter()
    code, _, stderr = _subprocess(command, None)
    ran = {"command": "python -m " + " ".join(command), "seconds": time.perf_counter() - started}
    if code != 0:
        return {**ran, "status": "failed", "reason": _last_line(stderr, code)}
    try:
        summary = json.loads((out / "corpus.json").read_text())["summary"]
        table = (out / "corpus.md").read_text()
    except (OSError, ValueError, KeyError) as exc:
        return {**ran, "status": "failed", "reason": f"its output could not be read: {exc}"}
    return {**ran, "status": "ran", "json": {"corpus.json": {"summary": summary}}, "markdown": {"corpus.md": table}}


def run_spine(quick: bool, sizes: str, out: Path, timeout: float, channels: int = 4) -> dict[str, Any]:
    """``benchmarks.bench_spine`` at ``sizes`` (best of 3) into ``out``; its rows and table."""
    command = ["benchmarks.bench_spine", "--sizes", sizes, "--out", str(out), "--repeat", "3" if not quick else "1"] \
        + (["--quick"] if quick else []) + (["--channels", str(channels)] if channels != 4 else [])
    started = time.perf_counter()
    code, _, stderr = _subprocess(command, timeout)
    ran = {"command": "python -m " + " ".join(command), "seconds": time.perf_counter() - started}
    if code != 0:
        reason = f"timed out after {timeout:.0f} s" if code is None else _last_line(stderr, code)
        return {**ran, "status": "failed", "reason": reason}
    name = ("spine_quick" if quick else "spine") + (f"_c{channels}" if channels != 4 else "")
    try:
        data = json.loads((out / f"{name}.json").read_text())
        table = (out / f"{name}.md").read_text()
    except (OSError, ValueError) as exc:
        return {**ran, "status": "failed", "reason": f"its output could not be read: {exc}"}
    return {**ran, "status": "ran", "rows": data.get("rows", []), "markdown": table}


if __name__ == "__main__":
    sys.exit(main())
