"""Int8 accuracy on tasks that are not saturated: graphopt's calibration methods, its recovery
preset and mixed precision against torch.ao, ONNX Runtime and ExecuTorch, model by model.

    python -m benchmarks.bench_accuracy [--quick] [--tasks mnist1d,shapes] [--out DIR]

The digits CNN of ``bench_quantize.py`` scores the same with fp32 and every int8 method, so it
cannot tell methods apart. The two tasks here are trained in this process (fixed seeds, no
download, a few CPU-minutes together) and stay well below 100% in fp32:

- ``mnist1d``: the procedural MNIST-1D generator (``pip install mnist1d``, in the ``bench``
  extra) with a fixed seed; 40-sample signals, 10 classes. Model: a 1-D CNN of
  depthwise-separable blocks (ReLU6, hardswish).
- ``shapes``: 3x32x32 images drawn here: five shapes (disc, ring, square, triangle, cross),
  plain or striped (10 classes), at random places, sizes, angles and colours, with low
  contrast, a background gradient, a distractor blob and pixel noise. Model: a CNN of
  depthwise-separable blocks (ReLU6, hardswish) whose middle block has an outlier channel (a
  fixed gain on one channel, standing in for the large-range channels trained MobileNets grow):
  per-tensor activation ranges taken by min-max must cover it, and the other channels lose
  resolution.

Methods (rows of each task), all calibrated on the same training images (graphopt gets one batch
more, which its quantize pass holds out to measure its own error):

- fp32; graphopt ``mobile-int8`` for each calibration method (``quantize{calibration=...}``,
  ``auto`` included), the recovery preset ``mobile-int8-accurate``, mixed precision
  (``quantize{min_sqnr=...}``, and ``keep_float_worst``), config ``xnnpack``;
- torch.ao FX (``prepare_fx``/``convert_fx``, x86 qconfig); ONNX Runtime ``quantize_static``
  (QDQ, per channel) U8S8 + ``reduce_range`` and S8S8; ExecuTorch's ``XNNPACKQuantizer``
  (``torch.export``, ``prepare_pt2e``, calibration, ``convert_pt2e``; the converted module is
  evaluated, its ``.pte`` gives the size).

A variant this build does not have (an unknown pass, preset or option) is a row saying "not
available in this build"; any other failure is a row with the error.

Columns: test accuracy and its difference from fp32 in points; logit SQNR against fp32 on the
test set; where the accuracy was measured (ONNX Runtime for everything with an ONNX form, the
int8 graph in eager for graphopt when its export fails, the converted modules of torch.ao and
ExecuTorch); graphopt's QDQ graph in eager as well; file bytes (``.onnx``, torch.ao's ``.ptl``,
ExecuTorch's ``.pte``); median ONNX Runtime latency at batch 1, 1 thread, every ONNX file of a
task timed round robin (:func:`graphopt.app.timing.round_robin_ms`).

Goals, per task: graphopt's best int8 row within 0.3 points of fp32; where the best peer loses
more than 1 point, graphopt's best at least 1 point or 3 dB of SQNR ahead of it.

``--quick``: smaller data sets and fewer epochs (CI-sized); its figures check the machinery, not
the methods.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from benchmarks import bench_executorch, peers
from benchmarks.bench_quantize import (
    CALIBRATION_BATCH_SIZE,
    CALIBRATION_BATCHES,
    export_onnx,
    ort_quantize_static,
    ort_session,
    save_lite,
    sqnr_db,
    torch_ao_fx,
)
from benchmarks.report import _jsonable, package_versions

TASKS = ("mnist1d", "shapes")
MNIST1D_INSTALL = "pip install mnist1d (or pip install -e \".[bench]\")"


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A trained model and its data: ``x_*`` float32 tensors, ``y_*`` class indices."""

    name: str
    description: str
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def _bn_act(channels: int, dims: int, act: type[nn.Module]) -> list[nn.Module]:
    return [(nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels), act()]


