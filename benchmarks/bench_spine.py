"""Spine scaling: capture + canonicalize + dead-code elimination + final verification on deep
synthetic models, against bare ``torch.fx.symbolic_trace`` of the same model in the same process.

    python -m benchmarks.bench_spine [--quick] [--sizes 2000,20000,50000] [--repeat N]

Sizes are total nodes of the captured graph (``deep_model(blocks_for(n))`` captures to about
``n`` nodes). Each size runs in its own subprocess. Reported: nodes, symbolic_trace seconds,
capture seconds and their ratio, pipeline seconds and the total (capture + pipeline), how
capture and the total grow against the smallest size, and memory: the peak RSS growth of one
capture + pipeline, the parameter bytes, the graph's own size and the peak against the memory
goal, 2 x parameter bytes + the graph. ``--repeat N`` takes the best of N runs of
symbolic_trace, capture and the pipeline (the machine's load varies more than any of them);
each timed call starts from a collected heap and its result is freed outside the timing.

Memory is measured first, in the size's fresh process after a warm-up on a small model (later
runs reuse the memory earlier ones freed, which hides growth): the process's peak RSS is reset
(``/proc/self/clear_refs``) and read back (``VmHWM``) around capture + pipeline. The graph's own
size is the RSS growth of holding the captured GraphModule once capture's garbage is collected
and returned to the system, less its parameter bytes (the copy's tensors), so the goal's
"2 x parameter bytes" counts the copy and one more (a snapshot or rewrite) on top.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn

from benchmarks.rss import give_back_freed_memory, reset_peak_rss, status_bytes


NODES_PER_BLOCK = 9  # get_attr weight, conv2d, 4 get_attr for BN, batch_norm, relu, add
FIXED_NODES = 2  # placeholder, output


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + x


def deep_model(blocks: int, channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(channels) for _ in range(blocks)]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(0.3)
    return model


def blocks_for(target_nodes: int) -> int:
    """Blocks whose captured graph has about ``target_nodes`` nodes."""
    return max(1, (target_nodes - FIXED_NODES) // NODES_PER_BLOCK)


def _pipeline(gm, x):
    import graphopt

    result = graphopt.PassManager("canonicalize,eliminate-dead-code", verify="final").run(gm, x)
    assert result.report.final_verdict.ok, result.report.final_verdict
    return result


def measure_memory(model, x) -> dict:
    """Peak RSS growth of capture + pipeline, and the captured graph's own retained size."""
    import graphopt
    from graphopt import graph as G

    give_back_freed_memory()
    before = status_bytes("VmRSS")
    if before is None or not reset_peak_rss():  # no /proc: the process's peak so far
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gm = graphopt.capture(model, x)
        _pipeline(gm, x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        return {"peak_rss_growth_bytes": peak, "param_bytes": G.param_bytes(gm)}
    gm = graphopt.capture(model, x)
    give_back_freed_memory()
    params = G.param_bytes(gm)
    graph = max(0, status_bytes("VmRSS") - before - params)
    _pipeline(gm, x)
    peak = status_bytes("VmHWM") - before
    budget = 2 * params + graph
    return {"peak_rss_growth_bytes": peak, "param_bytes": params, "graph_bytes": graph,
            "memory_budget_bytes": budget, "peak_vs_budget": peak / budget if budget else None}


def _best_time(call, repeat: int) -> float:
    """Best of ``repeat`` timed calls, each on a collected heap, its result freed untimed."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - t0)
        del result
    return best


def measure_one(target_nodes: int, repeat: int = 1) -> dict:
    import graphopt
    from graphopt import graph as G

    sys.setrecursionlimit(max(10000, 4 * target_nodes))
    repeat = max(1, repeat)
    x = (torch.randn(1, 4, 4, 4),)
    _pipeline(graphopt.capture(deep_model(3), x), x)  # imports and first-call caches
    torch.fx.symbolic_trace(deep_model(3))
    model = deep_model(blocks_for(target_nodes))
    memory = measure_memory(model, x)
    t_trace = _best_time(lambda: torch.fx.symbolic_trace(model), repeat)
    t_capture = _best_time(lambda: graphopt.capture(model, x), repeat)
    t_pipeline = float("inf")
    for _ in range(repeat):
        gm = graphopt.capture(model, x)
        nodes, compute_nodes = len(gm.graph.nodes), G.count_nodes(gm)
        gc.collect()
        t1 = time.perf_counter()
        result = _pipeline(gm, x)
        t_pipeline = min(t_pipeline, time.perf_counter() - t1)
        del gm, result
    return {
        "target_nodes": target_nodes, "nodes": nodes, "compute_nodes": compute_nodes,
        "symbolic_trace_s": t_trace, "capture_s": t_capture, "capture_vs_trace": t_capture / t_trace,
        "pipeline_s": t_pipeline, "total_s": t_capture + t_pipeline, **memory,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (CI)")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="best of N symbolic_trace/capture/pipeline runs per size")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.repeat)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([500, 2000] if args.quick else [2000, 20000, 50000])
    rows = []
    for n in sizes:
        command = [sys.executable, "-m", "benchmarks.bench_spine", "--one", str(n), "--repeat", str(args.repeat)]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            rows.append({"target_nodes": n, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if "total_s" in r), None)
    lines = ["| nodes | symbolic_trace s | capture s | capture/trace | capture vs smallest | pipeline s | total s "
             "| total vs smallest | peak RSS growth | param bytes | graph bytes | peak / (2 x params + graph) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target_nodes']} | failed: {r['error']} |")
            continue
        graph = f"{r['graph_bytes'] / 2**20:.1f} MiB" if r.get("graph_bytes") is not None else "n/a"
        ratio = f"{r['peak_vs_budget']:.2f}" if r.get("peak_vs_budget") is not None else "n/a"
        lines.append(
            f"| {r['nodes']} | {r['symbolic_trace_s']:.2f} | {r['capture_s']:.2f} | {r['capture_vs_trace']:.2f}x | "
            f"{r['capture_s'] / base['capture_s']:.1f}x | "
            f"{r['pipeline_s']:.2f} | {r['total_s']:.2f} | {r['total_s'] / base['total_s']:.1f}x | "
            f"{r['peak_rss_growth_bytes'] / 2**20:.0f} MiB | {r['param_bytes'] / 2**20:.2f} MiB | {graph} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    name = "spine_quick" if args.quick else "spine"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"rows": rows, "torch": torch.__version__}, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
