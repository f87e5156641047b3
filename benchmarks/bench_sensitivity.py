"""Cost of the per-layer int8 sensitivity analysis against one ``mobile-int8`` run.

    python -m benchmarks.bench_sensitivity [--model mobilenet_v2] [--batches 8] [--repeats 2] [--out DIR]

Both get the same model, example inputs and calibration data (``--batches`` calibration batches
plus one held out, random normal, fixed seed), on one thread. The goal: ``analyze`` under twice
the time of ``mobile-int8`` (capture, fusion, calibration, insertion and verification). Each is
timed ``--repeats`` times, alternating, and the fastest run counts. Prints one JSON object; with
``--out DIR`` also writes it to ``DIR/sensitivity_timing.json``, the analysis itself to
``DIR/sensitivity.json`` and its chart to ``DIR/charts/sensitivity.png`` (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import time
import warnings

import torch

import graphopt
from graphopt import examples
from graphopt.quantization import analyze


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON files and the chart")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, inputs = examples.get_example(args.model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*inputs[0].shape, generator=g),) for _ in range(args.batches + 1)]

    times: dict[str, list[float]] = {"analyze": [], "mobile-int8": []}
    layers = sqnr = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        report = analyze(model, inputs, data)
        times["analyze"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = graphopt.optimize(model, inputs, "mobile-int8", calibration_data=data)
        times["mobile-int8"].append(time.perf_counter() - t0)
        layers = len(report.layers)
        sqnr = next(r.figures["held_out_sqnr_db"] for r in result.report.records if r.name == "quantize")
    best = {k: min(v) for k, v in times.items()}
    summary = {
        "model": args.model, "calibration_batches": args.batches, "layers_analyzed": layers,
        "int8_held_out_sqnr_db": sqnr, "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "ratio_analyze_to_mobile_int8": round(best["analyze"] / best["mobile-int8"], 2),
        "worst_layers": [(s.name, s.module, round(s.sqnr_db, 1), s.cause) for s in report.layers[:3]],
    }
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        (args.out / "charts").mkdir(parents=True, exist_ok=True)
        (args.out / "sensitivity_timing.json").write_text(json.dumps(summary, indent=2) + "\n")
        report.save_json(args.out / "sensitivity.json")
        report.plot(args.out / "charts" / "sensitivity.png")


if __name__ == "__main__":
    main()
