"""Quantized (QDQ) graphs in the runtimes: ONNX Runtime's fused int8 ops and torch's int8
kernels in the lite interpreter, each checked against the QDQ graph within one quantization
step of the output.
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.jit.mobile import _load_for_lite_interpreter

import graphopt
import graphopt.passes.fold_weight_quant  # noqa: F401  (registers the passes)
import graphopt.passes.fuse_conv_bn_relu  # noqa: F401
import graphopt.passes.quantize  # noqa: F401
from graphopt.backends._quantized_torchscript import convert_for_torchscript
from graphopt.errors import LoweringError
from graphopt.quantization import kernels, qdq
from graphopt.quantization.error_bounds import output_error_bounds
from graphopt.backends._onnx_symbolics import register_torchscript_symbolics

OPSET = 18


@pytest.fixture(autouse=True)
def fixed_seed():
    """Models draw their weights from the global generator: same weights whatever the test order."""
    torch.manual_seed(0)


def bn(channels: int) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(channels)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(channels) * 0.1)
        layer.running_var.copy_(torch.rand(channels) + 0.5)
    return layer


class Net(nn.Module):
    """conv-bn-relu stem, residual block with add+relu, max-pool, global pool, linear."""

    def __init__(self, width: int = 8, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), bn(width), act())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), bn(width), act(),
                                  nn.Conv2d(width, width, 3, padding=1), bn(width))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = torch.relu(self.body(x) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def quantized(model: nn.Module, x: torch.Tensor = X, config: str = "x86", fold: bool = True) -> fx.GraphModule:
    torch.manual_seed(0)
    calib = [(torch.randn_like(x),) for _ in range(5)]
    pipeline = "fuse-conv-bn-relu,quantize" + (",fold-weight-quantization,eliminate-dead-code" if fold else "")
    manager = graphopt.PassManager(pipeline, verify="none", on_failure="raise", options={"quantize": {"config": config}})
    return manager.run(model.eval(), (x,), calibration_data=calib).module


def output_step(gm: fx.GraphModule) -> float:
    (step,) = kernels.output_steps(gm)
    assert step is not None
    return step


def inputs_like(x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [x] + [torch.randn(x.shape, generator=g) for _ in range(n - 1)]


# --------------------------------------------------------------------------- ONNX Runtime


def export_onnx(gm: fx.GraphModule, path: Path, x: torch.Tensor = X, dynamo: bool = False) -> Path:
    if dynamo:
        torch.onnx.export(gm, (x,), str(path), dynamo=True, external_data=False, verbose=False)
    else:
        register_torchscript_symbolics(OPSET)
        torch.onnx.export(gm, (x,), str(path), dynamo=False, opset_version=OPSET)
    return path


def ort_session(path: Path) -> tuple[ort.InferenceSession, Counter]:
    """A session with all graph optimizations, and the op counts of the optimized model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def max_steps_off(gm: fx.GraphModule, run, x: torch.Tensor = X) -> float:
    worst = 0.0
    for xi in inputs_like(x):
        with torch.no_grad():
            want = gm(xi).numpy()
        worst = max(worst, float(np.abs(np.asarray(run(xi)) - want).max()) / output_step(gm))
    return worst


def ort_runner(session: ort.InferenceSession):
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


