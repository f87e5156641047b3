"""Hugging Face models end to end, small random configs (no download): capture (the default mode
falls back to torch.export where symbolic tracing cannot follow transformers' code), mobile-fp32
verified at two batch sizes, and ONNX lowering verified in ONNX Runtime at both and against the
model itself.

    python examples/transformers_small_models.py [NAME ...]

Prints one line per model: the front end that captured it, its inputs with their dynamic dims,
the pipeline's final check and the input sets ONNX Runtime was verified on.
"""
from __future__ import annotations

import sys
import tempfile
import time

import torch
import transformers as T

import graphopt
from graphopt.ir import shapes
from graphopt.capture import front_end

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def text() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 100, (2, 8)),)


def image() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 32, 32),)


def fan_in_init(model: torch.nn.Module) -> torch.nn.Module:
    """Conv weights drawn at the scale of trained nets' (He, by fan-in). Hugging Face draws every
    conv from N(0, 0.02): through MobileNetV2's 50 convs, depthwise ones with a fan-in of 9, the
    activations shrink to ~1e-27 and every figure measured on them is noise."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


MODELS = {
    "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL)), text),
    "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)), text),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                     use_cache=False)), text),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=5, **SMALL)), image),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                      depths=[1, 1], num_labels=5)), image),
    "mobilenet_v2": (lambda: fan_in_init(T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=5))), image),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5)), image),
    "mobilevit": (lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64], num_labels=5)), image),
    "whisper_encoder": (lambda: T.WhisperModel(T.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16)).encoder,
        lambda: (torch.randn(2, 8, 32),)),
}


def main(names: list[str]) -> int:
    failed = 0
    for name in names or list(MODELS):
        torch.manual_seed(0)
        make, inputs = MODELS[name]
        start = time.perf_counter()
        try:
            model, example = make().eval(), inputs()
            gm = graphopt.capture(model, example)
            result = graphopt.optimize(gm, example, "mobile-fp32")
            artifact = graphopt.lower(result.module, example, backend="onnx", path=tempfile.mkdtemp() + "/m",
                                      reference=model)
            check = "ok" if result.report.final_verdict.ok and not result.report.failed else "FAILED"
            print(f"{name}: {front_end(gm)['front_end']}; {' | '.join(shapes.describe(gm))}; mobile-fp32 {check}; "
                  f"ONNX verified on {', '.join(artifact.report['verification'])} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            failed += check != "ok"
        except graphopt.GraphoptError as exc:
            failed += 1
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
