"""Latency, size and cost of every path from a PyTorch model to a runnable artifact: graphopt's
presets in each runtime, and the peers (:mod:`benchmarks.peers`) on the same model, in the same
process, with the same inputs and thread count.

    python -m benchmarks.bench_fp32 [--models resnet18,mobilenet_v2] [--threads 1,2] [--runs 30]

prints the figures of the fusion issue (mobile-fp32 in eager mode against
``torch.fx.experimental.optimization.fuse`` and ``torch.jit.freeze``) and of the backends issue
(ONNX Runtime with optimizations off and all, lite interpreter), and whether each goal is met.
``python -m benchmarks.run`` runs the same code for every model and writes the full report.

How each figure is measured:

- latency: per thread count, ``torch.set_num_threads(t)`` and ONNX Runtime sessions made with
  ``intra_op_num_threads=t``; every variant of a model is timed round robin
  (:func:`graphopt.app.timing.round_robin_ms`: 3 warm-up calls each, then rounds of 5 calls per
  variant) and the median is kept; the speed-up is eager fp32's median over the variant's.
- max error: largest absolute difference from the original model's outputs on the example
  inputs (the first thread count's run).
- pipeline / export seconds: wall time of the graphopt pipeline (capture and per-pass
  verification included) or of the peer's transformation, and of writing the artifact
  (graphopt's lowering includes reloading and verifying it in its runtime).
- peak memory: growth of the process's resident set during the step, measured as the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step) minus the
  resident size when the step starts (after ``gc.collect`` and ``malloc_trim``, so memory freed
  earlier is given back and the step's allocations show). ``tracemalloc`` cannot be used: it
  does not see torch's allocations. A row's figure is the largest step on its path. Linux only;
  elsewhere the column is empty.
- parameters: elements of the trainable parameters (:func:`graphopt.ir.costs.parameters`) of the
  module that runs or was lowered; MACs: :func:`graphopt.ir.costs.macs` of its graph at the
  example's shapes; nodes: compute nodes of the FX graph, operators of the TorchScript graph
  (``prim::`` bookkeeping excluded) or nodes of the ONNX graph.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from benchmarks import peers
from benchmarks.rss import give_back_freed_memory, reset_peak_rss, status_bytes

#: built-in examples (graphopt.app.examples), small ones first
BUILTIN_MODELS = ("resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block", "resnet18", "mobilenet_v2")
QUICK_MODELS = ("resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block")
#: torchvision classification models, benchmarked when torchvision imports
TORCHVISION_MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "efficientnet_b0")
#: the graphopt presets this benchmark knows how to run, with the precision they produce
PRESETS = {"mobile-fp32": "fp32", "mobile-int8": "int8", "mobile-pruned": "pruned"}
#: "within noise": a goal missed by less than this fraction of the peer's time is reported so
NOISE = 0.10

# ------------------------------------------------------------------------------------ models


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch raises more than ImportError
        return False
    return True


def default_models(quick: bool) -> list[str]:
    """Small built-ins in quick mode; otherwise every built-in plus torchvision's when present."""
    if quick:
        return list(QUICK_MODELS)
    names = list(BUILTIN_MODELS)
    if torchvision_available():
        names += [f"torchvision:{n}" for n in TORCHVISION_MODELS]
    return names