class TestOnnxRuntime:
    def test_qdq_fuses_into_int8_ops_and_matches_the_graph(self, tmp_path):
        gm = quantized(Net())
        session, ops = ort_session(export_onnx(gm, tmp_path / "net.onnx"))
        assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
        assert ops["QLinearGlobalAveragePool"] == 1 and "Conv" not in ops and "Add" not in ops
        assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # only at the graph's edges
        assert max_steps_off(gm, ort_runner(session)) <= 1.0 + 1e-4

    def test_verify_accepts_the_runtime_within_the_lowering_tolerance(self, tmp_path):
        gm = quantized(Net())
        session, _ = ort_session(export_onnx(gm, tmp_path / "net.onnx"))
        tolerance = kernels.lowering_tolerance(gm)
        # derived from every step on the paths to the output: at least the output's own steps
        (bound,) = output_error_bounds(gm)
        assert tolerance.atol == pytest.approx(max(kernels.PATH_SPREAD * bound, kernels.LOWERING_STEPS * output_step(gm)))
        assert graphopt.verify.compare(gm, ort_runner(session), (X,), tolerance=tolerance).ok

    def test_unfolded_weights_fuse_too(self, tmp_path):
        gm = quantized(Net(), fold=False)
        session, ops = ort_session(export_onnx(gm, tmp_path / "net.onnx"))
        assert ops["QLinearConv"] == 3
        assert max_steps_off(gm, ort_runner(session)) <= 1.0 + 1e-4

    def test_dynamo_exporter_writes_quantize_linear_and_dequantize_linear(self, tmp_path):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        x = torch.randn(1, 3, 8, 8)
        gm = quantized(model, x)
        path = export_onnx(gm, tmp_path / "small.onnx", x, dynamo=True)
        written = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        assert written["QuantizeLinear"] >= 2 and written["DequantizeLinear"] >= 3
        session, ops = ort_session(path)
        assert ops["QLinearConv"] == 1
        assert max_steps_off(gm, ort_runner(session), x) <= 1.0 + 1e-4

    def test_rounding_ties_match_quantize_linear(self, tmp_path):
        class Ties(nn.Module):
            def forward(self, x):
                q = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.25, 3, 0, 255, torch.uint8)
                return torch.ops.quantized_decomposed.dequantize_per_tensor(q, 0.25, 3, 0, 255, torch.uint8)

        gm = fx.symbolic_trace(Ties())
        x = (torch.arange(-16, 16, dtype=torch.float32) * 0.25 + 0.125).reshape(1, 32)  # every value a tie
        session, _ = ort_session(export_onnx(gm, tmp_path / "ties.onnx", x))
        np.testing.assert_array_equal(ort_runner(session)(x), gm(x).numpy())

    def test_int8_file_is_under_a_third_of_fp32(self, tmp_path):
        model = Net(width=128).eval()  # wide enough that weights, not code, fill the file
        fp32 = fx.symbolic_trace(model)
        register_torchscript_symbolics(OPSET)
        torch.onnx.export(fp32, (X,), str(tmp_path / "fp32.onnx"), dynamo=False, opset_version=OPSET)
        int8 = export_onnx(quantized(model), tmp_path / "int8.onnx")
        assert int8.stat().st_size < 0.3 * (tmp_path / "fp32.onnx").stat().st_size

    @pytest.mark.parametrize("groups", [1, 2])
    def test_transposed_conv_runs_in_float_between_dequantize_and_quantize(self, groups, tmp_path):
        """ONNX Runtime's CPU provider has no int8 transposed convolution (its QLinearConvTranspose
        is for the XNNPACK provider), so the QDQ pairs around it stay and it computes in float:
        still within a step of the graph, the conv before it on QLinearConv."""
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=groups))
        gm = quantized(model)
        path = export_onnx(gm, tmp_path / "deconv.onnx")
        written = onnx.load(str(path)).graph.node
        producers = {out: n for n in written for out in n.output}
        (deconv,) = [n for n in written if n.op_type == "ConvTranspose"]
        weight_dq = producers[deconv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        # per output channel, which is axis 1 of a transposed conv's (in, out/groups, kh, kw) weight
        assert {a.name: a.i for a in weight_dq.attribute}["axis"] == 1
        session, ops = ort_session(path)
        assert ops["QLinearConv"] == 1 and ops["ConvTranspose"] == 1 and "QLinearConvTranspose" not in ops
        optimized = onnx.load(str(path.with_suffix(".opt.onnx"))).graph.node
        producers = {out: n.op_type for n in optimized for out in n.output}
        (deconv,) = [n for n in optimized if n.op_type == "ConvTranspose"]
        assert [producers[name] for name in deconv.input[:2]] == ["DequantizeLinear", "DequantizeLinear"]
        assert [n.op_type for n in optimized if deconv.output[0] in n.input] == ["QuantizeLinear"]
        assert max_steps_off(gm, ort_runner(session)) <= 1.0 + 1e-4
        assert graphopt.lower(gm, (X,), backend="onnx", path=tmp_path / "lowered.onnx").verdict.ok

    def test_transposed_conv_weights_never_count_as_saturating(self, monkeypatch):
        monkeypatch.setattr(kernels, "has_vnni", lambda: False)  # as on a CPU without VNNI
        deconv_only = quantized(nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), config="xnnpack")
        assert kernels.saturating_weights(deconv_only) == []
        both = quantized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3)), config="xnnpack")
        (conv,) = [n for n in both.graph.nodes if n.target is F.conv2d or n.target is torch.conv2d]
        assert kernels.saturating_weights(both) == [f"{conv.args[1].name}: 127"]

    @pytest.mark.skipif(kernels.has_vnni(), reason="VNNI CPUs do not saturate")
    def test_full_range_weights_saturate_here_which_is_why_x86_uses_7_bits(self, tmp_path):
        model = Net(width=32, act=nn.ReLU6)
        ok = quantized(model, config="x86")
        bad = quantized(model, config="xnnpack")
        assert kernels.saturating_weights(ok) == []
        assert len(kernels.saturating_weights(bad)) == 4 and all(w.endswith(": 127") for w in kernels.saturating_weights(bad))
        assert max_steps_off(ok, ort_runner(ort_session(export_onnx(ok, tmp_path / "ok.onnx"))[0])) <= 1.0 + 1e-4
        assert max_steps_off(bad, ort_runner(ort_session(export_onnx(bad, tmp_path / "bad.onnx"))[0])) > 2


