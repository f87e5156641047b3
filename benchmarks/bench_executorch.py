"""ExecuTorch: graphopt's fp32 and int8 results, lowered by its ``executorch`` backend, against
ExecuTorch's own flow on the original model, in the same runtime, process and run.

    python -m benchmarks.bench_executorch [--quick] [--threads 1,2] [--models resnet18,mobilenet_v2] [--runs 30] [--out DIR]

Flows (rows of each model), every one ending in a ``.pte`` file run by ``executorch.runtime``:

- ExecuTorch fp32: ``torch.export`` of the original model, ``to_edge_transform_and_lower`` with
  the ``XnnpackPartitioner``, ``to_executorch`` (the flow ExecuTorch documents for XNNPACK).
- graphopt mobile-fp32: ``graphopt.optimize(model, inputs, "mobile-fp32")``, then
  ``graphopt.lower(..., backend="executorch")`` (the same partitioner; graphopt also reloads the
  file and verifies it). Every pipeline runs with graphopt's default verification.
- ExecuTorch int8: its ``XNNPACKQuantizer`` (``get_symmetric_quantization_config(is_per_channel=True)``)
  through torchao's ``prepare_pt2e`` / calibration / ``convert_pt2e`` on the exported model, then
  the fp32 flow on the result.
- graphopt int8, config xnnpack: :data:`INT8_XNNPACK` (signed activations, what XNNPACK's int8
  kernels take), lowered as above.
- graphopt mobile-int8 (config x86): the default int8 preset; the backend turns its uint8
  activations into int8, exactly.

Both int8 flows calibrate on the same data: the model's example shape filled with random
values for the latency models, 256 training images for the digits CNN. graphopt is given one
batch more, which its quantize pass holds out to measure its own error (as in
``benchmarks/bench_quantize.py``); ExecuTorch's exported program has the example's fixed shape,
so its calibration batches are cut to that size.

Columns:

- ``<t>T ms``: median latency at ``t`` threads. ExecuTorch's thread pool is sized with
  ``graphopt.backends.executorch.set_threads(t)`` and every program is loaded after that, so no
  method keeps a pool of another size. Every row runs the same way (``Method.execute`` on the
  example inputs; graphopt's ``Artifact.run`` would add a copy of the outputs) and all rows of a
  model are timed round robin (:func:`graphopt.app.timing.round_robin_ms`: 3 warm-up calls each, then
  rounds of 5 calls).
- ``x ET fp32``: ExecuTorch fp32's median over the row's, same thread count (higher is faster).
- ``.pte``: size of the file.
- ``max err``, ``SQNR``: the program's output against the original model in eager fp32 on a
  random input none of the flows saw (neither example nor calibration).
- ``XNNPACK / portable ops``: operators inside XNNPACK subgraphs and operators left on
  ExecuTorch's portable kernels, counted for every row by
  :func:`graphopt.backends.executorch.delegation` on the edge program.
- ``compile s``: wall time from the ``nn.Module`` to the ``.pte`` on disk. graphopt's includes
  the verification after each pass and the reload and verification of the file that
  ``graphopt.lower`` does; the JSON splits every flow into its steps. The digits CNN goes first
  and warms both flows up, so neither pays for first imports in the model tables.

Accuracy: the digits CNN of ``bench_quantize`` (trained here with a fixed seed), exported at
batch 1; the test images run one by one in the ExecuTorch runtime, 1 thread.

Goals, per model and thread count: graphopt fp32 at least as fast as ExecuTorch fp32 and each
graphopt int8 flow at least as fast as ExecuTorch int8 ("missed, within noise": less than 10%
slower); each graphopt int8 flow's SQNR at least ExecuTorch int8's; on the digits CNN, graphopt's
int8 accuracy at least ExecuTorch's.

``--quick``: the small built-ins ``resnet_cnn`` and ``mobilenet_cnn`` (2x3x32x32), the first
thread count only, 10 timed calls. Without the executorch package every row is "unavailable"
with the reason, and the files are still written.
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from benchmarks import bench_fp32, peers
from benchmarks.bench_quantize import CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES, digits_data, sqnr_db, train_digits
from benchmarks.report import _bytes, _err, _jsonable, _ms, _table, package_versions

#: graphopt's int8 pipeline for XNNPACK: mobile-int8 with the xnnpack quantization config
INT8_XNNPACK = "mobile-fp32,quantize{config=xnnpack},fold-weight-quantization,eliminate-dead-code"
MODELS = {"full": ("resnet18", "mobilenet_v2"), "quick": ("resnet_cnn", "mobilenet_cnn")}
RUNS = {"full": 30, "quick": 10}


@dataclass(frozen=True)
class Flow:
    """One way from the original model to a ``.pte``."""

    key: str
    label: str
    tool: str  # "executorch" (its own flow) or "graphopt"
    precision: str  # "fp32" or "int8"
    pipeline: str | None = None  # graphopt's pipeline


FLOWS = (
    Flow("et-fp32", "ExecuTorch fp32 (its own flow)", "executorch", "fp32"),
    Flow("graphopt-fp32", "graphopt mobile-fp32", "graphopt", "fp32", "mobile-fp32"),
    Flow("et-int8", "ExecuTorch int8 (XNNPACKQuantizer)", "executorch", "int8"),
    Flow("graphopt-int8", "graphopt int8, config xnnpack", "graphopt", "int8", INT8_XNNPACK),
    Flow("graphopt-int8-x86", "graphopt mobile-int8 (config x86)", "graphopt", "int8", "mobile-int8"),
)
#: each graphopt flow and the ExecuTorch flow it must match
RIVALS = {"graphopt-fp32": "et-fp32", "graphopt-int8": "et-int8", "graphopt-int8-x86": "et-int8"}


@dataclass
class Built:
    """A ``.pte`` a flow wrote, what making it cost and how ExecuTorch partitioned it."""

    path: Path
    steps_s: dict[str, float]
    delegated: dict[str, int]
    portable: dict[str, int]
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the flows


def unavailable_reason() -> str | None:
    """Why the ExecuTorch rows cannot be built here, or None when they can."""
    from graphopt.errors import LoweringError

    try:
        from graphopt.backends import executorch as backend

        backend.executorch_modules()
    except (ImportError, LoweringError) as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _step(steps: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - start


def _xnnpack_quantizer() -> tuple[Any, Callable[..., Any], Callable[..., Any]]:
    """ExecuTorch's XNNPACK quantizer (per-channel symmetric) and torchao's pt2e prepare/convert."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise peers.Unavailable(f"ExecuTorch's XNNPACK quantizer does not import: {exc}") from exc
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantizer, prepare_pt2e, convert_pt2e