def load_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A built-in example, or ``torchvision:NAME`` with random weights and randomized
    batch-norm statistics (fresh statistics make BN an identity and hide folding bugs)."""
    from graphopt.app import examples

    if not name.startswith("torchvision:"):
        return examples.get_example(name, seed)
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        examples.randomize_batch_norms(model)
        inputs = (torch.randn(1, 3, 224, 224),)
    return model.eval(), inputs


def registered_presets() -> list[str]:
    """The presets of :data:`PRESETS` graphopt has registered, after importing every module of
    ``graphopt.passes`` (some register their preset on import, before the package wires them)."""
    import importlib
    import pkgutil

    import graphopt
    import graphopt.passes

    for module in pkgutil.iter_modules(graphopt.passes.__path__):
        try:
            importlib.import_module(f"graphopt.passes.{module.name}")
        except Exception:  # a pass module being rewritten must not stop the benchmark: its preset is just absent
            pass
    return [p for p in PRESETS if p in graphopt.available_presets()]


def calibration_batches(inputs: tuple[torch.Tensor, ...], count: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Random batches shaped like the example, for presets that calibrate (random-weight models
    have no data of their own)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [tuple(torch.randn_like(x) for x in inputs) for _ in range(count)]


# ------------------------------------------------------------------------------- measuring


@dataclass
class Step:
    """One timed step of building a variant: its wall time and peak memory growth."""

    seconds: float
    peak_rss_bytes: int | None


def measure(fn: Callable[[], Any]) -> tuple[Any, Step]:
    """Run ``fn``; its result and :class:`Step` (see the module docstring for the method)."""
    give_back_freed_memory()
    start = status_bytes("VmRSS")
    resettable = start is not None and reset_peak_rss()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM") if resettable else None
    return result, Step(seconds, max(0, peak - start) if peak is not None and start is not None else None)


# -------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way to run the model: how to get a runner at a thread count, and what it cost."""

    key: str  # stable id used in JSON and charts
    label: str  # row name in the report
    tool: str  # "baseline", "graphopt" or "peer"
    runtime: str  # "eager", "TorchScript JIT", "lite interpreter", "ONNX Runtime"
    precision: str  # "fp32", "int8", "pruned"
    load: Callable[[int], Callable[..., Any]] | None = None  # threads -> callable(*inputs)
    artifact_bytes: int | None = None
    parameters: int | None = None
    macs: int | None = None
    nodes: int | None = None
    steps: list[Step] = field(default_factory=list)  # pipeline first, then export
    pipeline_s: float | None = None
    export_s: float | None = None
    note: str = ""
    status: str = "ok"  # "ok", "failed", "unavailable"
    reason: str = ""

    def cost_of(self, pipeline: Step | None = None, export: Step | None = None) -> "Variant":
        """Record the steps that made this variant."""
        if pipeline is not None:
            self.pipeline_s = pipeline.seconds
            self.steps.append(pipeline)
        if export is not None:
            self.export_s = export.seconds
            self.steps.append(export)
        return self

    def fail(self, exc: BaseException) -> "Variant":
        from graphopt.lowering import exception_summary

        self.status = "unavailable" if isinstance(exc, peers.Unavailable) else "failed"
        self.reason = str(exc) if isinstance(exc, peers.Unavailable) else exception_summary(exc)
        self.load = None
        return self

    @property
    def peak_rss_bytes(self) -> int | None:
        peaks = [s.peak_rss_bytes for s in self.steps if s.peak_rss_bytes is not None]
        return max(peaks) if peaks else None


def _fx_costs(gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[int, int, int]:
    """(parameters, MACs, compute nodes) of an FX graph, shapes propagated when missing."""
    from graphopt.ir import costs, graph as G

    if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op.startswith("call_")):
        G.propagate_shapes(gm, inputs)
    return costs.parameters(gm), costs.macs(gm), G.count_nodes(gm)


