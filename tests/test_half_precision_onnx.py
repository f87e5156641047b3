"""float16 and bfloat16 models to ONNX: captured, optimized with mobile-fp32 and lowered.

float16 is written as it is and verified at float16's tolerance (not float32's, which ONNX
Runtime's float16 kernels miss by rounding alone). bfloat16 has no kernels in ONNX Runtime's
CPU provider: the file computes in float32, the runner casts at the boundaries, the report's
notes say so, and it is verified at bfloat16's tolerance."""
from __future__ import annotations


import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.lowering import other_kernels_tolerance
from graphopt.verify import Tolerance


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.features(x)


def cnn():
    return SmallCNN(), (torch.randn(2, 3, 16, 16),)


def bert():
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is not installed (pip install 'graphopt[test]')")
    config = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    return transformers.BertModel(config), (torch.randint(0, 100, (2, 8)),)


MODELS = {"cnn": cnn, "bert": bert}
ONNX_TYPES = {torch.float16: onnx.TensorProto.FLOAT16, torch.float32: onnx.TensorProto.FLOAT}


def in_dtype(make, dtype):
    torch.manual_seed(0)
    model, inputs = make()
    return model.eval().to(dtype), tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def first_output(out):
    return out if isinstance(out, torch.Tensor) else out["last_hidden_state"]


def file_types(path) -> tuple[list[int], list[int]]:
    model = onnx.load(str(path))
    return ([i.type.tensor_type.elem_type for i in model.graph.input],
            [o.type.tensor_type.elem_type for o in model.graph.output])


def tolerances(artifact) -> set[tuple[float, float]]:
    return {(o["tolerance"]["rtol"], o["tolerance"]["atol"]) for v in artifact.report["verification"].values()
            for o in v["outputs"]}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float16_model_lowers_to_float16_onnx_verified_at_float16_tolerance(name, tmp_path):
    model, x = in_dtype(MODELS[name], torch.float16)
    result = graphopt.optimize(model, x, "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed, result.report
    artifact = graphopt.lower(result.module, x, backend="onnx", path=tmp_path / name, reference=model)
    fp16 = Tolerance.for_dtype(torch.float16)
    assert other_kernels_tolerance(torch.float16) == fp16
    assert tolerances(artifact) == {(fp16.rtol, fp16.atol)}  # derived from the outputs' dtype
    inputs, outputs = file_types(artifact.path)
    assert set(outputs) == {onnx.TensorProto.FLOAT16}
    if name == "cnn":
        assert inputs == [onnx.TensorProto.FLOAT16]
    got, want = first_output(artifact.run(*x)), first_output(model(*x))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=fp16.rtol, atol=fp16.atol * 10)
    assert not any("bfloat16" in note for note in artifact.report.get("notes", []))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_model_lowers_computing_in_float32_and_says_so(name, tmp_path):
    model, x = in_dtype(MODELS[name], torch.bfloat16)
    result = graphopt.optimize(model, x, "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed, result.report
    artifact = graphopt.lower(result.module, x, backend="onnx", path=tmp_path / name, reference=model)
    assert any(note.startswith("bfloat16 graph written in float32: ONNX Runtime's CPU provider has no bfloat16")
               for note in artifact.report["notes"])
    bf16 = Tolerance.for_dtype(torch.bfloat16)
    assert tolerances(artifact) == {(bf16.rtol, bf16.atol)}
    inputs, outputs = file_types(artifact.path)
    assert set(outputs) == {onnx.TensorProto.FLOAT}
    if name == "cnn":
        assert inputs == [onnx.TensorProto.FLOAT]
    got, want = first_output(artifact.run(*x)), first_output(model(*x))
    assert got.dtype == torch.bfloat16  # the runner casts back to the graph's dtype
    scale = want.double().abs().max().item()
    assert (got.double() - want.double()).abs().max().item() <= bf16.atol + bf16.rtol * scale
    assert all(p.dtype == torch.bfloat16 for p in result.module.parameters())  # the graph itself is not changed