def executorch_flow(model: nn.Module, inputs: tuple[Any, ...], path: Path,
                    calibration: list[tuple[Any, ...]] | None = None) -> Built:
    """ExecuTorch's own path from ``model`` to ``path``; int8 when ``calibration`` is given
    (batches shaped like ``inputs``)."""
    from graphopt.backends import executorch as backend

    et = backend.executorch_modules()
    steps: dict[str, float] = {}
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _step(steps, "export"):
            exported = torch.export.export(model, inputs)
        if calibration is not None:
            quantizer, prepare_pt2e, convert_pt2e = _xnnpack_quantizer()
            with _step(steps, "quantize"):
                prepared = prepare_pt2e(exported.module(), quantizer)
                with torch.no_grad():
                    for batch in calibration:
                        prepared(*batch)
                converted = convert_pt2e(prepared)
            with _step(steps, "export"):
                exported = torch.export.export(converted, inputs)
        with _step(steps, "lower"):
            edge = et.to_edge_transform_and_lower(exported, partitioner=[et.XnnpackPartitioner()])
        delegated, portable, _, _ = backend.delegation(edge.exported_program().graph_module)
        with _step(steps, "lower"):
            path.write_bytes(edge.to_executorch().buffer)
    return Built(path, steps, dict(delegated), dict(portable))