class _Builder:
    """Builds every variant of one model, recording each failure on the rows it affects."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...], workdir: Path, on_step: Callable[[str], None]):
        self.model, self.inputs, self.workdir, self.on_step = model, inputs, workdir, on_step
        self.variants: list[Variant] = []

    def step(self, what: str, fn: Callable[[], Any]) -> tuple[Any, Step]:
        self.on_step(what)
        return measure(fn)

    def add(self, variant: Variant) -> Variant:
        self.variants.append(variant)
        return variant

    # -- the original model ---------------------------------------------------------------

    def baseline(self) -> tuple[int, int | None]:
        import graphopt
        from graphopt.ir import costs, graph as G
        from graphopt.lowering import exception_summary

        eager = self.add(Variant("eager", "eager fp32", "baseline", "eager", "fp32", load=lambda t: self.model,
                                 artifact_bytes=G.param_bytes(self.model), parameters=costs.parameters(self.model)))
        try:  # MACs and nodes need a graph; the model still runs eagerly when capture fails
            captured, _ = self.step("capture (for MACs)", lambda: graphopt.capture(self.model, self.inputs))
            eager.parameters, eager.macs, eager.nodes = _fx_costs(captured, self.inputs)
        except Exception as exc:
            eager.note = f"no MACs: capture failed: {exception_summary(exc)}"
        return eager.parameters, eager.macs

    # -- graphopt ---------------------------------------------------------------------------

    def graphopt_preset(self, preset: str, calibration: list[tuple[Any, ...]]) -> None:
        import graphopt
        from graphopt.ir import graph as G

        precision = PRESETS[preset]
        short = f"graphopt {preset}"
        rows: list[Variant] = []
        if precision != "int8":  # int8 in eager mode is simulated (quantize/dequantize in float): not a runtime
            rows.append(Variant(f"{preset}/eager", f"{short}, eager", "graphopt", "eager", precision))
        rows.append(Variant(f"{preset}/ort-all", f"{short}, ORT all", "graphopt", "ONNX Runtime", precision))
        if precision == "fp32":
            rows.append(Variant(f"{preset}/ort-off", f"{short}, ORT off", "graphopt", "ONNX Runtime", precision))
        rows.append(Variant(f"{preset}/ptl", f"{short}, lite interpreter (.ptl)", "graphopt", "lite interpreter", precision))
        for row in rows:
            self.add(row)
        try:
            result, pipeline = self.step(f"{short}: pipeline", lambda: graphopt.optimize(
                self.model, self.inputs, preset, calibration_data=calibration if precision == "int8" else None))
        except Exception as exc:
            for row in rows:
                row.fail(exc)
            return
        gm = result.module
        params, macs, nodes = _fx_costs(gm, self.inputs)
        rolled_back = "; ".join(f"{r.name} {r.status}: {r.error}" for r in result.report.failed)
        for row in rows:
            row.parameters, row.macs, row.note = params, macs, (f"passes {rolled_back}" if rolled_back else "")
            row.cost_of(pipeline)
        if rolled_back and precision != "fp32":
            # without its quantize/prune pass the result is the fp32 graph: timing it as int8/pruned would mislead
            for row in rows:
                row.status, row.reason, row.load = "failed", f"pipeline: {rolled_back}"[:400], None
            return
        for row in rows:
            if row.runtime == "eager":
                row.load, row.artifact_bytes, row.nodes = (lambda t, gm=gm: gm), G.param_bytes(gm), nodes
        backend_rows = {"onnx": [r for r in rows if r.runtime == "ONNX Runtime"],
                        "torchscript-mobile": [r for r in rows if r.runtime == "lite interpreter"]}
        for backend, targets in backend_rows.items():
            suffix = ".onnx" if backend == "onnx" else ".ptl"
            path = self.workdir / f"graphopt-{preset}{suffix}"
            try:
                artifact, export = self.step(f"{short}: lower to {backend}",
                                             lambda: graphopt.lower(gm, self.inputs, backend=backend, path=path))
            except Exception as exc:
                for row in targets:
                    row.fail(exc)
                continue
            for row in targets:
                row.cost_of(export=export)
                row.artifact_bytes = artifact.size_bytes
                row.nodes = artifact.report.get("node_count")
                if backend == "onnx":
                    level = row.key.rsplit("-", 1)[1]
                    row.load = lambda t, p=artifact.path, lv=level: peers.ort_runner(p, t, lv)
                else:
                    row.load = lambda t, p=artifact.path: peers.lite_runner(p)
                    if artifact.report.get("optimize_for_mobile") == "applied":  # not on the PyPI CPU wheels
                        row.note = "; ".join(x for x in (row.note, "optimize_for_mobile applied") if x)

    # -- peers ------------------------------------------------------------------------------

    def torchscript_peers(self, params: int, macs: int | None) -> None:
        jit = self.add(Variant("jit-freeze", "jit.script + freeze", "peer", "TorchScript JIT", "fp32",
                               parameters=params, macs=macs))
        lite = self.add(Variant("jit-freeze/ptl", "lite interpreter (.ptl of script + freeze)", "peer",
                                "lite interpreter", "fp32", parameters=params, macs=macs))
        mobile = self.add(Variant("optimize-for-mobile/ptl", "optimize_for_mobile (.ptl)", "peer",
                                  "lite interpreter", "fp32", parameters=params, macs=macs))
        try:
            (frozen, how), pipeline = self.step("jit.script + freeze", lambda: peers.script_and_freeze(self.model, self.inputs))
        except Exception as exc:
            for row in (jit, lite, mobile):
                row.fail(exc)
            return
        jit.cost_of(pipeline)
        jit.load, jit.nodes, jit.note = (lambda t: frozen), peers.torchscript_node_count(frozen), how
        path = self.workdir / "jit-freeze.ptl"
        try:
            _, export = self.step("save .ptl", lambda: peers.save_for_lite_interpreter(frozen, path))
            lite.cost_of(pipeline, export)
            lite.load, lite.artifact_bytes, lite.nodes, lite.note = (lambda t: peers.lite_runner(path)), path.stat().st_size, jit.nodes, how
        except Exception as exc:
            lite.fail(exc)
        try:
            optimized, step = self.step("optimize_for_mobile", lambda: peers.optimize_for_mobile(frozen))
            mobile_path = self.workdir / "optimize-for-mobile.ptl"
            peers.save_for_lite_interpreter(optimized, mobile_path)
            mobile.cost_of(step)
            mobile.load, mobile.artifact_bytes = (lambda t: peers.lite_runner(mobile_path)), mobile_path.stat().st_size
            mobile.nodes = peers.torchscript_node_count(optimized)
        except Exception as exc:
            mobile.fail(exc)

    def fx_fuse_peer(self) -> None:
        from graphopt.ir import graph as G

        row = self.add(Variant("fx-fuse", "fx.experimental.optimization.fuse", "peer", "eager", "fp32"))
        try:
            fused, pipeline = self.step("fx fuse", lambda: peers.fx_fuse(self.model))
            row.parameters, row.macs, row.nodes = _fx_costs(fused, self.inputs)
        except Exception as exc:
            row.fail(exc)
            return
        row.cost_of(pipeline)
        row.load, row.artifact_bytes = (lambda t: fused), G.param_bytes(fused)

    def onnx_peers(self, params: int, macs: int | None) -> None:
        plain = {level: self.add(Variant(f"onnx-plain/ort-{level}", f"plain ONNX export, ORT {level}", "peer",
                                         "ONNX Runtime", "fp32", parameters=params, macs=macs)) for level in ("off", "all")}
        tools = {"onnxslim": peers.onnxslim_file, "onnxsim": peers.onnxsim_file}
        simplified = {name: self.add(Variant(f"{name}/ort-all", f"{name}, ORT all", "peer", "ONNX Runtime", "fp32",
                                             parameters=params, macs=macs)) for name in tools}
        path = self.workdir / "plain.onnx"
        try:
            _, export = self.step("plain torch.onnx.export", lambda: peers.export_onnx(self.model, self.inputs, path))
        except Exception as exc:
            for row in (*plain.values(), *simplified.values()):
                row.fail(exc)
            return
        for level, row in plain.items():
            row.cost_of(export=export)
            row.artifact_bytes, row.nodes = path.stat().st_size, peers.onnx_node_count(path)
            row.load = lambda t, lv=level: peers.ort_runner(path, t, lv)
        for name, tool in tools.items():
            row, target = simplified[name], self.workdir / f"{name}.onnx"
            try:
                _, step = self.step(name, lambda: tool(path, target))
            except Exception as exc:
                row.fail(exc)
                continue
            row.cost_of(step, export)
            row.artifact_bytes, row.nodes = target.stat().st_size, peers.onnx_node_count(target)
            row.load = lambda t, p=target: peers.ort_runner(p, t, "all")


def build_variants(model: nn.Module, inputs: tuple[Any, ...], workdir: Path, presets: list[str],
                   on_step: Callable[[str], None] = lambda what: None) -> list[Variant]:
    """Every variant of ``model``: eager fp32, graphopt's ``presets`` in each runtime, the peers."""
    builder = _Builder(model, inputs, workdir, on_step)
    params, macs = builder.baseline()
    calibration = calibration_batches(inputs)
    for preset in presets:
        builder.graphopt_preset(preset, calibration)
    builder.fx_fuse_peer()
    builder.torchscript_peers(params, macs)
    builder.onnx_peers(params, macs)
    return builder.variants