# --------------------------------------------------------------------------- lite interpreter


def lite(module: nn.Module, freeze: bool = True) -> tuple[object, int]:
    """Script, freeze, save for the lite interpreter, load it there; returns (module, bytes)."""
    scripted = torch.jit.script(module).eval()
    if freeze:
        scripted = torch.jit.freeze(scripted)
    buffer = scripted._save_to_buffer_for_lite_interpreter()
    return _load_for_lite_interpreter(io.BytesIO(buffer)), len(buffer)


class TestLiteInterpreter:
    @pytest.mark.parametrize("config,engine", [("x86", "x86"), ("xnnpack", "qnnpack"), ("x86", "qnnpack")])
    def test_int8_kernels_in_the_lite_interpreter_match_the_graph(self, config, engine):
        gm = quantized(Net(act=nn.ReLU6), config=config)
        converted = convert_for_torchscript(gm, (X,), engine=engine)
        assert converted.meta["int8_layers"] == ["conv2d -> ConvReLU2d", "conv2d_1 -> ConvReLU2d",
                                                 "conv2d_2 -> Conv2d", "linear -> Linear"]
        code = converted.code
        assert "quantized.add_relu" in code and "max_pool2d" in code and code.count("dequantize()") == 1
        module, _ = lite(converted)
        assert max_steps_off(gm, module) <= 1.0 + 1e-4

    def test_unfolded_graph_converts_as_well(self):
        gm = quantized(Net(), fold=False)
        module, _ = lite(convert_for_torchscript(gm, (X,)))
        assert max_steps_off(gm, module) <= 1.0 + 1e-4

    def test_int8_activations_become_quint8_with_the_zero_point_moved_by_128(self):
        gm = quantized(Net(), config="xnnpack")
        (q_in,) = [n for n in gm.graph.nodes if qdq.is_quantize(n) and n.args[0].op == "placeholder"]
        converted = convert_for_torchscript(gm, (X,), engine="qnnpack")
        (q_new,) = [n for n in converted.graph.nodes if n.target is torch.quantize_per_tensor]
        assert q_new.args[1:] == (q_in.args[1], q_in.args[2] + 128, torch.quint8)

    def test_fixed_range_cat_and_pooling_run_on_integers(self):
        class Mixed(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
                self.tail = nn.Conv2d(4, 2, 1)

            def forward(self, x):  # the sigmoid read by a conv: int8 (at the output it would stay float)
                y = torch.cat([self.a(x), F.max_pool2d(F.max_pool2d(self.b(x), 1), 1)], 1)
                return self.tail(torch.sigmoid(self.head(y)))

        gm = quantized(Mixed())
        converted = convert_for_torchscript(gm, (X,))
        code = converted.code
        assert "quantized.cat" in code and "torch.sigmoid(head" not in code
        (sigmoid,) = [n for n in converted.graph.nodes if n.target is torch.sigmoid]
        assert sigmoid.args[0].op == "call_module"  # reads the conv's integers, no dequantize
        module, _ = lite(converted)
        assert max_steps_off(gm, module) <= 1.0 + 1e-4

    def test_clamp_inside_the_output_range_stays_float_and_correct(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.Hardtanh(-0.5, 0.5), nn.Conv2d(4, 4, 1))
        gm = quantized(model)
        converted = convert_for_torchscript(gm, (X,))
        assert converted.meta["int8_layers"] == ["conv2d_1 -> Conv2d"]
        module, _ = lite(converted)
        assert max_steps_off(gm, module) <= 1.0 + 1e-4

    @pytest.mark.skipif(kernels.has_vnni(), reason="VNNI CPUs do not saturate")
    def test_full_range_weights_are_refused_on_the_x86_engine_without_vnni(self):
        gm = quantized(Net(), config="xnnpack")
        with pytest.raises(LoweringError, match="this CPU has no VNNI.*engine='qnnpack'"):
            convert_for_torchscript(gm, (X,), engine="x86")

    def test_unknown_engine_is_a_lowering_error(self):
        with pytest.raises(LoweringError, match="quantized engine 'fbgemm2'"):
            convert_for_torchscript(quantized(Net()), (X,), engine="fbgemm2")

    @pytest.mark.parametrize("engine", ["x86", "qnnpack"])
    def test_int8_ptl_is_under_a_third_of_fp32_when_not_frozen(self, engine):
        model = Net(width=128).eval()  # wide enough that weights, not code, fill the file
        _, fp32_bytes = lite(fx.symbolic_trace(model))
        converted = convert_for_torchscript(quantized(model), (X,), engine=engine)
        _, int8_bytes = lite(converted, freeze=False)
        assert int8_bytes < 0.3 * fp32_bytes
        _, frozen_bytes = lite(converted)  # torch.jit.freeze stores x86-packed weights twice
        assert (frozen_bytes > 1.6 * int8_bytes) == (engine == "x86")
