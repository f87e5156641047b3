"""The HTML report: how long it takes to write, how large it is, how long Chromium takes to open
it, on a long chain of small layers (a graph of about ``--nodes`` nodes), plus the reports of the
demo pipeline, ``mobile-int8`` on MobileNetV2 and ``prune-channels`` on ResNet-18 with
screenshots.

    python -m benchmarks.bench_report [--nodes 5000] [--out benchmarks/results/report]

Writes ``report.json`` (the figures), the pages and their screenshots into ``--out`` (the pages
are not kept in git), and the demo report's screenshot to ``benchmarks/results/report.png``
(shown in the README). Figures are wall times on whatever else the machine runs. Needs
Graphviz's dot and Chromium (Debian: apt-get install graphviz chromium).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import graphopt
from graphopt.app import examples
from graphopt.view import browser as report_browser

RESULTS = Path(__file__).resolve().parent / "results"


def chain(nodes: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Conv, batch norm, ReLU blocks whose captured graph holds about ``nodes`` nodes (a block
    is 8: the conv and its weight, the batch norm and its four tensors, the ReLU)."""
    blocks = max(1, nodes // 8)
    layers = [nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(blocks)]
    return nn.Sequential(*layers).eval(), (torch.randn(1, 4, 4, 4),)


def measure(report: graphopt.Report, page: Path) -> dict:
    t0 = time.perf_counter()
    report.save_html(page)
    write = time.perf_counter() - t0
    return {"write_s": round(write, 2), "bytes": page.stat().st_size,
            "chromium_open_s": round(report_browser.load_seconds(page), 2),
            "graph_nodes": max((len(v[1]) for v in report.graphs.values()), default=0),
            "views": len(report.graphs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--out", default=str(RESULTS / "report"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    figures = {}

    model, inputs = chain(args.nodes)
    t0 = time.perf_counter()
    result = graphopt.optimize(model, inputs, "mobile-fp32", verify="none", keep_graphs=True)
    figures["chain"] = {"pipeline_s": round(time.perf_counter() - t0, 2), **measure(result.report, out / "chain.html")}

    runs = {
        "demo": ("resnet_cnn", "mobile-fp32"),  # graphopt demo's model and pipeline
        "mobilenet_v2_int8": ("mobilenet_v2", "mobile-int8"),
        "resnet18_prune": ("resnet18", "prune-channels{ratio=0.5}"),
    }
    for name, (model_name, pipeline) in runs.items():
        model, inputs = examples.get_example(model_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # int8 without calibration data says so; known here
            result = graphopt.optimize(model, inputs, pipeline, keep_graphs=True)
        page = out / f"{name}.html"
        figures[name] = measure(result.report, page)
        shot = RESULTS / "report.png" if name == "demo" else out / f"{name}.png"
        report_browser.screenshot(page, shot, 1400, 1800)
    (out / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
