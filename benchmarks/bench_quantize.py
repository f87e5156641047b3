"""Int8 against its peers, in one run: accuracy on a trained digits CNN, speed and size on
ResNet-18- and MobileNetV2-shaped models.

    python -m benchmarks.bench_quantize [--quick] [--out benchmarks/results]

Accuracy. A conv-BN-ReLU CNN is trained on scikit-learn's digits (8x8 images, fixed seed, no
download) to >= 97% test accuracy. Compared on the test set: fp32; graphopt int8 (``mobile-int8``,
config x86) for each calibration method, as the QDQ graph and as run by ONNX Runtime and the lite
interpreter; torch.ao FX (prepare_fx/convert_fx, x86 qconfig); ONNX Runtime ``quantize_static``
(QDQ, per-channel, U8S8 + reduce_range and the S8S8 defaults). All int8 paths calibrate on the
same 256 training images. Besides accuracy, the logits' SQNR against fp32 tells methods apart.

Calibration. Every method on ``graphopt.app.examples.wide_range_cnn`` (depthwise-separable,
per-channel ranges over four decades): output SQNR on held-out random inputs, and which
tensors fell back to min-max (``graphopt.quantization.range_choice``).

Speed and size. ``graphopt.examples.resnet18`` / ``mobilenet_v2`` (random weights, randomized
batch norms), batch 1, 224x224, 1 and 2 threads. Variants timed round-robin in one process
(``graphopt.app.timing.round_robin_ms``): eager fp32, fp32 in ONNX Runtime (all optimizations) and in
the lite interpreter (script + freeze), graphopt int8 in both, torch.ao FX int8 (x86 engine,
.ptl), ONNX Runtime quantize_static U8S8 + reduce_range and S8S8. File sizes and int8 SQNR
against fp32 on a held-out random input are reported too.

``--quick``: 1 thread, fewer timing rounds.
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

ONNX_OPSET = 18
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 32
METHODS = ("auto", "minmax", "moving_average", "histogram", "mse", "entropy")


# ----------------------------------------------------------------------------- helpers


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    noise = float(((ref - out) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = False) -> Path:
    """TorchScript-based export (graphopt's QDQ ops get their symbolics registered first)."""
    from graphopt.backends._onnx_symbolics import register_torchscript_symbolics

    register_torchscript_symbolics(ONNX_OPSET)
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return path


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def save_lite(module: nn.Module, path: Path, freeze: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module).eval()
        if freeze:
            scripted = torch.jit.freeze(scripted)
        scripted._save_for_lite_interpreter(str(path))
    return path


def load_lite(path: Path) -> Callable[[torch.Tensor], Any]:
    from torch.jit.mobile import _load_for_lite_interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _load_for_lite_interpreter(str(path))
    return lambda x: module(x)


def graphopt_int8(model: nn.Module, example: torch.Tensor, calibration: list, method: str = "auto"):
    import graphopt
    import graphopt.passes.fold_weight_quant  # noqa: F401  (registers quantize, the fold and mobile-int8)
    import graphopt.passes.quantize  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = graphopt.PassManager("mobile-int8", verify="none", on_failure="raise",
                                       options={"quantize": {"calibration": method}})
        result = manager.run(model, (example,), calibration_data=calibration)
    record = next(r for r in result.report.records if r.name == "quantize")
    return result.module, record


def graphopt_lite(gm, example: torch.Tensor, path: Path, engine: str = "x86") -> Path:
    from graphopt.backends._quantized_torchscript import convert_for_torchscript

    converted = convert_for_torchscript(gm, (example,), engine=engine)
    # not frozen: torch.jit.freeze stores x86-packed weights twice (tests/test_quantized_lowering.py)
    return save_lite(converted, path, freeze=engine != "x86")


def torch_ao_fx(model: nn.Module, example: torch.Tensor, calibration: list) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for (x,) in calibration:
                prepared(x)
        converted = convert_fx(prepared).eval()
    for node in converted.graph.nodes:  # fx spells torch.Tensor annotations in a way TorchScript rejects
        node.type = None
    converted.recompile()
    return converted


def ort_quantize_static(fp32_path: Path, out: Path, calibration: list, u8s8: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x.numpy()} for (x,) in calibration])

        def get_next(self):
            return next(self.items, None)

    prepared = out.with_suffix(".pre.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimization; quantize the export as it is
            prepared = fp32_path
        kinds = dict(activation_type=QuantType.QUInt8, reduce_range=True) if u8s8 else \
            dict(activation_type=QuantType.QInt8, reduce_range=False)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, **kinds)
    return out


