"""Accuracy recovery for int8: output SQNR against fp32 with and without the recovery passes.

    python -m benchmarks.bench_accuracy_recovery [--quick] [--out benchmarks/results]

Models (random weights, no download; calibration and test inputs drawn from one normal
distribution, test batches never seen by calibration):

- ``graphopt.examples.mobilenet_v2`` (1x3x224x224; ``--quick``: 1x3x96x96) and a
  depthwise-separable ReLU net whose batch norms have skewed channel scales (gamma
  log-uniform over 1e-2..1e1, the case cross-layer equalization is for): ``mobile-int8`` against
  ``mobile-int8-accurate`` and against each recovery pass alone.
- a small BERT (transformers, hidden 32, 2 layers), as built and with two outlier channels
  (layer-norm weights x30 on channels 3 and 17, the pattern SmoothQuant targets): static and
  dynamic int8 with and without ``smooth-activations{other_readers=rescale}`` (BERT's layer norms
  are also read by residual adds, so the default ``other_readers=decline`` leaves it alone).

Prints one table per model and writes ``accuracy_recovery.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import graphopt
from graphopt import verify
from graphopt.app import examples

_BASE = "canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,eliminate-dead-code"
_END = "fold-weight-quantization,eliminate-dead-code"
CNN_PIPELINES = {
    "mobile-int8": "mobile-int8",
    "+equalize-cross-layer": f"{_BASE},equalize-cross-layer,quantize,{_END}",
    "+correct-quantization-bias": f"{_BASE},quantize,correct-quantization-bias,{_END}",
    "mobile-int8-accurate": "mobile-int8-accurate",
}


class SkewedSeparable(nn.Module):
    """conv-BN-ReLU, then depthwise-separable blocks (dw conv-BN-ReLU, pw conv-BN-ReLU), a
    pooled linear head; BN gammas spread over three decades per channel."""

    def __init__(self, width: int = 32, blocks: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(10 ** torch.empty(m.num_features).uniform_(-2, 1))
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _sqnr(model: nn.Module, optimized: torch.nn.Module, batches: list[tuple]) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for batch in batches:
            for want, got in zip(verify.run(model, batch), verify.run(optimized, batch)):
                if want.is_floating_point():
                    signal += float(want.double().pow(2).sum())
                    noise += float((want.double() - got.double()).pow(2).sum())
    return verify.sqnr_from_powers(signal, noise)


def _run(model, example, pipeline: str, calibration, test) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = graphopt.PassManager(pipeline).run(model, example, calibration_data=calibration)
    status = {r.name: f"{r.status} ({r.rewrites})" for r in result.report.records
              if r.name in ("equalize-cross-layer", "smooth-activations", "quantize", "correct-quantization-bias")}
    return {"pipeline": pipeline, "sqnr_db": round(_sqnr(model, result.module, test), 2), "passes": status}


def cnn(name: str, model: nn.Module, shape: tuple[int, ...], batches: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(*shape, generator=gen),) for _ in range(batches)]
    test = [(torch.randn(*shape, generator=gen),) for _ in range(4)]
    rows = {label: _run(model, calibration[0], p, calibration, test) for label, p in CNN_PIPELINES.items()}
    return {"model": name, "input": "x".join(map(str, shape)), "rows": rows}


def bert(outliers: bool, quick: bool) -> dict:
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).eval()
    if outliers:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight[[3, 17]] *= 30.0
    gen = torch.Generator().manual_seed(2)
    calibration = [(torch.randint(0, 100, (4, 16), generator=gen),) for _ in range(4 if quick else 16)]
    test = [(torch.randint(0, 100, (4, 16), generator=gen),) for _ in range(4)]
    rows = {}
    for mode in ("static", "dynamic"):
        quantize = f"quantize{{mode={mode}}}"
        rows[f"int8 {mode}"] = _run(model, calibration[0], f"{_BASE},{quantize},{_END}", calibration, test)
        rows[f"int8 {mode} + smooth-activations"] = _run(
            model, calibration[0], f"{_BASE},smooth-activations{{other_readers=rescale}},{quantize},{_END}",
            calibration, test)
    return {"model": "bert-small" + (" with outlier channels" if outliers else ""), "input": "4x16 token ids",
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    side = 96 if args.quick else 224
    mobilenet, _ = examples.get_example("mobilenet_v2")
    torch.manual_seed(0)
    results = [
        cnn("mobilenet_v2", mobilenet, (1, 3, side, side), 4 if args.quick else 8),
        cnn("skewed depthwise-separable", SkewedSeparable().eval(), (4, 3, 32, 32), 8),
        bert(False, args.quick),
        bert(True, args.quick),
    ]
    for entry in results:
        print(f"\n{entry['model']} ({entry['input']}): output SQNR vs fp32 on 4 held-out batches")
        for label, row in entry["rows"].items():
            print(f"  {label:40s} {row['sqnr_db']:7.2f} dB   {row['passes']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_recovery.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