# ---------------------------------------------------------------------------------- timing


def _schedule(runs: int) -> tuple[int, int]:
    """(rounds, calls per round) giving at least ``runs`` timed calls per variant."""
    calls = min(5, max(1, runs))
    return math.ceil(runs / calls), calls


def time_variants(variants: list[Variant], inputs: tuple[Any, ...], threads: list[int], runs: int,
                  on_step: Callable[[str], None] = lambda what: None) -> dict[str, dict[str, Any]]:
    """Per variant key: max error vs eager and median ms per thread count. A variant that fails
    to load or run is marked failed and dropped from the rounds; the others go on."""
    from graphopt import verify
    from graphopt.lowering import exception_summary
    from graphopt.app.timing import round_robin_ms

    reference = verify.run(variants[0].load(1), inputs)  # variants[0] is eager fp32
    figures: dict[str, dict[str, Any]] = {v.key: {"latency_ms": {}} for v in variants}
    rounds, calls = _schedule(runs)
    previous = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            runners: dict[str, Callable[[], Any]] = {}
            for v in variants:
                if v.load is None:
                    continue
                try:
                    runner = v.load(t)
                    outputs = verify.run(runner, inputs)
                except Exception as exc:
                    v.fail(exc)
                    continue
                if "max_abs_error" not in figures[v.key]:
                    figures[v.key]["max_abs_error"] = _max_abs_error(reference, outputs)
                runners[v.key] = lambda r=runner: r(*inputs)
            on_step(f"timing {len(runners)} variants, {t} thread{'s' if t > 1 else ''}")
            with torch.no_grad():
                medians = round_robin_ms(runners, rounds=rounds, calls=calls)
            for key, ms in medians.items():
                figures[key]["latency_ms"][t] = ms
            del runners
    except Exception as exc:  # a runtime crashing mid-round: every unfinished row says why
        reason = exception_summary(exc)
        for v in variants:
            if v.status == "ok" and len(figures[v.key]["latency_ms"]) < len(threads):
                v.status, v.reason = "failed", f"timing: {reason}"
    finally:
        torch.set_num_threads(previous)
    return figures


