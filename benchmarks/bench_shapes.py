"""The cost of keeping the batch dynamic: capture + pipeline with ``dynamic_shapes="batch"`` (the
default: capture runs model and graph at a second batch size, every pass check and the final
check run there too, fold-constants watches which dims vary) against ``dynamic_shapes="static"``
(none of that), in the same process, alternating, best and median of ``--repeat`` runs.

    python -m benchmarks.bench_shapes [--quick] [--repeat N] [--out DIR]

Models: the spine benchmark's deep conv/BN/ReLU chain (``benchmarks.bench_spine.deep_model``) at
2,000 and 20,000 nodes with the spine's pipeline (canonicalize, eliminate-dead-code, final
check), and the built-in ResNet-18 (1x3x224x224) with ``mobile-fp32`` and per-pass checks. The
ratio dynamic / static is the figure: the goal is at most 1.5.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import graphopt
from benchmarks.bench_spine import blocks_for, deep_model
from graphopt.app.examples import get_example


def _cases(quick: bool) -> list[tuple[str, torch.nn.Module, tuple, str, str]]:
    sizes = (500,) if quick else (2000, 20000)
    cases = [(f"spine {n} nodes", deep_model(blocks_for(n)), (torch.randn(2, 4, 8, 8),),
              "canonicalize,eliminate-dead-code", "final") for n in sizes]
    name = "resnet_cnn" if quick else "resnet18"
    model, inputs = get_example(name)
    cases.append((f"{name} mobile-fp32", model, inputs, "mobile-fp32", "each"))
    return cases


def _time(model, inputs, pipeline: str, verify: str, dynamic_shapes: str) -> float:
    gc.collect()
    start = time.perf_counter()
    result = graphopt.optimize(model, inputs, pipeline, verify=verify, dynamic_shapes=dynamic_shapes)
    seconds = time.perf_counter() - start
    assert not result.report.failed and result.report.final_verdict.ok, result.report
    del result
    return seconds


def run(quick: bool, repeat: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for label, model, inputs, pipeline, verify in _cases(quick):
        _time(model, inputs, pipeline, verify, "static")  # warm-up: imports, kernels
        times: dict[str, list[float]] = {"static": [], "batch": []}
        for _ in range(repeat):
            for mode in ("static", "batch"):  # alternating, so drifts in load hit both
                times[mode].append(_time(model, inputs, pipeline, verify, mode))
        row = {"case": label, "pipeline": pipeline, "verify": verify, "repeat": repeat,
               **{f"{m}_best_s": round(min(t), 3) for m, t in times.items()},
               **{f"{m}_median_s": round(statistics.median(t), 3) for m, t in times.items()}}
        row["ratio_best"] = round(row["batch_best_s"] / row["static_best_s"], 2)
        row["ratio_median"] = round(row["batch_median_s"] / row["static_median_s"], 2)
        rows.append(row)
        print(f"{label:28s} static {row['static_median_s']:7.2f} s  dynamic batch {row['batch_median_s']:7.2f} s  "
              f"ratio {row['ratio_median']:.2f} (median of {repeat}; best {row['ratio_best']:.2f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models (CI)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    rows = run(args.quick, args.repeat)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "shapes_quick" if args.quick else "shapes"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| case | pipeline (verify) | static s | dynamic batch s | ratio (median) | ratio (best) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['case']} | {r['pipeline']} ({r['verify']}) | {r['static_median_s']:.2f} | "
              f"{r['batch_median_s']:.2f} | {r['ratio_median']:.2f} | {r['ratio_best']:.2f} |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