# ----------------------------------------------------------------------------- digits


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64))
        self.classifier = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train_digits(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def bench_digits(workdir: Path) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = digits_data()
    t0 = time.perf_counter()
    model = train_digits(x_train, y_train)
    train_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(y_train), generator=g)[: (CALIBRATION_BATCHES + 1) * CALIBRATION_BATCH_SIZE]
    batches = [(x_train[i],) for i in pick.split(CALIBRATION_BATCH_SIZE)]
    calibration, held_out = batches[:CALIBRATION_BATCHES], batches[CALIBRATION_BATCHES:]
    example = calibration[0][0]
    with torch.no_grad():
        ref = model(x_test).numpy()

    rows: list[dict[str, Any]] = []

    def add(name: str, logits: np.ndarray, size: int | None = None, **extra: Any) -> None:
        acc = float((logits.argmax(1) == y_test.numpy()).mean() * 100)
        rows.append({"variant": name, "accuracy": acc, "sqnr_db": sqnr_db(ref, logits), "bytes": size, **extra})

    fp32_onnx = export_onnx(model, example, workdir / "digits_fp32.onnx", dynamic_batch=True)
    add("fp32", ref, fp32_onnx.stat().st_size)

    for method in METHODS:
        # graphopt holds the last calibration batch out to measure error: the same 256 images calibrate
        gm, record = graphopt_int8(model, example, calibration + held_out, method)
        with torch.no_grad():
            add(f"graphopt int8 {method} (QDQ graph)", gm(x_test).numpy(), None,
                pass_sqnr_db=record.figures["held_out_sqnr_db"][0], pass_seconds=record.seconds)
        onnx_path = export_onnx(gm, example, workdir / f"digits_{method}.onnx", dynamic_batch=True)
        add(f"graphopt int8 {method}, ONNX Runtime", ort_session(onnx_path)(x_test), onnx_path.stat().st_size)
        ptl = graphopt_lite(gm, example, workdir / f"digits_{method}.ptl")
        add(f"graphopt int8 {method}, lite interpreter x86", load_lite(ptl)(x_test).numpy(), ptl.stat().st_size)

    fx_model = torch_ao_fx(model, example, calibration)
    with torch.no_grad():
        add("torch.ao FX int8 (x86)", fx_model(x_test).numpy(), None)
    for u8s8 in (True, False):
        label = "U8S8 reduce_range" if u8s8 else "S8S8 (defaults)"
        path = ort_quantize_static(fp32_onnx, workdir / f"digits_ort_{'u8s8' if u8s8 else 's8s8'}.onnx", calibration, u8s8)
        add(f"ORT quantize_static {label}", ort_session(path)(x_test), path.stat().st_size)
    return {"train_seconds": train_s, "test_images": len(y_test), "calibration_images": len(calibration) * CALIBRATION_BATCH_SIZE,
            "rows": rows}


# ----------------------------------------------------------------------------- calibration


