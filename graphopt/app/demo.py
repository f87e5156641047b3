"""``graphopt demo``: the whole job on a built-in model, end to end.

Capture, optimize with ``mobile-fp32`` (every pass verified), lower to every registered backend
(each artifact reloaded and verified in its own runtime), then a before/after table: size,
node count, latency in each runtime, max error against the original model. The HTML report of
the pipeline run (each pass's graph before and after) is written to ``OUT/report.html``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from graphopt.errors import ReportError


def run_demo(model_name: str = "resnet_cnn", out_dir: str = "out/demo") -> int:
    from rich.console import Console
    from rich.table import Table

    from graphopt.app import examples
    from graphopt.ir import graph as G
    from graphopt import optimize
    from graphopt.capture import capture
    from graphopt.lowering.backend import available_backends
    from graphopt.lowering.run import lower
    from graphopt.app.timing import round_robin_ms

    console = Console(width=None if sys.stdout.isatty() else 120)
    torch.set_num_threads(1)
    model, inputs = examples.get_example(model_name)
    console.print(f"[bold]graphopt demo[/bold]: {model_name} ({examples.EXAMPLES[model_name].description}), "
                  f"input {tuple(inputs[0].shape)}, 1 thread")
    original = capture(model, inputs)
    result = optimize(model, inputs, "mobile-fp32", verify="each", keep_graphs=True)  # its bar shows each pass on a terminal
    console.print(result.report.table())
    for line in result.report.details():
        console.print("  " + line, markup=False, highlight=False)

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        page = result.report.save_html(Path(out_dir) / "report.html")
        console.print(f"  HTML report: {page}", markup=False, highlight=False)
    except ReportError as exc:  # Graphviz missing: the demo's other steps do not need it
        console.print(f"  HTML report skipped: {exc}", markup=False, highlight=False)
    suffix = {"onnx": ".onnx", "torchscript-mobile": ".ptl"}
    artifacts = {}
    for name, backend in available_backends().items():
        missing = backend.unavailable()
        if missing is not None:
            console.print(f"  {name}: skipped, {missing}", markup=False, highlight=False)
            continue
        path = os.path.join(out_dir, f"{model_name}{getattr(backend, 'suffix', suffix.get(name, ''))}")
        # lower's bar (on a terminal) shows export, load and verify in the runtime
        artifacts[name] = lower(result.module, inputs, backend=name, path=path, reference=model)
        console.print(f"  {artifacts[name]}", markup=False, highlight=False)

    runners = {"eager, original": lambda: model(*inputs), "eager, optimized": lambda: result.module(*inputs)}
    for name, art in artifacts.items():
        runners[name] = (lambda a=art: a.run(*inputs))
    with console.status("timing (median of 30 calls per variant, round robin)"), torch.no_grad():
        latency = round_robin_ms(runners)
    with torch.no_grad():
        ref = model(*inputs)
    table = Table(title=f"{model_name}: before and after")
    for col in ("variant", "size", "nodes", "latency ms", "speed-up", "max abs error"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    base = latency["eager, original"]
    rows = [("eager, original", G.param_bytes(original), G.count_nodes(original), 0.0),
            ("eager, optimized", G.param_bytes(result.module), G.count_nodes(result.module),
             (result.module(*inputs) - ref).abs().max().item())]
    for name, art in artifacts.items():
        rows.append((name, art.size_bytes, art.report.get("node_count", G.count_nodes(result.module)),
                     art.verdict.max_abs))
    for name, size, nodes, err in rows:
        table.add_row(name, f"{size / 1024:.1f} KiB", str(nodes), f"{latency[name]:.3f}",
                      f"{base / latency[name]:.2f}x", f"{err:.2e}")
    console.print(table)
    ok = not result.report.failed and all(a.verdict.ok for a in artifacts.values())
    console.print("[green]all checks passed[/green]" if ok else "[red]some checks failed[/red]")
    return 0 if ok else 1
