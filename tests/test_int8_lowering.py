"""Lowering graphs from the ``mobile-int8`` preset: ONNX (QDQ fused by ONNX Runtime into int8
ops) and torchscript-mobile (torch's int8 kernels in the lite interpreter), each verified in its
runtime within a few quantization steps of the output.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.app import examples
from graphopt.errors import LoweringError
from graphopt.quantization import has_qdq, kernels, lowering_tolerance
from graphopt.verify import Tolerance


def mobile_int8(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], config: str = "x86", verify: str = "each"
) -> fx.GraphModule:
    generator = torch.Generator().manual_seed(1)
    calibration = [tuple(torch.randn(x.shape, generator=generator) for x in inputs) for _ in range(3)]
    options = {"quantize": {"config": config}}
    gm = graphopt.optimize(model, inputs, "mobile-int8", calibration_data=calibration, options=options,
                           verify=verify).module
    assert has_qdq(gm), "the quantize pass was rolled back: the test model needs other weights or calibration"
    return gm


@pytest.fixture(scope="module", params=["resnet_cnn", "mobilenet_cnn"])
def int8_example(request) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    model, inputs = getattr(examples, request.param)()
    return mobile_int8(model, inputs), inputs


def optimized_op_counts(path: Path) -> Counter:
    """Op types of the model ONNX Runtime runs after all its graph optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def verified_atol(artifact: graphopt.Artifact) -> float:
    return artifact.report["verification"]["example inputs"]["outputs"][0]["tolerance"]["atol"]


class TestOnnx:
    def test_int8_graph_exports_with_the_torchscript_exporter_and_verifies(self, int8_example, tmp_path):
        gm, inputs = int8_example
        artifact = graphopt.lower(gm, inputs, backend="onnx", path=tmp_path / "m.onnx")
        assert artifact.verdict.ok
        assert artifact.report["exporter"] == "torchscript" and "exporter_fallback" not in artifact.report
        counts = artifact.report["op_counts"]
        assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
        assert verified_atol(artifact) == pytest.approx(lowering_tolerance(gm).atol)

    def test_onnx_runtime_runs_the_convolutions_on_int8_kernels(self, int8_example, tmp_path):
        gm, inputs = int8_example
        artifact = graphopt.lower(gm, inputs, backend="onnx", path=tmp_path / "m.onnx")
        ops = optimized_op_counts(artifact.path)
        assert ops["QLinearConv"] > 0 and "Conv" not in ops

    def test_an_explicit_tolerance_is_honoured_over_the_int8_default(self, tmp_path):
        model, inputs = examples.resnet_cnn()
        gm = mobile_int8(model, inputs)
        given = Tolerance(rtol=0.0, atol=0.5)
        artifact = graphopt.lower(gm, inputs, backend="onnx", path=tmp_path / "m.onnx", tolerance=given)
        assert verified_atol(artifact) == 0.5 != pytest.approx(lowering_tolerance(gm).atol)

    @pytest.mark.skipif(kernels.has_vnni(), reason="VNNI CPUs do not saturate")
    def test_full_range_weights_are_refused_without_vnni(self, tmp_path):
        model, inputs = examples.resnet_cnn()
        gm = mobile_int8(model, inputs, config="xnnpack")  # 8-bit weights, up to 127
        with pytest.raises(LoweringError, match=r"exceed \+-64 .*no VNNI.*config='x86'"):
            graphopt.lower(gm, inputs, backend="onnx", path=tmp_path / "m.onnx")