def bench_calibration(calibration_batches: int = 16, held_out_batches: int = 4) -> list[dict[str, Any]]:
    """Every calibration method on the wide-range CNN: output SQNR on held-out inputs, the
    pass's own held-out figure, and the methods the pass used per tensor."""
    from graphopt.app.examples import normal_batches, wide_range_cnn

    model, (example,) = wide_range_cnn(0)
    calibration = normal_batches(example, calibration_batches + 1, seed=1)  # the pass holds the last one out
    held_out = normal_batches(example, held_out_batches, seed=2)
    with torch.no_grad():
        ref = torch.cat([model(x) for (x,) in held_out]).numpy()
    rows = []
    for method in METHODS:
        gm, record = graphopt_int8(model, example, calibration, method)
        with torch.no_grad():
            out = torch.cat([gm(x) for (x,) in held_out]).numpy()
        ranges = record.figures.get("calibration_ranges", {})
        rows.append({"method": method, "sqnr_db": sqnr_db(ref, out),
                     "pass_sqnr_db": record.figures["held_out_sqnr_db"][0],
                     "methods_used": record.figures.get("calibration_methods", {}),
                     "fell_back": [name for name, r in ranges.items() if "fallback" in r]})
    return rows


# ----------------------------------------------------------------------------- speed


def bench_speed(name: str, threads: list[int], workdir: Path, rounds: int, calls: int) -> dict[str, Any]:
    from graphopt.app import examples
    from graphopt.app.timing import round_robin_ms

    model, (example,) = examples.get_example(name)
    g = torch.Generator().manual_seed(3)
    calibration = [(torch.randn(example.shape, generator=g),) for _ in range(CALIBRATION_BATCHES + 1)]
    check = torch.randn(example.shape, generator=g)
    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        seconds[label] = time.perf_counter() - t0
        return out

    files["fp32 ONNX Runtime"] = timed("fp32 ONNX export", lambda: export_onnx(model, example, workdir / f"{name}_fp32.onnx"))
    files["fp32 lite interpreter"] = timed("fp32 .ptl", lambda: save_lite(model, workdir / f"{name}_fp32.ptl"))
    gm, record = timed("graphopt mobile-int8 pipeline", lambda: graphopt_int8(model, example, calibration))
    files["graphopt int8 ONNX Runtime"] = timed("graphopt int8 ONNX export",
                                                lambda: export_onnx(gm, example, workdir / f"{name}_graphopt.onnx"))
    files["graphopt int8 lite x86"] = timed("graphopt int8 .ptl", lambda: graphopt_lite(gm, example, workdir / f"{name}_graphopt.ptl"))
    fx_model = timed("torch.ao FX prepare+calibrate+convert", lambda: torch_ao_fx(model, example, calibration[:CALIBRATION_BATCHES]))
    files["torch.ao FX int8 lite x86"] = timed("torch.ao FX .ptl", lambda: save_lite(fx_model, workdir / f"{name}_fx.ptl"))
    for u8s8 in (True, False):
        key = f"ORT quantize_static {'U8S8 reduce_range' if u8s8 else 'S8S8'}"
        files[key] = timed(key, lambda: ort_quantize_static(files["fp32 ONNX Runtime"], workdir / f"{name}_{u8s8}.onnx",
                                                             calibration[:CALIBRATION_BATCHES], u8s8))

    with torch.no_grad():
        reference = model(check).numpy()
    results: dict[str, Any] = {"model": name, "sizes": {k: p.stat().st_size for k, p in files.items()},
                               "setup_seconds": seconds, "graphopt_held_out_sqnr_db": record.figures["held_out_sqnr_db"],
                               "latency_ms": {}, "sqnr_db": {}}
    results["load_average_before_timing"] = os.getloadavg()[0]
    for t in threads:
        torch.set_num_threads(t)
        torch.backends.quantized.engine = "x86"
        runners: dict[str, Callable[[torch.Tensor], Any]] = {"eager fp32": lambda x: model(x)}
        for key, path in files.items():
            runners[key] = load_lite(path) if path.suffix == ".ptl" else ort_session(path, t)
        if t == threads[0]:
            with torch.no_grad():
                results["sqnr_db"] = {k: sqnr_db(reference, np.asarray(r(check))) for k, r in runners.items()}
        with torch.no_grad():
            results["latency_ms"][str(t)] = round_robin_ms({k: (lambda r=r: r(example)) for k, r in runners.items()},
                                                           rounds=rounds, calls=calls)
    results["load_average_after_timing"] = os.getloadavg()[0]
    return results