def separable(cin: int, cout: int, stride: int, act: type[nn.Module], dims: int = 2, kernel: int = 3) -> nn.Sequential:
    """Depthwise ``kernel`` conv, BN, act; pointwise conv, BN, act (MobileNet's block)."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return nn.Sequential(conv(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False), *_bn_act(cin, dims, act),
                         conv(cin, cout, 1, bias=False), *_bn_act(cout, dims, act))


class ChannelGain(nn.Module):
    """Multiplies channel ``channel`` by ``gain`` (a fixed buffer, trained through like any
    layer): one activation channel with a range far beyond the others'."""

    def __init__(self, channels: int, gain: float, channel: int = 0):
        super().__init__()
        scale = torch.ones(1, channels, 1, 1)
        scale[0, channel] = gain
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Mnist1dNet(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, bias=False), *_bn_act(width, 1, nn.ReLU6),
            separable(width, 2 * width, 2, nn.ReLU6, dims=1, kernel=5),      # 20
            separable(2 * width, 2 * width, 2, nn.Hardswish, dims=1, kernel=5),  # 10
            separable(2 * width, 4 * width, 2, nn.Hardswish, dims=1, kernel=3),  # 5
        )
        self.classifier = nn.Linear(4 * width * 5, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class ShapesNet(nn.Module):
    def __init__(self, width: int = 16, gain: float = 12.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, padding=1, bias=False), *_bn_act(width, 2, nn.ReLU6),  # 16x16
            separable(width, 2 * width, 1, nn.ReLU6),
            separable(2 * width, 4 * width, 2, nn.Hardswish),  # 8x8
            ChannelGain(4 * width, gain),
            separable(4 * width, 4 * width, 1, nn.Hardswish),
            separable(4 * width, 8 * width, 2, nn.Hardswish),  # 4x4
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(8 * width, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0, lr: float = 3e-3,
          batch: int = 64) -> nn.Module:
    """Adam with a cosine learning rate, fixed seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def mnist1d_data(samples: int, seed: int = 42) -> tuple[torch.Tensor, ...]:
    """MNIST-1D from its procedural generator: (x_train, y_train, x_test, y_test), x (N, 1, 40).

    Raises :class:`peers.Unavailable` with the install command when ``mnist1d`` is missing."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise peers.Unavailable(f"the mnist1d package is not installed ({exc}): {MNIST1D_INSTALL}") from exc
    args = get_dataset_args()
    args.num_samples, args.seed = samples, seed
    state = np.random.get_state()  # the generator seeds numpy's global state: give it back
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    signals = [torch.tensor(data[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test")]
    labels = [torch.tensor(data[k], dtype=torch.int64) for k in ("y", "y_test")]
    return signals[0], labels[0], signals[1], labels[1]


SHAPES = ("disc", "ring", "square", "triangle", "cross")


def shapes_data(count: int, seed: int, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` 3x32x32 images and labels: class = 2 * shape + striped (see the module docstring).

    Deterministic in ``seed``; values roughly in [-1.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    labels = torch.randint(0, 10, (count,), generator=g)
    shape, striped = labels // 2, (labels % 2).bool()
    axis = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy = (u(count) - 0.5) * 0.6, (u(count) - 0.5) * 0.6
    radius = 0.4 + 0.3 * u(count)
    angle = u(count) * 2 * math.pi
    dx, dy = xx - cx.view(-1, 1, 1), yy - cy.view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    a, b = (dx * cos + dy * sin) / radius.view(-1, 1, 1), (-dx * sin + dy * cos) / radius.view(-1, 1, 1)
    dist = (a**2 + b**2).sqrt()
    triangle = (b > -0.5) & (b * 0.5 + a * 0.866 < 0.5) & (b * 0.5 - a * 0.866 < 0.5)
    masks = torch.stack([dist < 1, (dist < 1) & (dist > 0.55), (a.abs() < 0.8) & (b.abs() < 0.8), triangle,
                         ((a.abs() < 0.28) & (b.abs() < 1)) | ((b.abs() < 0.28) & (a.abs() < 1))], 1)
    mask = masks[torch.arange(count), shape].float()
    stripe_angle = (u(count) * math.pi).view(-1, 1, 1)
    frequency = (3 + 2 * u(count)).view(-1, 1, 1)
    stripes = torch.sin(frequency * (xx * stripe_angle.cos() + yy * stripe_angle.sin()) * math.pi)
    texture = torch.where(striped.view(-1, 1, 1), 0.5 + 0.5 * torch.sign(stripes), torch.ones(1))
    background = u(count, 3, 1, 1)
    sign = torch.where(u(count, 1, 1, 1) < 0.5, -1.0, 1.0)
    contrast = sign * (0.3 + 0.4 * u(count, 1, 1, 1)) * (0.6 + 0.4 * u(count, 3, 1, 1))  # a tinted lighter or darker shape
    shade = contrast * texture.unsqueeze(1)
    gradient = (u(count, 3, 1, 1) - 0.5) * 0.5 * (xx * (u(count, 1, 1, 1) - 0.5) + yy * (u(count, 1, 1, 1) - 0.5))
    blob_x, blob_y = (u(count, 1, 1) - 0.5) * 1.6, (u(count, 1, 1) - 0.5) * 1.6
    blob = ((xx - blob_x) ** 2 + (yy - blob_y) ** 2 < (0.05 + 0.1 * u(count, 1, 1)) ** 2).float()
    images = background + gradient + shade * mask.unsqueeze(1) + (u(count, 3, 1, 1) - 0.5) * blob.unsqueeze(1)
    images = images + noise * torch.randn(images.shape, generator=g)
    return ((images - 0.5) * 2).float(), labels


def mnist1d_task(quick: bool = False) -> Task:
    x_train, y_train, x_test, y_test = mnist1d_data(3000 if quick else 10000)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = train(Mnist1dNet(), x_train, y_train, epochs=4 if quick else 15)
    return Task("mnist1d", "MNIST-1D (procedural, seed 42), 1-D depthwise-separable CNN", model,
                x_train, y_train, x_test, y_test, time.perf_counter() - t0)


def shapes_task(quick: bool = False) -> Task:
    n_train, n_test = (3000, 500) if quick else (16000, 2000)
    x_train, y_train = shapes_data(n_train, seed=1)
    x_test, y_test = shapes_data(n_test, seed=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = train(ShapesNet(), x_train, y_train, epochs=3 if quick else 8)
    return Task("shapes", f"synthetic 3x32x32 images ({', '.join(SHAPES)}; plain or striped), "
                "depthwise-separable CNN with an outlier channel", model,
                x_train, y_train, x_test, y_test, time.perf_counter() - t0)


TASK_BUILDERS: dict[str, Callable[[bool], Task]] = {"mnist1d": mnist1d_task, "shapes": shapes_task}


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One row of a task: ``tool`` graphopt (``pipeline`` and ``options`` for its PassManager),
    fp32 or a peer's name; ``mixed``: the variant may keep layers in float."""

    key: str
    label: str
    tool: str
    pipeline: str = ""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    mixed: bool = False


CALIBRATIONS = ("minmax", "moving_average", "histogram", "mse", "entropy", "auto")
MIN_SQNR_DB = (30.0, 40.0)

METHODS: tuple[Method, ...] = (
    Method("fp32", "fp32", "fp32"),
    *(Method(f"graphopt-{c}", f"graphopt mobile-int8, calibration={c}", "graphopt", "mobile-int8",
             {"quantize": {"calibration": c}}) for c in CALIBRATIONS),
    Method("graphopt-accurate", "graphopt mobile-int8-accurate", "graphopt", "mobile-int8-accurate"),
    *(Method(f"graphopt-min-sqnr-{s:g}", f"graphopt mobile-int8, min_sqnr={s:g} (mixed precision)", "graphopt",
             "mobile-int8", {"quantize": {"min_sqnr": s}}, mixed=True) for s in MIN_SQNR_DB),
    Method("graphopt-keep-float-1", "graphopt mobile-int8, keep_float_worst=1", "graphopt", "mobile-int8",
           {"quantize": {"keep_float_worst": 1}}, mixed=True),
    Method("graphopt-xnnpack", "graphopt mobile-int8, config=xnnpack", "graphopt", "mobile-int8",
           {"quantize": {"config": "xnnpack"}}),
    Method("torch-ao-fx", "torch.ao FX x86 (prepare_fx/convert_fx)", "torch.ao"),
    Method("ort-u8s8", "ORT quantize_static U8S8 reduce_range", "onnxruntime"),
    Method("ort-s8s8", "ORT quantize_static S8S8", "onnxruntime"),
    Method("et-xnnpack", "ExecuTorch XNNPACKQuantizer (pt2e)", "executorch"),
)


class NotInBuild(Exception):
    """graphopt in this checkout lacks the pass, preset or option a variant names."""


@dataclass
class Built:
    """What a method produced: a callable on a batch of inputs giving logits (numpy), and where
    they come from; optionally an ONNX file (timed in ONNX Runtime) and another artifact."""

    run: Callable[[torch.Tensor], np.ndarray]
    runtime: str
    onnx: Path | None = None
    artifact: Path | None = None
    graph_run: Callable[[torch.Tensor], np.ndarray] | None = None
    note: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _numpy(module: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], np.ndarray]:
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(module(x))
    return run


def graphopt_method(method: Method, model: nn.Module, example: torch.Tensor, calibration: list, work: Path) -> Built:
    import graphopt.passes  # noqa: F401  (registers every built-in pass and preset)

    import graphopt
    from graphopt.errors import PipelineError

    try:  # names and options are checked here, before anything runs
        manager = graphopt.PassManager(method.pipeline, verify="none", on_failure="raise", options=method.options)
    except PipelineError as exc:
        raise NotInBuild(f"not available in this build: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = manager.run(model, (example,), calibration_data=calibration)
    figures: dict[str, Any] = {"pass_seconds": sum(r.seconds for r in result.report.records)}
    quantize = [r for r in result.report.records if r.name == "quantize"]
    if quantize and "held_out_sqnr_db" in quantize[-1].figures:
        figures["pass_held_out_sqnr_db"] = quantize[-1].figures["held_out_sqnr_db"]
    note = ""
    if quantize and quantize[-1].figures.get("kept_float"):  # what mixed precision (or keep_float_worst) left float
        kept, fraction = quantize[-1].figures["kept_float"], quantize[-1].figures.get("float_fraction", 0.0)
        figures["kept_float"], figures["float_fraction"] = sorted(kept), fraction
        note = f"float: {', '.join(sorted(kept))} ({fraction:.0%} of convs and linears)"
    graph_run = _numpy(result.module)
    try:
        path = export_onnx(result.module, example, work / f"{method.key}.onnx", dynamic_batch=True)
    except Exception as exc:  # the QDQ graph still has an accuracy; the row says why ONNX is missing
        from graphopt.lowering import exception_summary

        return Built(graph_run, "graphopt QDQ graph, eager", graph_run=graph_run, figures=figures,
                     note=f"ONNX export failed: {exception_summary(exc)}")
    return Built(ort_session(path), "ONNX Runtime", onnx=path, graph_run=graph_run, figures=figures, note=note)


def torch_ao_method(model: nn.Module, example: torch.Tensor, calibration: list, work: Path) -> Built:
    converted = torch_ao_fx(model, example, calibration)
    built = Built(_numpy(converted), "torch.ao converted module (x86 kernels)")
    try:
        built.artifact = save_lite(converted, work / "torch-ao.ptl")
    except Exception as exc:
        built.note = f"no .ptl: {peers._first_line(exc)}"
    return built


def ort_method(fp32_onnx: Path, u8s8: bool, calibration: list, work: Path) -> Built:
    path = ort_quantize_static(fp32_onnx, work / f"ort-{'u8s8' if u8s8 else 's8s8'}.onnx", calibration, u8s8)
    return Built(ort_session(path), "ONNX Runtime", onnx=path)


def executorch_method(model: nn.Module, example: torch.Tensor, calibration: list, work: Path) -> Built:
    """torch.export at the calibration batch size, XNNPACKQuantizer through pt2e; the converted
    module runs the test set in batches of that size (the last one padded)."""
    quantizer, prepare_pt2e, convert_pt2e = bench_executorch._xnnpack_quantizer()
    size = example.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(model).eval(), (example,))
        prepared = prepare_pt2e(exported.module(), quantizer)
        with torch.no_grad():
            for batch in bench_executorch.fitted_batches(calibration, (example,)):
                prepared(*batch)
        converted = convert_pt2e(prepared)

    def run(x: torch.Tensor) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for chunk in x.split(size):
                padded = torch.cat([chunk, chunk.new_zeros(size - len(chunk), *chunk.shape[1:])]) if len(chunk) < size else chunk
                outs.append(converted(padded)[: len(chunk)])
        return torch.cat(outs).numpy()

    built = Built(run, "pt2e converted module (QDQ in float)")
    try:
        from graphopt.backends import executorch as backend

        et = backend.executorch_modules()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = et.to_edge_transform_and_lower(torch.export.export(converted, (example,)),
                                                  partitioner=[et.XnnpackPartitioner()])
            built.artifact = work / "executorch-int8.pte"
            built.artifact.write_bytes(edge.to_executorch().buffer)
    except Exception as exc:
        built.note = f"no .pte: {peers._first_line(exc)}"
    return built


def build(method: Method, model: nn.Module, example: torch.Tensor, calibration: list, fp32_onnx: Path,
          work: Path) -> Built:
    """``calibration``: graphopt's batches, the held-out one last; peers get them without it."""
    peer_batches = calibration[:-1]
    if method.tool == "fp32":
        return Built(ort_session(fp32_onnx), "ONNX Runtime", onnx=fp32_onnx, graph_run=_numpy(model))
    if method.tool == "graphopt":
        return graphopt_method(method, model, example, calibration, work)
    if method.tool == "torch.ao":
        return torch_ao_method(model, example, peer_batches, work)
    if method.tool == "onnxruntime":
        return ort_method(fp32_onnx, method.key == "ort-u8s8", peer_batches, work)
    if method.tool == "executorch":
        return executorch_method(model, example, peer_batches, work)
    raise ValueError(f"unknown tool {method.tool!r}")


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, NotInBuild):
        return "not available", str(exc)
    return bench_executorch._failure(exc)


# ----------------------------------------------------------------------------- one task


def calibration_batches(x_train: torch.Tensor, seed: int = 1) -> list[tuple[torch.Tensor]]:
    """:data:`CALIBRATION_BATCHES` batches of training inputs plus one for graphopt to hold out."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x_train), generator=g)[: (CALIBRATION_BATCHES + 1) * CALIBRATION_BATCH_SIZE]
    return [(x_train[i],) for i in pick.split(CALIBRATION_BATCH_SIZE)]


def bench_task(task: Task, methods: tuple[Method, ...], work: Path, rounds: int, calls: int,
               show: Callable[[str], None] = lambda what: None) -> dict[str, Any]:
    from graphopt.app.timing import round_robin_ms

    (work / task.name).mkdir(parents=True, exist_ok=True)
    calibration = calibration_batches(task.x_train)
    example = calibration[0][0]
    with torch.no_grad():
        reference = task.model(task.x_test).numpy()
    labels = task.y_test.numpy()
    fp32_onnx = export_onnx(task.model, example, work / f"{task.name}-fp32.onnx", dynamic_batch=True)
    rows: list[dict[str, Any]] = []
    sessions: dict[str, Callable[[], Any]] = {}
    single = task.x_test[:1]
    for method in methods:
        show(f"{task.name}: {method.label}")
        row: dict[str, Any] = {"key": method.key, "variant": method.label, "tool": method.tool,
                               "mixed_precision": method.mixed, "status": "ok",
                               "reason": "", "note": "", "runtime": None, "accuracy": None, "sqnr_db": None,
                               "graph_accuracy": None, "bytes": None, "latency_ms": None, "seconds": None}
        t0 = time.perf_counter()
        try:
            built = build(method, task.model, example, calibration, fp32_onnx, work / task.name)
            logits = built.run(task.x_test)
        except Exception as exc:
            row["status"], row["reason"] = _failure(exc)
            rows.append(row)
            continue
        row["seconds"] = time.perf_counter() - t0
        row.update(runtime=built.runtime, note=built.note, **built.figures,
                   accuracy=float((logits.argmax(1) == labels).mean() * 100), sqnr_db=sqnr_db(reference, logits))
        if built.graph_run is not None:
            row["graph_accuracy"] = float((built.graph_run(task.x_test).argmax(1) == labels).mean() * 100)
        artifact = built.onnx or built.artifact
        if artifact is not None:
            row["bytes"], row["file"] = artifact.stat().st_size, artifact.suffix
        if built.onnx is not None:
            sessions[method.key] = (lambda r=built.run: r(single))
        rows.append(row)
    show(f"{task.name}: ONNX Runtime latency")
    latency = round_robin_ms(sessions, rounds=rounds, calls=calls) if sessions else {}
    for row in rows:
        row["latency_ms"] = latency.get(row["key"])
    return {"task": task.name, "description": task.description, "train_seconds": task.train_seconds,
            "train_images": len(task.y_train), "test_images": len(task.y_test),
            "calibration_images": CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE,
            "parameters": sum(p.numel() for p in task.model.parameters()), "rows": rows,
            "goals": goals(rows)}


# ----------------------------------------------------------------------------- goals


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """graphopt's best int8 row (accuracy, then SQNR) against fp32 and against the best peer.

    Mixed-precision rows count; the detail names the best row that keeps no layer float too."""
    ok = [r for r in rows if r["status"] == "ok"]
    fp32 = next((r for r in ok if r["tool"] == "fp32"), None)
    ours = [r for r in ok if r["tool"] == "graphopt"]
    theirs = [r for r in ok if r["tool"] not in ("graphopt", "fp32")]
    if fp32 is None or not ours:
        return [{"goal": "graphopt int8 within 0.3 points of fp32", "verdict": "not measured",
                 "detail": "no fp32 row" if fp32 is None else "no graphopt int8 row ran"}]
    def rank(row: dict[str, Any]) -> tuple[float, float]:
        return row["accuracy"], row["sqnr_db"]

    best = max(ours, key=rank)
    loss = fp32["accuracy"] - best["accuracy"]
    detail = f"{best['accuracy']:.2f}% vs fp32 {fp32['accuracy']:.2f}% ({-loss:+.2f} points)"
    if best.get("mixed_precision"):
        whole = [r for r in ours if not r.get("mixed_precision")]
        top = max(whole, key=rank) if whole else None
        detail += "; " + (f"best all-int8 row {top['variant']} {top['accuracy']:.2f}%" if top else "no all-int8 row ran")
    found = [{"goal": "graphopt int8 within 0.3 points of fp32", "verdict": "met" if loss <= 0.3 else "missed",
              "graphopt": best["variant"], "detail": detail}]
    if not theirs:
        return found + [{"goal": "ahead of the best peer", "verdict": "not measured", "detail": "no peer row ran"}]
    peer = max(theirs, key=rank)
    peer_loss = fp32["accuracy"] - peer["accuracy"]
    ahead_points, ahead_db = best["accuracy"] - peer["accuracy"], best["sqnr_db"] - peer["sqnr_db"]
    detail = (f"best peer {peer['variant']} {peer['accuracy']:.2f}% ({-peer_loss:+.2f} points), {peer['sqnr_db']:.1f} dB; "
              f"graphopt {ahead_points:+.2f} points, {ahead_db:+.1f} dB")
    if peer_loss <= 1.0:
        verdict = "not applicable (the best peer loses at most 1 point)"
    else:
        verdict = "met" if ahead_points >= 1.0 or ahead_db >= 3.0 else "missed"
    return found + [{"goal": "1 point or 3 dB ahead of the best peer where it loses > 1 point", "verdict": verdict,
                     "graphopt": best["variant"], "peer": peer["variant"], "detail": detail}]


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    from benchmarks.report import _bytes, _table

    lines = [f"# Int8 accuracy benchmark{' (quick)' if report['quick'] else ''}", "",
             f"{report['machine']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".", ""]
    for t in report["tasks"]:
        lines += [f"## {t['task']}", ""]
        if t.get("status") in ("unavailable", "failed"):
            lines += [f"{t['status']}: {t['reason']}", ""]
            continue
        fp32 = next((r["accuracy"] for r in t["rows"] if r["tool"] == "fp32" and r["status"] == "ok"), None)
        lines += [(f"{t['description']}. {t['train_images']} training and {t['test_images']} test examples, "
                   f"{t['parameters']:,} parameters, trained in {t['train_seconds']:.0f} s; calibration on "
                   f"{t['calibration_images']} training examples. SQNR: logits against fp32 on the test set. "
                   "Latency: ONNX Runtime, batch 1, 1 thread, median."), ""]
        table = []
        for r in t["rows"]:
            if r["status"] != "ok":
                table.append([r["variant"], r["status"], "", "", "", "", "", "", r["reason"][:240]])
                continue
            diff = "" if fp32 is None else f"{r['accuracy'] - fp32:+.2f}"
            table.append([r["variant"], f"{r['accuracy']:.2f}", diff, _fmt(r["sqnr_db"], ".1f"),
                          _fmt(r["graph_accuracy"], ".2f"), r["runtime"],
                          (_bytes(r["bytes"]) + f" {r.get('file', '')}").strip(), _fmt(r["latency_ms"], ".3f"), r["note"]])
        lines += [_table(["variant", "accuracy %", "vs fp32", "SQNR dB", "graph acc %", "measured in", "file",
                          "ORT ms", "note"], table, "lrrrrllrl"), ""]
        lines += [f"- {g['goal']}: **{g['verdict']}** — {g.get('graphopt', '')}: {g['detail']}" for g in t["goals"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data sets and few epochs (CI)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, any of {', '.join(TASKS)}")
    ap.add_argument("--out", default="benchmarks/results", help="folder for accuracy.json and accuracy.md")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        ap.error(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    rounds, calls = (2, 5) if args.quick else (6, 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.quantized.engine = "x86"

    def show(what: str) -> None:
        print(what, file=sys.stderr, flush=True)

    versions = package_versions(("torch", "onnxruntime", "executorch", "torchao", "mnist1d"))
    report: dict[str, Any] = {"quick": args.quick, "versions": versions, "tasks": [],
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="graphopt-accuracy-") as tmp:
        for name in tasks:
            show(f"{name}: data and training")
            try:
                task = TASK_BUILDERS[name](args.quick)
                report["tasks"].append(bench_task(task, METHODS, Path(tmp), rounds, calls, show))
            except Exception as exc:  # the task itself could not be built: its section says why
                status, reason = _failure(exc)
                report["tasks"].append({"task": name, "status": status, "reason": reason, "rows": [], "goals": []})
    stem = "accuracy_quick" if args.quick else "accuracy"
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(report), indent=1, default=str) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