def graphopt_flow(model: nn.Module, inputs: tuple[Any, ...], path: Path, pipeline: str,
                  calibration: list[tuple[Any, ...]] | None = None) -> Built:
    """graphopt's ``pipeline`` (int8 when ``calibration`` is given), then
    ``graphopt.lower(..., backend="executorch")``."""
    import graphopt
    import graphopt.passes  # noqa: F401  (registers the passes and presets the pipelines name)

    steps: dict[str, float] = {}
    manager = graphopt.PassManager(pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _step(steps, "pipeline"):
            result = manager.run(model, inputs, calibration_data=calibration)
        rolled_back = "; ".join(f"{r.name} {r.status}: {r.error}" for r in result.report.failed)
        if rolled_back and calibration is not None:
            # without its quantize pass the graph is fp32: timing it as int8 would mislead
            raise RuntimeError(f"pipeline: {rolled_back}"[:400])
        with _step(steps, "lower"):
            artifact = graphopt.lower(result.module, inputs, backend="executorch", path=path)
    report = artifact.report
    steps.update({f"lower: {k}": v for k, v in report["timings_s"].items()})
    notes = [f"passes {rolled_back}"] if rolled_back else []
    if report.get("converted_uint8_nodes"):
        notes.append(f"{report['converted_uint8_nodes']} uint8 q/dq nodes made int8")
    return Built(artifact.path, steps, dict(report["delegated_ops"]), dict(report["portable_ops"]), "; ".join(notes),
                 {"verification": str(artifact.verdict)})


def build(flow: Flow, model: nn.Module, inputs: tuple[Any, ...], path: Path,
          calibration: list[tuple[Any, ...]]) -> Built:
    """Run ``flow``. ``calibration``: graphopt's batches, its held-out one last (any batch size);
    ExecuTorch gets the same ones without the held-out batch, cut to the example's size."""
    int8 = flow.precision == "int8"
    if flow.tool == "graphopt":
        return graphopt_flow(model, inputs, path, flow.pipeline, calibration if int8 else None)
    return executorch_flow(model, inputs, path, fitted_batches(calibration[:-1], inputs) if int8 else None)


def fitted_batches(batches: list[tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """``batches`` cut along dimension 0 into batches of the example's size, remainders dropped:
    an exported program takes only the shape it was exported with."""
    size = inputs[0].shape[0]
    fitted = []
    for batch in batches:
        for start in range(0, batch[0].shape[0] - size + 1, size):
            fitted.append(tuple(x[start:start + size] for x in batch))
    return fitted


def pte_runner(path: Path) -> Callable[..., list[torch.Tensor]]:
    """The program's ``forward`` in the ExecuTorch runtime. Its outputs are views of the
    runtime's memory that the next call overwrites: copy what must be kept."""
    from graphopt.backends import executorch as backend
    from graphopt.fileio import native_stdout_discarded

    et = backend.executorch_modules()
    with native_stdout_discarded(stderr=True):  # XNNPACK logs its CPU probing
        method = et.Runtime.get().load_program(path).load_method("forward")
    return lambda *inputs: method.execute(list(inputs))


def set_threads(count: int) -> None:
    """Size ExecuTorch's thread pool; load programs after this, not before."""
    from graphopt.backends import executorch as backend
    from graphopt.fileio import native_stdout_discarded

    with native_stdout_discarded(stderr=True):  # the runtime logs every resize
        backend.set_threads(count)


def _failure(exc: BaseException) -> tuple[str, str]:
    from graphopt.lowering import exception_summary

    if isinstance(exc, peers.Unavailable):
        return "unavailable", str(exc)
    return "failed", exception_summary(exc)


# ---------------------------------------------------------------------------------- models


def _row(model: str, flow: Flow) -> dict[str, Any]:
    return {"model": model, "key": flow.key, "label": flow.label, "tool": flow.tool, "precision": flow.precision,
            "status": "ok", "reason": "", "note": "", "latency_ms": {}, "vs_et_fp32": {}, "pte_bytes": None,
            "max_abs_error": None, "sqnr_db": None, "xnnpack_ops": None, "portable_ops": None,
            "xnnpack_op_counts": {}, "portable_op_counts": {}, "compile_s": None, "steps_s": {}}


def bench_model(name: str, threads: list[int], runs: int, workdir: Path,
                on_step: Callable[[str], None] = lambda what: None) -> dict[str, Any]:
    """Every flow of one model, built, checked against eager fp32 and timed at each thread count."""
    model, inputs = bench_fp32.load_model(name)
    rows = {flow.key: _row(name, flow) for flow in FLOWS}
    result = {"model": name, "input_shapes": [list(x.shape) for x in inputs], "rows": list(rows.values())}
    reason = unavailable_reason()
    if reason is not None:
        for row in rows.values():
            row["status"], row["reason"] = "unavailable", reason
        return result
    calibration = bench_fp32.calibration_batches(inputs, count=CALIBRATION_BATCHES + 1)
    check = bench_fp32.calibration_batches(inputs, count=1, seed=2)[0]
    with torch.no_grad():
        reference = model(*check)
    built: dict[str, Built] = {}
    for flow in FLOWS:
        on_step(f"{name}: {flow.label}")
        row = rows[flow.key]
        try:
            b = build(flow, model, inputs, workdir / f"{name}-{flow.key}.pte", calibration)
        except Exception as exc:
            row["status"], row["reason"] = _failure(exc)
            continue
        built[flow.key] = b
        row.update(pte_bytes=b.path.stat().st_size, xnnpack_ops=sum(b.delegated.values()),
                   portable_ops=sum(b.portable.values()), xnnpack_op_counts=b.delegated, portable_op_counts=b.portable,
                   compile_s=sum(v for k, v in b.steps_s.items() if ":" not in k), steps_s=b.steps_s, note=b.note,
                   **b.details)
    rounds, calls = bench_fp32._schedule(runs)
    result["load_average_before_timing"] = os.getloadavg()[0]
    for t in threads:
        set_threads(t)
        runners: dict[str, Callable[[], Any]] = {}
        for key, b in built.items():
            row = rows[key]
            if row["status"] != "ok":
                continue
            try:
                run = pte_runner(b.path)
                if row["sqnr_db"] is None:
                    out = run(*check)[0].clone()
                    row["max_abs_error"] = float((out.double() - reference.double()).abs().max())
                    row["sqnr_db"] = sqnr_db(reference.numpy(), out.numpy())
                run(*inputs)
            except Exception as exc:
                row["status"], row["reason"] = _failure(exc)
                continue
            runners[key] = lambda run=run: run(*inputs)
        on_step(f"{name}: timing {len(runners)} programs, {t} thread{'s' if t > 1 else ''}")
        for key, ms in round_robin(runners, rounds, calls).items():
            rows[key]["latency_ms"][str(t)] = ms
    result["load_average_after_timing"] = os.getloadavg()[0]
    base = rows["et-fp32"]["latency_ms"]
    for row in rows.values():
        row["vs_et_fp32"] = {t: base[t] / ms for t, ms in row["latency_ms"].items() if t in base}
    return result


def round_robin(runners: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    from graphopt.app.timing import round_robin_ms

    return round_robin_ms(runners, rounds=rounds, calls=calls) if runners else {}


# ---------------------------------------------------------------------------------- digits


def digits_calibration(x_train: torch.Tensor, seed: int = 1) -> list[tuple[torch.Tensor]]:
    """Batches of training images for calibration, the last one for graphopt to hold out."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x_train), generator=g)[: (CALIBRATION_BATCHES + 1) * CALIBRATION_BATCH_SIZE]
    return [(x_train[i],) for i in pick.split(CALIBRATION_BATCH_SIZE)]


def bench_digits(workdir: Path, on_step: Callable[[str], None] = lambda what: None) -> dict[str, Any]:
    """Accuracy of every flow on the digits CNN, run in the ExecuTorch runtime."""
    reason = unavailable_reason()
    if reason is not None:
        return {"status": "unavailable", "reason": reason, "rows": []}
    on_step("digits CNN: training")
    x_train, y_train, x_test, y_test = digits_data()
    t0 = time.perf_counter()
    model = train_digits(x_train, y_train)
    train_s = time.perf_counter() - t0
    calibration = digits_calibration(x_train)
    example = (x_train[:1],)
    with torch.no_grad():
        reference = model(x_test)
    rows: list[dict[str, Any]] = []

    def add(variant: str, key: str, logits: torch.Tensor | None, size: int | None, status: str = "ok",
            reason: str = "") -> None:
        row = {"variant": variant, "key": key, "status": status, "reason": reason, "bytes": size}
        if logits is not None:
            row["accuracy"] = float((logits.argmax(1) == y_test).double().mean() * 100)
            row["sqnr_db"] = sqnr_db(reference.numpy(), logits.numpy())
        rows.append(row)

    add("fp32, eager", "eager", reference, None)
    set_threads(1)
    for flow in FLOWS:
        on_step(f"digits CNN: {flow.label}")
        try:
            b = build(flow, model, example, workdir / f"digits-{flow.key}.pte", calibration)
            run = pte_runner(b.path)
            logits = torch.cat([run(x)[0].clone() for x in x_test.split(1)])
        except Exception as exc:
            add(flow.label, flow.key, None, None, *_failure(exc))
            continue
        add(flow.label, flow.key, logits, b.path.stat().st_size)
    return {"status": "ran", "train_seconds": train_s, "test_images": len(y_test),
            "calibration_images": CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE, "rows": rows}


# ----------------------------------------------------------------------------------- goals


def _verdict(ratio: float, noise: float) -> str:
    return "met" if ratio >= 1.0 else "missed, within noise" if ratio >= 1 - noise else "missed"


def goals(models: list[dict[str, Any]], digits: dict[str, Any]) -> list[dict[str, Any]]:
    """Each graphopt flow against its ExecuTorch rival: speed per model and thread count, int8
    SQNR per model, int8 accuracy on the digits CNN."""
    verdicts = []
    for m in models:
        rows = {r["key"]: r for r in m["rows"] if r["status"] == "ok"}
        for ours, theirs in RIVALS.items():
            if ours not in rows or theirs not in rows:
                continue
            mine, rival = rows[ours], rows[theirs]
            for t, ms in mine["latency_ms"].items():
                if t in rival["latency_ms"]:
                    ratio = rival["latency_ms"][t] / ms
                    verdicts.append({"goal": "at least as fast", "model": m["model"], "threads": t, "graphopt": mine["label"],
                                     "executorch": rival["label"], "graphopt_value": ms, "executorch_value": rival["latency_ms"][t],
                                     "unit": "ms", "verdict": _verdict(ratio, bench_fp32.NOISE)})
            if mine["precision"] == "int8" and mine["sqnr_db"] is not None and rival["sqnr_db"] is not None:
                verdicts.append({"goal": "SQNR vs eager fp32 at least as high", "model": m["model"], "threads": "",
                                 "graphopt": mine["label"], "executorch": rival["label"], "graphopt_value": mine["sqnr_db"],
                                 "executorch_value": rival["sqnr_db"], "unit": "dB",
                                 "verdict": "met" if mine["sqnr_db"] >= rival["sqnr_db"] else "missed"})
    accuracy = {r["key"]: r for r in digits.get("rows", []) if "accuracy" in r}
    for ours, theirs in RIVALS.items():
        if ours in accuracy and theirs in accuracy and ours != "graphopt-fp32":
            mine, rival = accuracy[ours], accuracy[theirs]
            verdicts.append({"goal": "digits accuracy at least as high", "model": "digits CNN", "threads": "",
                             "graphopt": mine["variant"], "executorch": rival["variant"], "graphopt_value": mine["accuracy"],
                             "executorch_value": rival["accuracy"], "unit": "%",
                             "verdict": "met" if mine["accuracy"] >= rival["accuracy"] else "missed"})
    return verdicts


# ---------------------------------------------------------------------------------- report


def _value(x: float, unit: str) -> str:
    return f"{_ms(x)} ms" if unit == "ms" else f"{x:.2f} %" if unit == "%" else f"{x:.1f} dB"


def _sqnr(x: float | None) -> str:
    return "" if x is None else "inf" if math.isinf(x) else f"{x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    threads = report["threads"]
    lines = [f"# ExecuTorch: graphopt against ExecuTorch's own flow{' (quick)' if report['quick'] else ''}", "",
             f"{report['machine']}; torch {report['versions']['torch']}, executorch {report['versions']['executorch']}, "
             f"torchao {report['versions']['torchao']}. Median of {report['runs']} calls per program and thread count, "
             "all programs of a model timed round robin in one process; the machine is shared, so compare rows "
             "within a column. Columns: `benchmarks/bench_executorch.py`'s docstring.", ""]
    if report["goals"]:
        lines += ["## Goals", "", _table(["goal", "model", "threads", "graphopt", "value", "ExecuTorch", "value", "verdict"],
                                         [[g["goal"], g["model"], g["threads"], g["graphopt"], _value(g["graphopt_value"], g["unit"]),
                                           g["executorch"], _value(g["executorch_value"], g["unit"]), g["verdict"]]
                                          for g in report["goals"]], "llrlrlrl"), ""]
    for m in report["models"]:
        shape = " ".join("x".join(map(str, s)) for s in m["input_shapes"])
        header = ["flow"]
        for t in threads:
            header += [f"{t}T ms", f"{t}T x ET fp32"]
        header += [".pte", "max err", "SQNR dB", "XNNPACK / portable ops", "compile s", "note"]
        body = []
        for r in m["rows"]:
            cells = [r["label"]]
            for t in map(str, threads):
                ratio = r["vs_et_fp32"].get(t)
                cells += [_ms(r["latency_ms"].get(t)), "" if ratio is None else f"{ratio:.2f}"]
            ops = "" if r["xnnpack_ops"] is None else f"{r['xnnpack_ops']} / {r['portable_ops']}"
            note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            cells += [_bytes(r["pte_bytes"]), _err(r["max_abs_error"]), _sqnr(r["sqnr_db"]), ops,
                      "" if r["compile_s"] is None else f"{r['compile_s']:.1f}", note]
            body.append(cells)
        lines += [f"## {m['model']} ({shape}): ExecuTorch runtime", "",
                  _table(header, body, "l" + "r" * (len(header) - 2) + "l")]
        if "load_average_before_timing" in m:
            lines += ["", f"1-minute load average {m['load_average_before_timing']:.1f} before timing and "
                          f"{m['load_average_after_timing']:.1f} after, on {os.cpu_count()} CPUs."]
        lines.append("")
    d = report["digits"]
    lines += ["## Digits CNN accuracy in the ExecuTorch runtime", ""]
    if d["status"] != "ran":
        lines += [f"{d['status']}: {d['reason']}", ""]
    else:
        fp32 = d["rows"][0]["accuracy"]
        lines += [f"{d['test_images']} test images, one per call; int8 flows calibrated on the same {d['calibration_images']} "
                  f"training images (training took {d['train_seconds']:.0f} s). SQNR: logits against eager fp32.", ""]
        body = []
        for r in d["rows"]:
            if "accuracy" not in r:
                body.append([r["variant"], "", "", "", "", f"{r['status']}: {r['reason']}"])
                continue
            body.append([r["variant"], f"{r['accuracy']:.2f}", f"{r['accuracy'] - fp32:+.2f}", _sqnr(r["sqnr_db"]),
                         _bytes(r["bytes"]), ""])
        lines += [_table(["flow", "accuracy %", "vs fp32 (points)", "logit SQNR dB", ".pte", "note"], body, "lrrrrl"), ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_executorch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small built-in models, the first thread count, 10 calls")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2; --quick: the first)")
    ap.add_argument("--models", default=None, help="comma-separated built-in names or torchvision:NAME "
                                                   "(default resnet18,mobilenet_v2; --quick: resnet_cnn,mobilenet_cnn)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per program and thread count (default 30, quick 10)")
    ap.add_argument("--out", default="benchmarks/results/executorch", help="folder for the JSON and Markdown")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads takes comma-separated integers, not {args.threads!r}")
    threads = threads[:1] if args.quick else threads
    models = args.models.split(",") if args.models else list(MODELS[mode])
    runs = args.runs or RUNS[mode]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def show(what: str) -> None:
        print(what, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"quick": args.quick, "threads": threads, "runs": runs, "models": [],
                              "versions": package_versions(("torch", "executorch", "torchao")),
                              "unavailable": unavailable_reason(),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="graphopt-executorch-") as tmp:
        work = Path(tmp)
        try:  # first: it warms both flows up before the models' compile times are taken
            report["digits"] = bench_digits(work, show)
        except Exception as exc:
            status, reason = _failure(exc)
            report["digits"] = {"status": status, "reason": reason, "rows": []}
        for name in models:
            try:
                report["models"].append(bench_model(name, threads, runs, work, show))
            except Exception as exc:  # the model itself did not load: one row says why
                status, reason = _failure(exc)
                report["models"].append({"model": name, "input_shapes": [], "rows": [
                    {**_row(name, FLOWS[0]), "label": "(the model)", "status": status, "reason": reason}]})
    report["goals"] = goals(report["models"], report["digits"])
    stem = "executorch_quick" if args.quick else "executorch"
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(report), indent=1, default=str) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