class TestTorchScriptMobile:
    def test_int8_graph_runs_on_int8_kernels_in_the_lite_interpreter(self, int8_example, tmp_path):
        gm, inputs = int8_example
        engine_before = torch.backends.quantized.engine
        artifact = graphopt.lower(gm, inputs, backend="torchscript-mobile", path=tmp_path / "m.ptl")
        assert artifact.verdict.ok
        convs = sum(1 for n in gm.graph.nodes if n.target is torch.nn.functional.conv2d)
        layers = artifact.report["int8_layers"]
        assert sum("Conv" in layer for layer in layers) == convs and any("Linear" in layer for layer in layers)
        assert sum(v for k, v in artifact.report["op_counts"].items() if k.startswith("quantized::conv2d")) == convs
        assert "aten::conv2d" not in artifact.report["op_counts"]
        assert artifact.report["freeze"].startswith("skipped: torch.jit.freeze stores x86-packed")
        assert verified_atol(artifact) == pytest.approx(lowering_tolerance(gm).atol)
        assert torch.backends.quantized.engine == engine_before  # the process-wide setting is restored

    def test_qnnpack_engine_freezes_and_verifies(self, tmp_path):
        model, inputs = examples.mobilenet_cnn()
        artifact = graphopt.lower(mobile_int8(model, inputs), inputs, backend="torchscript-mobile",
                                  path=tmp_path / "m.ptl", engine="qnnpack")
        assert artifact.verdict.ok
        assert artifact.report["freeze"] == "applied" and artifact.report["quantized_engine"] == "qnnpack"

    def test_unknown_engine_is_refused(self, tmp_path):
        model, inputs = examples.resnet_cnn()
        with pytest.raises(LoweringError, match="engine must be one of x86, qnnpack, not 'fbgemm'"):
            graphopt.lower(model, inputs, backend="torchscript-mobile", path=tmp_path / "m.ptl", engine="fbgemm")

    def test_int8_file_is_at_most_035_of_fp32(self, tmp_path):
        # the example CNNs hold ~20k weights, so TorchScript code fills most of their files;
        # wider blocks of the same architecture make the weights dominate, as in real models
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                                  examples.BasicBlock(96, 96), examples.BasicBlock(96, 96), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(96, 10))
            examples.randomize_batch_norms(model)
            inputs = (torch.randn(2, 3, 16, 16),)
        model.eval()
        # this random-weight model misses quantize's 15 dB SQNR budget on noise inputs (14.3 dB), so the
        # pipeline's check is off here: file size does not depend on accuracy, and lowering still
        # verifies the .ptl against the int8 graph
        gm = mobile_int8(model, inputs, verify="none")
        fp32 = graphopt.lower(model, inputs, backend="torchscript-mobile", path=tmp_path / "fp32.ptl")
        int8 = graphopt.lower(gm, inputs, backend="torchscript-mobile", path=tmp_path / "int8.ptl")
        assert int8.verdict.ok
        assert int8.size_bytes <= 0.35 * fp32.size_bytes


def test_float_graphs_lower_as_before(tmp_path):
    model, inputs = examples.resnet_cnn()
    ptl = graphopt.lower(model, inputs, backend="torchscript-mobile", path=tmp_path / "m.ptl")
    assert ptl.report["summary"].startswith("script, frozen") and "int8_layers" not in ptl.report
    assert verified_atol(ptl) == Tolerance.for_dtype(torch.float32).atol
    onnx_artifact = graphopt.lower(model, inputs, backend="onnx", path=tmp_path / "m.onnx")
    assert "QuantizeLinear" not in onnx_artifact.report["op_counts"] and "quantized" not in onnx_artifact.report


class TestToleranceWhereGainsAreUnknown:
    """A layer norm between int8 values and an output scales one-step differences by the inverse
    of its input's spread, which the graph does not tell: the tolerance is measured there."""

    class NormHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    def test_the_nudged_run_widens_the_graph_bound_and_the_report_says_so(self, tmp_path):
        torch.manual_seed(0)
        x = torch.randn(4, 16)
        x[0] *= 0.01  # a row far narrower than the range it is quantized in (ViT's class token): the norm scales it up
        x = (x,)
        gm = mobile_int8(self.NormHead().eval(), x)
        from graphopt.quantization.error_bounds import assumed_ops, simulated_spread

        assert any("layer_norm" in op for op in assumed_ops(gm))
        spread = simulated_spread(gm, [x])
        assert spread > lowering_tolerance(gm).atol
        measured, note = kernels.measured_for_unknown_gains(gm, lowering_tolerance(gm), [x])
        assert measured.atol == spread and "one step off" in note
        artifact = graphopt.lower(gm, x, backend="onnx", path=tmp_path / "m.onnx")
        assert artifact.verdict.ok and verified_atol(artifact) == pytest.approx(spread)
        assert any("one step off" in n for n in artifact.report["notes"])

    def test_graphs_whose_gains_are_known_keep_the_bound_from_the_graph(self, int8_example):
        gm, inputs = int8_example
        tolerance = lowering_tolerance(gm)
        assert kernels.measured_for_unknown_gains(gm, tolerance, [inputs]) == (tolerance, None)