def _max_abs_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    if len(reference) != len(outputs):
        return float("nan")
    return max((float((r.double() - o.double().reshape(r.shape)).abs().max()) for r, o in zip(reference, outputs)),
               default=0.0)


def bench_model(name: str, threads: list[int], runs: int, presets: list[str],
                on_step: Callable[[str], None] = lambda what: None) -> list[dict[str, Any]]:
    """Every row of one model as JSON-ready dicts (see the module docstring for the columns)."""
    model, inputs = load_model(name)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        variants = build_variants(model, inputs, Path(tmp), presets, lambda what: on_step(f"{name}: {what}"))
        figures = time_variants(variants, inputs, threads, runs, lambda what: on_step(f"{name}: {what}"))
    base = figures["eager"]["latency_ms"]
    rows = []
    for v in variants:
        f = figures[v.key]
        latency = f["latency_ms"] if v.status == "ok" else {}
        rows.append({
            "model": name, "key": v.key, "label": v.label, "tool": v.tool, "runtime": v.runtime,
            "precision": v.precision, "status": v.status, "reason": v.reason, "note": v.note,
            "latency_ms": {str(t): ms for t, ms in latency.items()},
            "speedup": {str(t): base[t] / ms for t, ms in latency.items() if t in base and ms > 0},
            "artifact_bytes": v.artifact_bytes, "parameters": v.parameters, "macs": v.macs, "nodes": v.nodes,
            "max_abs_error": f.get("max_abs_error") if v.status == "ok" else None,
            "pipeline_s": v.pipeline_s, "export_s": v.export_s, "peak_rss_bytes": v.peak_rss_bytes,
        })
    return rows


def failed_model_row(name: str, exc: BaseException) -> dict[str, Any]:
    """The one row of a model that could not be built or loaded at all."""
    from graphopt.lowering import exception_summary

    return {"model": name, "key": "eager", "label": "eager fp32", "tool": "baseline", "runtime": "eager",
            "precision": "fp32", "status": "failed", "reason": exception_summary(exc), "note": "",
            "latency_ms": {}, "speedup": {}}


# ----------------------------------------------------------------------------------- goals

#: (issue, goal, graphopt row, peer rows whose best it must match)
GOALS = (
    ("3", "mobile-fp32 eager at least as fast as the best of fx fuse and jit.freeze",
     "mobile-fp32/eager", ("fx-fuse", "jit-freeze")),
    ("4", "ORT all: graphopt export at least as fast as plain export", "mobile-fp32/ort-all", ("onnx-plain/ort-all",)),
    ("4", "lite interpreter .ptl at least as fast as jit.freeze of the original", "mobile-fp32/ptl", ("jit-freeze",)),
    ("4", "lite interpreter .ptl at least as fast as the .ptl of script + freeze", "mobile-fp32/ptl", ("jit-freeze/ptl",)),
)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal per model and thread count: met, or missed (and whether within noise)."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["key"]] = r
    verdicts = []
    for model, keyed in by_model.items():
        for issue, goal, ours, theirs in GOALS:
            mine = keyed.get(ours)
            if mine is None:
                continue
            for t, ms in mine.get("latency_ms", {}).items():
                peer_ms = {k: keyed[k]["latency_ms"][t] for k in theirs if k in keyed and t in keyed[k].get("latency_ms", {})}
                if not peer_ms:
                    continue
                best_key = min(peer_ms, key=peer_ms.get)
                ratio = peer_ms[best_key] / ms  # > 1: graphopt is faster
                verdict = "met" if ratio >= 1.0 else ("missed, within noise" if ratio >= 1 - NOISE else "missed")
                verdicts.append({"issue": issue, "goal": goal, "model": model, "threads": t, "graphopt_ms": ms,
                                 "best_peer": keyed[best_key]["label"], "peer_ms": peer_ms[best_key],
                                 "ratio": ratio, "verdict": verdict})
    return verdicts


