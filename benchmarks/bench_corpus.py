"""The corpus: many real architectures through every graphopt stage, one process per model.

    python -m benchmarks.bench_corpus [--families hf,timm,torchvision] [--models hf:bert,...] [--force]
                                      [--timeout 900] [--out DIR]
    python -m benchmarks.run --sections corpus

Models (names are ``family:name``):

- ``hf:*``: the Hugging Face models of ``examples/transformers_small_models.py`` (the one place
  their small random configs live) plus :data:`HF_EXTRA`, called as users call them: keyword
  inputs (``input_ids`` + ``attention_mask``, ``pixel_values``, ``input_features``), a
  ``ModelOutput`` out. Text 2x8 tokens, images 2x3x32x32.
- ``timm:*``: :data:`TIMM_MODELS` (``pretrained=False``), 2x3x64x64 where the model takes it
  (ViT-like models are built with ``img_size=64``), else the smallest size of :func:`_fitting_size`.
- ``torchvision:*``: every classification model of ``torchvision.models`` up to
  :data:`TORCHVISION_MAX_PARAMS` parameters (counted from its weights' metadata, nothing is
  downloaded), the segmentation models of :data:`TV_SEGMENTATION` and the detection backbones
  of :data:`TV_DETECTION`, at 2x3x64x64 where they take it. Weights are random and batch-norm
  statistics randomized (fresh statistics make BN an identity and hide folding bugs).

Stages, per model, each with its status (ok / declined with the reason / crash / wrong, see
:func:`classify`) and its wall time: ``capture``; ``mobile-fp32`` (the preset with final
verification); ``onnx`` and ``lite`` (``graphopt.lower`` of the mobile-fp32 graph, verified in
ONNX Runtime and the lite interpreter, and against the model itself); ``executorch`` (where the
package is installed); ``int8-onnx`` (mobile-int8, lowered to ONNX); ``prune`` (mobile-pruned).
Peers timed in the same process: ``torch.export.export`` and ``torch.onnx.export(dynamo=True)``
of the original model. Every process warms all timed paths up on a tiny model first, so no row
pays for first imports.

Each model runs in ``python -m benchmarks.bench_corpus --worker NAME`` with a time-out; the
results file is rewritten after every model and models already in it are skipped (``--force``
reruns them), so an interrupted run resumes. A family whose package is missing is listed as
"not run" with the install hint. Output: ``<out>/corpus.json`` and ``<out>/corpus.md``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("hf", "timm", "torchvision")
STAGES = ("capture", "mobile-fp32", "onnx", "lite", "executorch", "int8-onnx", "prune")
PEERS = ("torch.export", "onnx dynamo")
STATUSES = ("ok", "declined", "crash", "wrong", "not run")
INSTALL_HINTS = {
    "hf": "pip install transformers",
    "timm": "pip install timm (with a torchvision that matches torch, see benchmarks/README.md)",
    "torchvision": "pip install torch==2.14.1 torchvision==0.29.1 (a matching pair, see benchmarks/README.md)",
}
IMAGE_SIZE = 64
TORCHVISION_MAX_PARAMS = 60_000_000

# Hugging Face models beyond the examples' (small random configs, nothing downloaded)
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _hf_extra() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    import transformers as T

    return {
        "roberta": (lambda: T.RobertaModel(T.RobertaConfig(vocab_size=100, max_position_embeddings=64, **HF_SMALL)),
                    "text"),
        "albert": (lambda: T.AlbertModel(T.AlbertConfig(vocab_size=100, embedding_size=16, max_position_embeddings=64,
                                                        **HF_SMALL)), "text"),
        "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                           num_heads=2)), "text"),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)), "image"),
        "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(image_size=32, patch_size=8, num_labels=5,
                                                                   **HF_SMALL)), "image"),
        "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=5)),
            "image"),
    }


HF_EXTRA = ("roberta", "albert", "t5_encoder", "convnext", "deit", "segformer")

#: CNNs, mobile nets, ViTs and hybrids; names timm does not know are reported as such
TIMM_MODELS = (
    # CNNs
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s", "regnetx_002",
    "regnety_004", "densenet121", "dla34", "cspresnet50", "cspdarknet53", "vgg11_bn", "repvgg_a0", "gernet_s",
    "selecsls42b", "hrnet_w18_small", "inception_v3", "xception41", "nf_resnet26",
    # mobile nets
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenetv4_conv_small", "efficientnet_b0",
    "efficientnet_lite0", "tf_efficientnet_b0", "mnasnet_100", "fbnetc_100", "ghostnet_100", "lcnet_050",
    "tinynet_a", "hardcorenas_a", "rexnet_100", "mixnet_s", "repvit_m1", "fastvit_t8", "efficientvit_b0",
    # ViTs
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_small_patch16_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0", "poolformer_s12",
    # hybrids
    "convnext_atto", "convnextv2_atto", "levit_128s", "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small",
    "efficientformer_l1", "tiny_vit_5m_224", "coatnet_nano_rw_224", "botnet26t_256", "halonet26t",
)

TV_SEGMENTATION = ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50")
TV_DETECTION = {"fasterrcnn_mobilenet_v3_large_fpn": "backbone+FPN", "ssdlite320_mobilenet_v3_large": "backbone"}


# ------------------------------------------------------------------------------------ the corpus


def family_available(family: str) -> str | None:
    """None when the family's package imports here, else why not with the install hint."""
    module = {"hf": "transformers", "timm": "timm", "torchvision": "torchvision"}[family]
    try:
        importlib.import_module(module)
    except Exception as exc:  # a torchvision built for another torch raises more than ImportError
        return f"not run: {module} does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); " \
               f"{INSTALL_HINTS[family]}"
    return None


