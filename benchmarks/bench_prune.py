"""Channel pruning: graphopt's ``prune-channels`` against Torch-Pruning, in one process.

    python -m benchmarks.bench_prune [--quick] [--out benchmarks/results]

1. ResNet-18 and MobileNetV2 (``graphopt.app.examples``, torchvision's architectures, random weights
   and batch-norm statistics, 1x3x224x224; ``--quick``: 1x3x96x96 and fewer timing rounds) at
   30% and 50% channel ratio: parameters, MACs (``graphopt.ir.costs``, same counting for every
   variant), pass time, latency eager and in ONNX Runtime (1 thread, all graph optimizations;
   every variant lowered with ``graphopt.lower(backend="onnx")``), timed round-robin with
   ``graphopt.app.timing.round_robin_ms`` against the unpruned model. Torch-Pruning
   (``torch-pruning``, optional) prunes the same models at the same ratio with the same
   criterion (L1 magnitude, classifier ignored, no rounding) in the same run.
2. Digits CNN (scikit-learn ``load_digits``, 8x8): a conv-BN-ReLU CNN trained with a fixed seed,
   pruned 50% by both tools; test accuracy right after pruning and after 3 epochs of
   fine-tuning (same optimizer and data order for all; batch norms in training mode: the
   ``nn.Module`` in train mode for Torch-Pruning, ``batch_norm_training(gm)`` for the graph
   module), MACs ratio. graphopt runs twice: without calibration data, and with 512 unlabeled
   training images as ``calibration_data`` (the pass then re-estimates batch-norm statistics).

Writes ``prune.json`` and ``prune.md`` (``prune_quick.*`` with ``--quick``) into ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import graphopt.backends.onnx  # noqa: F401  (registers the backend)
from graphopt.app import examples
from graphopt.passes.prune_channels import batch_norm_training
from graphopt.ir.costs import costs
from graphopt.app.timing import round_robin_ms

try:
    import torch_pruning as tp
except ImportError:  # optional peer
    tp = None

RATIOS = (0.3, 0.5)
ROUND_TO = (1, 8)  # 1: counts exactly at the ratio; 8: what mobile kernels want (the mobile-pruned preset)


# --------------------------------------------------------------------------- helpers


def _ort_session(path: Path) -> Callable[[np.ndarray], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _lower_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> tuple[Callable[[], Any], bool]:
    artifact = graphopt.lower(module, inputs, backend="onnx", path=path)
    run = _ort_session(artifact.path)
    x = inputs[0].numpy()
    return (lambda: run(x)), bool(artifact.verdict is None or artifact.verdict.ok)


def _eager(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return module(*inputs)

    return run


def _torch_pruning(model: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float,
                   classifier: nn.Module, round_to: int = 1) -> tuple[nn.Module, float]:
    pruned = copy.deepcopy(model)
    classifier = dict(pruned.named_modules())[next(n for n, m in model.named_modules() if m is classifier)]
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(pruned, inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[classifier],
                                  round_to=round_to if round_to > 1 else None)
    pruner.step()
    return pruned.eval(), time.perf_counter() - start


def _graphopt_prune(model: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float, calibration_data=None,
                    round_to: int = 1):
    result = graphopt.optimize(model, inputs, f"prune-channels{{ratio={ratio},round_to={round_to}}}", verify="none",
                               on_failure="raise", calibration_data=calibration_data)
    record = result.report.records[0]
    return result.module, record.seconds


def _costs(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    gm = module if isinstance(module, torch.fx.GraphModule) else graphopt.capture(module, inputs)
    return costs(gm)


# --------------------------------------------------------------------------- ImageNet-shaped models


def _label(row: dict[str, Any]) -> str:
    return "original" if row["tool"] == "original" else f"{row['tool']} {row['ratio']:.0%} round_to={row['round_to']}"


def bench_model(name: str, quick: bool, workdir: Path) -> list[dict[str, Any]]:
    model, inputs = getattr(examples, name)()
    if quick:
        inputs = (torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)),)
    classifier = model.fc if name == "resnet18" else model.classifier[1]
    original = graphopt.capture(model, inputs)
    base = costs(original)
    variants: dict[str, nn.Module] = {"original": original}
    rows = []
    for ratio in RATIOS:
        for round_to in ROUND_TO:
            gm, seconds = _graphopt_prune(model, inputs, ratio, round_to=round_to)
            pruned = [("graphopt", gm, seconds)]
            if tp is not None:
                pruned.append(("torch-pruning", *_torch_pruning(model, inputs, ratio, classifier, round_to)))
            for tool, module, seconds in pruned:
                row = {"model": name, "tool": tool, "ratio": ratio, "round_to": round_to, "prune_s": seconds}
                variants[_label(row)] = module
                c = _costs(module, inputs)
                rows.append({**row, "parameters": c.parameters, "macs": c.macs,
                             **{f"{k}_x": v for k, v in c.ratio(base).items()}})

    runners: dict[str, Callable[[], Any]] = {}
    lowered_ok: dict[str, bool] = {}
    for label, module in variants.items():
        runners[f"eager {label}"] = _eager(module, inputs)
        runners[f"ort {label}"], lowered_ok[label] = _lower_onnx(module, inputs, workdir / re.sub(r"[^\w]+", "-", f"{name}-{label}"))
    rounds, calls = (3, 3) if quick else (6, 5)
    ms = round_robin_ms(runners, rounds=rounds, calls=calls)
    base_row = {"model": name, "tool": "original", "ratio": 0.0, "round_to": 1, "prune_s": 0.0,
                "parameters": base.parameters, "macs": base.macs, "parameters_x": 1.0, "macs_x": 1.0, "bytes_x": 1.0}
    for row in [base_row] + rows:
        label = _label(row)
        row["eager_ms"], row["ort_ms"] = ms[f"eager {label}"], ms[f"ort {label}"]
        row["eager_speedup"] = ms["eager original"] / row["eager_ms"]
        row["ort_speedup"] = ms["ort original"] / row["ort_ms"]
        row["onnx_verified"] = lowered_ok[label]
    return [base_row] + rows


# --------------------------------------------------------------------------- digits CNN


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def _train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, train_mode: bool,
           lr: float = 1e-3) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train(train_mode)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    module.eval()


def _accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (module(x).argmax(1) == y).float().mean().item()


def bench_digits() -> list[dict[str, Any]]:
    x_train, y_train, x_test, y_test = _digits()
    torch.manual_seed(0)
    model = DigitsCNN()
    _train(model, x_train, y_train, epochs=15, seed=0, train_mode=True)
    inputs = (x_test[:1],)
    base = _costs(model, inputs)
    rows = [{"tool": "original", "accuracy": _accuracy(model, x_test, y_test), "macs_x": 1.0, "parameters_x": 1.0}]

    calibration = [(x_train[i:i + 64],) for i in range(0, 512, 64)]
    pruned_models = [("graphopt", _graphopt_prune(model, inputs, 0.5)[0]),
                     ("graphopt + calibration", _graphopt_prune(model, inputs, 0.5, calibration)[0])]
    if tp is not None:
        pruned_models.append(("torch-pruning", _torch_pruning(model, inputs, 0.5, model.fc)[0]))
    for tool, module in pruned_models:
        c = _costs(module, inputs)
        row = {"tool": tool, "accuracy_pruned": _accuracy(module, x_test, y_test), **{f"{k}_x": v for k, v in c.ratio(base).items()}}
        if isinstance(module, torch.fx.GraphModule):
            with batch_norm_training(module):
                _train(module, x_train, y_train, epochs=3, seed=1, train_mode=False)
        else:
            _train(module, x_train, y_train, epochs=3, seed=1, train_mode=True)
        row["accuracy_finetuned"] = _accuracy(module, x_test, y_test)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def _markdown(model_rows: list[dict[str, Any]], digits_rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Channel pruning ({'quick' if meta['quick'] else 'full'} run)", "",
             f"torch {meta['torch']}, torch-pruning {meta['torch_pruning']}, onnxruntime {meta['onnxruntime']}, "
             f"input {meta['input']}, 1 thread, round-robin medians.", "",
             "| model | tool | ratio | round_to | params | params x | MACs | MACs x | prune s | eager ms "
             "| eager speedup | ORT ms | ORT speedup |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in model_rows:
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['ratio']:.0%} | {r['round_to']} | {r['parameters'] / 1e6:.2f}M "
            f"| {r['parameters_x']:.2f} "
            f"| {r['macs'] / 1e6:.0f}M | {r['macs_x']:.2f} | {r['prune_s']:.2f} | {r['eager_ms']:.1f} "
            f"| {r['eager_speedup']:.2f}x | {r['ort_ms']:.1f} | {r['ort_speedup']:.2f}x |")
    lines += ["", "Digits CNN (load_digits, 25% test split), pruned 50%; calibration: 512 unlabeled training "
              "images; fine-tuning: Adam 1e-3, batch norms in training mode:", "",
              "| tool | accuracy after pruning | after 3 epochs fine-tuning | MACs x | params x |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in digits_rows:
        if r["tool"] == "original":
            lines.append(f"| original (fp32) | {r['accuracy']:.2%} | - | 1.00 | 1.00 |")
        else:
            lines.append(f"| {r['tool']} | {r['accuracy_pruned']:.2%} | {r['accuracy_finetuned']:.2%} "
                         f"| {r['macs_x']:.2f} | {r['parameters_x']:.2f} |")
    if meta["torch_pruning"] == "absent":
        lines += ["", "Torch-Pruning is not installed (`pip install torch-pruning`): peer rows skipped."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="96x96 inputs and fewer timing rounds")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime

    meta = {"quick": args.quick, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "torch_pruning": getattr(tp, "__version__", "installed") if tp is not None else "absent",
            "input": "1x3x96x96" if args.quick else "1x3x224x224", "machine": platform.processor() or platform.machine()}
    started = time.perf_counter()
    model_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet18", "mobilenet_v2"):
            model_rows += bench_model(name, args.quick, Path(tmp))
            print(f"{name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    digits_rows = bench_digits()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    text = _markdown(model_rows, digits_rows, meta)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "prune_quick" if args.quick else "prune"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "models": model_rows, "digits": digits_rows}, f, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