# ----------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Int8 quantization benchmark{' (quick)' if report['quick'] else ''}", "",
             f"{report['machine']}; torch {report['torch']}, onnxruntime {report['onnxruntime']}.", ""]
    d = report["digits"]
    fp32 = d["rows"][0]["accuracy"]
    lines += ["## Digits CNN accuracy", "",
              f"{d['test_images']} test images, calibration on {d['calibration_images']} training images "
              f"(training took {d['train_seconds']:.0f} s). SQNR: logits against fp32 on the test set.", "",
              "| variant | accuracy % | vs fp32 (points) | logit SQNR dB | file bytes |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in d["rows"]:
        size = "" if r["bytes"] is None else f"{r['bytes']:,}"
        sq = "inf" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.1f}"
        lines.append(f"| {r['variant']} | {r['accuracy']:.2f} | {r['accuracy'] - fp32:+.2f} | {sq} | {size} |")
    if report.get("calibration"):
        lines += ["", "## Calibration methods on a wide-range CNN", "",
                  "`wide_range_cnn`: depthwise-separable, per-channel ranges over four decades; SQNR of the outputs "
                  "against fp32 on 4 held-out batches of 8.", "",
                  "| method | output SQNR dB | pass held-out SQNR dB | ranges used (per tensor) "
                  "| fell back to min-max |",
                  "| --- | ---: | ---: | --- | --- |"]
        for r in report["calibration"]:
            used = ", ".join(f"{m} {n}" for m, n in r["methods_used"].items())
            lines.append(f"| {r['method']} | {r['sqnr_db']:.1f} | {r['pass_sqnr_db']:.1f} | {used} | "
                         f"{', '.join(r['fell_back']) or '-'} |")
    for s in report["speed"]:
        lines += ["", f"## {s['model']}: latency (ms, median) and size", "",
                  "| variant | " + " | ".join(f"{t} thread{'s' if t != '1' else ''} ms | x eager" for t in s["latency_ms"])
                  + " | SQNR dB | file MB | x fp32 file |",
                  "| --- |" + " ---: | ---: |" * len(s["latency_ms"]) + " ---: | ---: | ---: |"]
        fp32_size = {"onnx": s["sizes"]["fp32 ONNX Runtime"], "ptl": s["sizes"]["fp32 lite interpreter"]}
        for key in s["latency_ms"][next(iter(s["latency_ms"]))]:
            cells = []
            for t, lat in s["latency_ms"].items():
                cells += [f"{lat[key]:.1f}", f"{lat['eager fp32'] / lat[key]:.2f}"]
            size = s["sizes"].get(key)
            base = fp32_size["ptl" if "lite" in key else "onnx"]
            sq = s["sqnr_db"].get(key, math.nan)
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {'inf' if math.isinf(sq) else f'{sq:.1f}'} | "
                         + ("" if size is None else f"{size / 1e6:.2f}") + " | "
                         + ("" if size is None else f"{size / base:.2f}") + " |")
        lines += ["", f"1-minute load average {s['load_average_before_timing']:.1f} before timing and "
                      f"{s['load_average_after_timing']:.1f} after, on {os.cpu_count()} CPUs (other jobs share the machine: "
                      "compare rows within a column, not with other runs)."]
        lines += ["", f"graphopt held-out SQNR in the pass: {', '.join(f'{v:.1f}' for v in s['graphopt_held_out_sqnr_db'])} dB. "
                      "Setup seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["setup_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 thread and fewer timing rounds")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    args = ap.parse_args(argv)
    threads = [1] if args.quick else [1, 2]
    rounds, calls = (3, 3) if args.quick else (6, 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"quick": args.quick, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("digits CNN accuracy ...", file=sys.stderr)
        report["digits"] = bench_digits(work)
        print("calibration methods on the wide-range CNN ...", file=sys.stderr)
        report["calibration"] = bench_calibration()
        report["speed"] = []
        for name in args.models.split(","):
            print(f"{name} speed and size ...", file=sys.stderr)
            report["speed"].append(bench_speed(name, threads, work, rounds, calls))
    stem = "quantize_quick" if args.quick else "quantize"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