def _hf_examples() -> Any:
    path = REPO_ROOT / "examples" / "transformers_small_models.py"
    spec = importlib.util.spec_from_file_location("transformers_small_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_names(family: str) -> list[str]:
    """Every model of ``family`` (its package must import)."""
    if family == "hf":
        return [f"hf:{n}" for n in list(_hf_examples().MODELS) + list(HF_EXTRA)]
    if family == "timm":
        return [f"timm:{n}" for n in TIMM_MODELS]
    import torchvision

    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        params = min(w.meta.get("num_params", math.inf) for w in weights)
        if params <= TORCHVISION_MAX_PARAMS:
            names.append(f"torchvision:{name}")
    return names + [f"torchvision:{n}" for n in TV_SEGMENTATION + tuple(TV_DETECTION)]


def _image_inputs(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size)


def _fitting_size(model: nn.Module, sizes: list[int]) -> int:
    """The first of ``sizes`` the model runs at in eager mode."""
    failure: Exception | None = None
    for size in sizes:
        try:
            with torch.no_grad():
                model(_image_inputs(size))
            return size
        except Exception as exc:  # too small for its pooling/windows: try the next size
            failure = exc
    raise RuntimeError(f"runs at none of the sizes {sizes}: {failure}")


def load(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """(model in eval mode, keyword inputs, description of the inputs) for ``family:name``."""
    from graphopt.app import examples

    family, short = name.split(":", 1)
    torch.manual_seed(0)
    if family == "hf":
        ex = _hf_examples()
        if short in ex.MODELS:
            make, make_inputs = ex.MODELS[short]
            kind = "text" if make_inputs is ex.text else "image" if make_inputs is ex.image else "audio"
        else:
            make, kind = _hf_extra()[short]
            make_inputs = {"text": ex.text, "image": ex.image}[kind]
        model = make().eval()
        (x,) = make_inputs()
        if kind == "text":
            return model, {"input_ids": x, "attention_mask": torch.ones_like(x)}, \
                f"input_ids + attention_mask {tuple(x.shape)}"
        key = "pixel_values" if kind == "image" else "input_features"
        return model, {key: x}, f"{key} {tuple(x.shape)}"
    if family == "timm":
        import timm

        try:
            model = timm.create_model(short, pretrained=False, img_size=IMAGE_SIZE)
        except Exception:  # a model without an img_size argument: its size is what it takes
            model = timm.create_model(short, pretrained=False)
        model.eval()
        default = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        sizes = [IMAGE_SIZE, 96, 128, default]
    else:
        import torchvision

        if short in TV_DETECTION:
            detector = torchvision.models.get_model(short, weights=None, weights_backbone=None)
            model = detector.backbone
            sizes = [IMAGE_SIZE, 128, 320]
        elif short in TV_SEGMENTATION:
            model = torchvision.models.get_model(short, weights=None, weights_backbone=None)
            sizes = [IMAGE_SIZE, 128]
        else:
            try:
                model = torchvision.models.get_model(short, weights=None, image_size=IMAGE_SIZE)
            except TypeError:
                model = torchvision.models.get_model(short, weights=None)
            min_size = torchvision.models.get_model_weights(short).DEFAULT.meta.get("min_size", (1, 1))[0]
            sizes = [max(IMAGE_SIZE, min_size), 128, 224]
        model.eval()
    examples.randomize_batch_norms(model)
    size = _fitting_size(model, sizes)
    first = next(iter(inspect.signature(model.forward).parameters))  # "x", "input", "images", ...
    return model, {first: _image_inputs(size)}, f"{first} 2x3x{size}x{size}"


# ------------------------------------------------------------------------------------ one model


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, first line) of a stage's exception. A GraphoptError that refuses cleanly is
    "declined"; one that reports a failed check is "wrong"; anything else is a "crash"."""
    from graphopt.errors import GraphoptError, VerificationError

    first = (str(exc).strip().splitlines() or [""])[0][:400]
    line = f"{type(exc).__name__}: {first}"
    if isinstance(exc, VerificationError) or "gives different results from" in first:
        return "wrong", line
    if isinstance(exc, GraphoptError):
        return "declined", line
    return "crash", line


def _judge_pipeline(result: Any, budget_declines: bool) -> tuple[str, str]:
    """Status of a pipeline run that returned: its rolled-back passes and its final check."""
    for record in result.report.failed:
        error = (record.error or "").strip().splitlines()[0][:400] if record.error else ""
        if budget_declines and record.error and record.error.startswith(("int8 output SQNR", "int8 loses")):
            return "declined", f"{record.name}: {error}"
        if "broke its" in (record.error or ""):
            return "wrong", f"{record.name} rolled back: {error}"
        return "crash", f"{record.name} rolled back: {error}"
    check = result.report.final_check
    if check == "mismatch":
        return "wrong", f"final verification: {str(result.report.final_verdict).splitlines()[0][:300]}"
    if check == "over budget":
        return ("declined" if budget_declines else "wrong"), result.report.final_check_text()[:300]
    return "ok", f"final check {check}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _stage(out: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage, time it and record its status in ``out``; its value, or None."""
    start = time.perf_counter()
    try:
        with _quiet():
            value = fn()
        status, detail = value if isinstance(value, tuple) and len(value) == 2 and value[0] in STATUSES else ("ok", "")
    except Exception as exc:
        value = None
        status, detail = classify(exc)
        if status == "crash":
            detail += "\n" + "".join(traceback.format_exception(exc)[-3:])[-800:]
    out[name] = {"status": status, "seconds": round(time.perf_counter() - start, 3), "detail": detail}
    return value


def _warm_up(workdir: Path, wanted: tuple[str, ...]) -> None:
    """Every timed path once on a tiny model, so the model's figures exclude first imports."""
    import graphopt

    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    with _quiet(), contextlib.redirect_stdout(open(os.devnull, "w")):
        torch.export.export(tiny, x)
        if "onnx dynamo" in wanted:
            torch.onnx.export(tiny, x, str(workdir / "warm_dynamo.onnx"), dynamo=True)
        result = graphopt.optimize(graphopt.capture(tiny, x), x, "mobile-fp32", verify="final", progress=False)
        for stage, backend in (("onnx", "onnx"), ("lite", "torchscript-mobile")):
            if stage in wanted or (stage == "onnx" and "int8-onnx" in wanted):
                graphopt.lower(result.module, x, backend=backend, path=workdir / "warm", progress=False)


def run_model(name: str, workdir: Path, wanted: tuple[str, ...] = STAGES + PEERS) -> dict[str, Any]:
    """Every stage and peer of ``wanted`` on one model (the worker's job); the others are
    recorded as not run. Capture always runs, and mobile-fp32 whenever a backend stage does."""
    import graphopt
    import graphopt.passes  # noqa: F401  (registers the passes and presets)
    from graphopt.capture import front_end

    _warm_up(workdir, wanted)
    record: dict[str, Any] = {"name": name, "stages": {}, "peers": {}}
    start = time.perf_counter()
    model, kwargs, described = load(name)
    record["inputs"] = described
    record["params"] = sum(p.numel() for p in model.parameters())
    stages, peers = record["stages"], record["peers"]
    not_asked = {"status": "not run", "seconds": None, "detail": "not asked for (--stages)"}

    if "torch.export" in wanted:
        _stage(peers, "torch.export", lambda: torch.export.export(model, (), kwargs))
    dynamo_path = workdir / "dynamo.onnx"
    if "onnx dynamo" in wanted:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            _stage(peers, "onnx dynamo", lambda: torch.onnx.export(model, (), str(dynamo_path), kwargs=kwargs,
                                                                   dynamo=True))

    gm = _stage(stages, "capture", lambda: graphopt.capture(model, kwargs))
    if gm is None:
        for stage in STAGES[1:]:
            stages[stage] = {"status": "not run", "seconds": None, "detail": "capture failed"}
        return record
    record["front_end"] = (front_end(gm) or {}).get("front_end")
    fp32: dict[str, Any] = {}

    def mobile_fp32() -> tuple[str, str]:
        fp32["result"] = result = graphopt.optimize(gm, kwargs, "mobile-fp32", verify="final", progress=False)
        return _judge_pipeline(result, budget_declines=False)

    if {"mobile-fp32", "onnx", "lite", "executorch"} & set(wanted):
        _stage(stages, "mobile-fp32", mobile_fp32)
    optimized = fp32.get("result")

    def lowered(backend: str, module: Any, label: str, **extra: Any) -> Callable[[], tuple[str, str]]:
        def go() -> tuple[str, str]:
            # a runtime that differs from the graph or from the model raises (see classify)
            artifact = graphopt.lower(module, kwargs, backend=backend, path=workdir / label, progress=False, **extra)
            return "ok", f"verified on {', '.join(artifact.report.get('verification', []))}"
        return go

    for stage, backend in (("onnx", "onnx"), ("lite", "torchscript-mobile"), ("executorch", "executorch")):
        if stage not in wanted:
            stages[stage] = dict(not_asked)
        elif optimized is None:
            stages[stage] = {"status": "not run", "seconds": None, "detail": "mobile-fp32 failed"}
        elif backend == "executorch" and _executorch_missing():
            stages[stage] = {"status": "not run", "seconds": None, "detail": _executorch_missing()}
        else:
            _stage(stages, stage, lowered(backend, optimized.module, stage, reference=model))

    def int8_onnx() -> tuple[str, str]:
        result = graphopt.optimize(gm, kwargs, "mobile-int8", verify="final", progress=False)
        status, detail = _judge_pipeline(result, budget_declines=True)
        if status != "ok":
            return status, detail
        quantized = sum(r.rewrites for r in result.report.records if r.name == "quantize")
        status, lowered_detail = lowered("onnx", result.module, "int8")()
        return status, f"quantize made {quantized} rewrite(s); {detail}; {lowered_detail}"

    def prune() -> tuple[str, str]:
        result = graphopt.optimize(gm, kwargs, "mobile-pruned", verify="final", progress=False)
        status, detail = _judge_pipeline(result, budget_declines=False)
        pruned = [r for r in result.report.records if r.name == "prune-channels"]
        if status == "ok" and pruned and pruned[0].rewrites == 0:
            # the commonest reasons first: the one the output layer always gives says little
            counts = collections.Counter(reason.split(" left whole: ")[-1] for _, reason in pruned[0].declines)
            reasons = "; ".join(f"{n}x {reason[:160]}" for reason, n in counts.most_common(3))
            return "declined", f"nothing pruned ({len(pruned[0].declines)} decline(s): {reasons})"
        if status == "ok" and pruned:
            saved = 1 - pruned[0].param_bytes_after / max(pruned[0].param_bytes_before, 1)
            detail = f"{pruned[0].rewrites} group(s) pruned, {saved:.0%} of parameter bytes; {detail}"
        return status, detail

    for stage, run in (("int8-onnx", int8_onnx), ("prune", prune)):
        if stage in wanted:
            _stage(stages, stage, run)
        else:
            stages[stage] = dict(not_asked)
    stages.setdefault("mobile-fp32", dict(not_asked))
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record



_EXECUTORCH_REASON: list[str | None] = []


def _executorch_missing() -> str | None:
    if not _EXECUTORCH_REASON:
        from graphopt.errors import LoweringError

        try:
            from graphopt.backends import executorch as backend

            backend.executorch_modules()
            _EXECUTORCH_REASON.append(None)
        except (ImportError, LoweringError) as exc:
            _EXECUTORCH_REASON.append(f"executorch is not installed here: {str(exc).splitlines()[0][:150]}")
    return _EXECUTORCH_REASON[0]


def worker(name: str, out: Path, wanted: tuple[str, ...]) -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            record = run_model(name, Path(tmp), wanted)
        except Exception as exc:  # loading the model itself failed: one record says why
            record = {"name": name, "load_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                      "stages": {}, "peers": {}}
    out.write_text(json.dumps(record, indent=1))
    return 0


# ------------------------------------------------------------------------------------ the run


def run_corpus(names: list[str], results: dict[str, Any], path: Path, timeout: float, force: bool,
               show: Callable[[str], None], wanted: tuple[str, ...] = STAGES + PEERS) -> None:
    """Each model in a process of its own; ``results`` saved to ``path`` after every model."""
    models = results.setdefault("models", {})
    for i, name in enumerate(names):
        if name in models and not force:
            continue
        show(f"[{i + 1}/{len(names)}] {name}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "record.json"
            started = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            try:
                done = subprocess.run([sys.executable, "-m", "benchmarks.bench_corpus", "--worker", name, "--record", str(out),
                                       "--stages", ",".join(wanted)],
                                      capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
                if out.exists():
                    record = json.loads(out.read_text())
                else:
                    tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {done.returncode}"]
                    record = {"name": name, "load_error": f"worker died: {tail[0][:300]}", "stages": {}, "peers": {}}
            except subprocess.TimeoutExpired:
                record = {"name": name, "load_error": f"timed out after {timeout:.0f} s", "stages": {}, "peers": {}}
        record["wall_s"] = round(time.perf_counter() - started, 1)
        record["finished_at"] = time.time()
        record["environment"] = {"torch": torch.__version__, "python": platform.python_version(), "commit": _commit()}
        models[name] = record
        save(results, path)
        show(f"    {summary_line(record)}")


def _commit() -> str | None:
    """The checkout's commit, so a results file that several runs filled says what ran each row."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def save(results: dict[str, Any], path: Path) -> None:
    """Write ``results``, keeping the models another run (another environment, say the vision
    venv, or a ``--force`` rerun) wrote into the same file meanwhile; of two records of one model
    the one finished last wins."""
    if path.exists():
        try:
            on_disk = json.loads(path.read_text())
        except ValueError:
            on_disk = {}
        merged = dict(results.get("models", {}))
        for name, record in on_disk.get("models", {}).items():  # the newer record of a model wins
            if record.get("finished_at", 0) >= merged.get(name, {}).get("finished_at", 0):
                merged[name] = record
        results.setdefault("models", {}).update(merged)  # in place: run_corpus holds this dict
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def summary_line(record: dict[str, Any]) -> str:
    if record.get("load_error"):
        return f"{record['name']}: {record['load_error']}"
    return f"{record['name']}: " + ", ".join(f"{k} {v['status']}" for k, v in record["stages"].items())


def _stage_status(record: dict[str, Any], stage: str) -> str:
    if record.get("load_error"):
        return "crash" if stage == "capture" else "not run"
    return record["stages"].get(stage, {}).get("status", "not run")


def _seconds(record: dict[str, Any], *keys: tuple[str, str]) -> float | None:
    total = 0.0
    for where, key in keys:
        entry = record.get(where, {}).get(key)
        if not entry or entry.get("status") != "ok" or entry.get("seconds") is None:
            return None
        total += entry["seconds"]
    return total


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Pass rates per stage, median time ratios and the issue's goals."""
    records = list(results.get("models", {}).values())
    rates = {}
    for stage in STAGES:
        counts = {s: 0 for s in STATUSES}
        for r in records:
            counts[_stage_status(r, stage)] += 1
        ran = len(records) - counts["not run"]
        rates[stage] = {**counts, "ran": ran, "ok_rate": counts["ok"] / ran if ran else None}
    capture_ratio, onnx_ratio = [], []
    for r in records:
        ours = _seconds(r, ("stages", "capture"), ("stages", "mobile-fp32"))
        theirs = _seconds(r, ("peers", "torch.export"))
        if ours is not None and theirs:
            capture_ratio.append(ours / theirs)
        ours = _seconds(r, ("stages", "onnx"))
        theirs = _seconds(r, ("peers", "onnx dynamo"))
        if ours is not None and theirs:
            onnx_ratio.append(ours / theirs)
    end_to_end = [r for r in records if all(_stage_status(r, s) == "ok" for s in ("capture", "mobile-fp32", "onnx", "lite"))]
    bad = {s: sum(_stage_status(r, st) == s for r in records for st in STAGES) for s in ("wrong", "crash")}
    int8_ok = all(_stage_status(r, "int8-onnx") in ("ok", "declined") for r in records)
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    goals = [
        {"goal": "100% of the corpus end to end (capture, mobile-fp32, ONNX and .ptl verified)",
         "figure": f"{len(end_to_end)}/{len(records)}", "met": bool(records) and len(end_to_end) == len(records)},
        {"goal": "int8 to ONNX ok or declined with the reason on every model",
         "figure": ", ".join(f"{rates['int8-onnx'][s]} {s}" for s in STATUSES if rates["int8-onnx"][s])
         + f" of {len(records)}", "met": int8_ok},
        {"goal": "0 wrong, 0 crash", "figure": f"{bad['wrong']} wrong, {bad['crash']} crash", "met": not any(bad.values())},
        {"goal": "capture + mobile-fp32 (final verification) <= 3x torch.export, median",
         "figure": _ratio_text(median(capture_ratio), len(capture_ratio)),
         "met": median(capture_ratio) is not None and median(capture_ratio) <= 3},
        {"goal": "ONNX lowering <= torch.onnx.export(dynamo=True), median",
         "figure": _ratio_text(median(onnx_ratio), len(onnx_ratio)),
         "met": median(onnx_ratio) is not None and median(onnx_ratio) <= 1},
    ]
    return {"rates": rates, "median_capture_fp32_vs_export": median(capture_ratio),
            "median_onnx_vs_dynamo": median(onnx_ratio), "goals": goals}


def _ratio_text(value: float | None, count: int) -> str:
    return "no model measured" if value is None else f"{value:.2f}x (median of {count} models)"


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = ["# The corpus", "", "Written by `python -m benchmarks.run --sections corpus` (`benchmarks/bench_corpus.py`). "
             "Statuses: ok; declined (a graphopt error that refuses, with its reason); crash (an exception that is "
             "not a graphopt error, or a pass that raised); wrong (a verification failed); not run. Times in seconds, "
             "one thread, each model in its own process after a warm-up.", ""]
    for family, reason in results.get("not_run", {}).items():
        lines.append(f"- `{family}`: {reason}")
    runs = collections.Counter((r.get("environment", {}).get("commit") or "unrecorded",
                                r.get("environment", {}).get("torch", "?")) for r in results.get("models", {}).values())
    if runs:
        lines += ["", "Rows by the commit and torch that ran them: " + "; ".join(
            f"{commit} (torch {version}): {n}" for (commit, version), n in sorted(runs.items())) + "."]
    lines += ["", "## Goals", "", "| goal | figure | met |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['figure']} | {'yes' if g['met'] else 'no'} |" for g in summary["goals"]]
    lines += ["", "## Pass rates per stage", "", "| stage | ok | declined | crash | wrong | not run | ok rate |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage, c in summary["rates"].items():
        rate = "-" if c["ok_rate"] is None else f"{c['ok_rate']:.0%}"
        lines.append(f"| {stage} | {c['ok']} | {c['declined']} | {c['crash']} | {c['wrong']} | {c['not run']} | {rate} |")
    lines += ["", "## Models", "", "| model | inputs | front end | " + " | ".join(STAGES) + " | torch.export s | dynamo ONNX s |",
              "| --- " * (len(STAGES) + 5) + "|"]
    problems = []
    for name, r in sorted(results.get("models", {}).items()):
        if r.get("load_error"):
            lines.append(f"| {name} | - | - | " + " | ".join("-" for _ in STAGES) + " | - | - |")
            problems.append(f"- {name}: model did not load or run: {r['load_error']}")
            continue
        cells = []
        for stage in STAGES:
            s = r["stages"].get(stage, {"status": "not run"})
            seconds = f" {s['seconds']:.1f}" if s.get("seconds") is not None and s["status"] != "not run" else ""
            cells.append(f"{s['status']}{seconds}")
            if s["status"] in ("declined", "crash", "wrong"):
                problems.append(f"- {name}, {stage}, {s['status']}: {s['detail'].splitlines()[0] if s['detail'] else ''}")
        peers = [f"{p['seconds']:.1f}" if p.get("status") == "ok" else p.get("status", "-")
                 for p in (r["peers"].get(k, {}) for k in PEERS)]
        lines.append(f"| {name} | {r.get('inputs', '-')} | {r.get('front_end') or '-'} | " + " | ".join(cells)
                     + f" | {' | '.join(peers)} |")
    if problems:
        lines += ["", "## Not ok: model, stage, first line", ""] + problems
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> dict[str, Path]:
    save(results, out / "corpus.json")
    families = {name.split(":", 1)[0] for name in results.get("models", {})}
    results["not_run"] = {f: why for f, why in results.get("not_run", {}).items() if f not in families}
    results["summary"] = summarize(results)
    save(results, out / "corpus.json")
    (out / "corpus.md").write_text(markdown(results))
    return {"json": out / "corpus.json", "markdown": out / "corpus.md"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"any of {', '.join(FAMILIES)}")
    ap.add_argument("--models", default=None, help="comma-separated family:name (default: every model of --families)")
    ap.add_argument("--force", action="store_true", help="rerun models already in the results file")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    ap.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--stages", default=",".join(STAGES + PEERS),
                    help=f"comma-separated, any of {', '.join(STAGES + PEERS)} (default all; the rest are 'not run')")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    wanted = tuple(args.stages.split(","))
    unknown = set(wanted) - set(STAGES + PEERS)
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES + PEERS)}")
    if args.worker:
        return worker(args.worker, Path(args.record), wanted)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("not_run", {})
    names: list[str] = []
    if args.models:
        names = args.models.split(",")
    else:
        for family in args.families.split(","):
            reason = family_available(family)
            if reason:
                results["not_run"][family] = reason
                continue
            results["not_run"].pop(family, None)
            names += model_names(family)

    def show(what: str) -> None:
        print(what, file=sys.stderr, flush=True)

    try:
        run_corpus(names, results, path, args.timeout, args.force, show, wanted)
    finally:
        written = write(results, out)
    for g in results["summary"]["goals"]:
        show(f"{'met' if g['met'] else 'NOT met'}: {g['goal']}: {g['figure']}")
    show(f"written: {written['json']}, {written['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