# -------------------------------------------------------------------------------- scaling

#: the fusion tools compared on deep synthetic graphs, each one path from the nn.Module
FUSION_TOOLS = ("torch.fx symbolic_trace + fuse", "torch.ao fuse_fx", "graphopt mobile-fp32")


def fusion_scaling_one(target_nodes: int) -> dict[str, Any]:
    """Wall time and peak memory of each fusion tool on one deep conv-BN-ReLU stack
    (``benchmarks.bench_spine.deep_model``, the graphs of the spine's scaling table).

    Runs in a process of its own (see :func:`fusion_scaling`): deep graphs need a high
    recursion limit, and each size's memory figures must not inherit another's.
    """
    import graphopt
    from benchmarks.bench_spine import deep_model
    from graphopt.ir import graph as G

    sys.setrecursionlimit(max(10000, 4 * target_nodes))
    model = deep_model(max(1, target_nodes // 4))  # conv, bn, relu, add per block
    inputs = (torch.randn(1, 4, 4, 4),)
    compute_nodes = G.count_nodes(torch.fx.symbolic_trace(model))

    def ao_fuse_fx() -> Any:
        from torch.ao.quantization.quantize_fx import fuse_fx

        with peers.quiet():
            return fuse_fx(model)

    runs = {"torch.fx symbolic_trace + fuse": lambda: peers.fx_fuse(model),
            "torch.ao fuse_fx": ao_fuse_fx,
            "graphopt mobile-fp32": lambda: graphopt.optimize(model, inputs, "mobile-fp32")}
    tools: dict[str, dict[str, Any]] = {}
    for name in FUSION_TOOLS:
        try:
            result, step = measure(runs[name])
        except Exception as exc:
            from graphopt.lowering import exception_summary

            tools[name] = {"error": exception_summary(exc)}
            continue
        tools[name] = {"seconds": step.seconds, "peak_rss_bytes": step.peak_rss_bytes}
        del result
    return {"target_nodes": target_nodes, "compute_nodes": compute_nodes, "tools": tools}


def fusion_scaling(sizes: list[int], timeout_s: float) -> dict[str, Any]:
    """:func:`fusion_scaling_one` per size, each in a fresh interpreter; a size that fails or
    times out is a row with the reason, and larger sizes are skipped after a time-out."""
    import json
    import subprocess

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in sizes:
        try:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_fp32", "--scaling-one", str(n)],
                                 capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rows.append({"target_nodes": n, "error": f"timed out after {timeout_s:.0f} s; larger sizes skipped"})
            break
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
            rows.append({"target_nodes": n, "error": tail[0]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"status": "ran", "rows": rows, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--scaling-one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scaling_one is not None:
        import json

        print(json.dumps(fusion_scaling_one(args.scaling_one)))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    presets = registered_presets()
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        try:
            rows += bench_model(name, threads, args.runs, presets, lambda what: print(what, file=sys.stderr))
        except Exception as exc:
            rows.append(failed_model_row(name, exc))
    for r in rows:
        lat = "  ".join(f"{t}t {ms:8.2f} ms ({r['speedup'].get(t, float('nan')):.2f}x)" for t, ms in r["latency_ms"].items())
        print(f"{r['model']:<18} {r['label']:<48} {lat or r['status'] + ': ' + r['reason']}")
    for g in goals(rows):
        print(f"issue {g['issue']} {g['model']} {g['threads']}t: {g['verdict']} ({g['ratio']:.2f}x vs {g['best_peer']}) - {g['goal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
