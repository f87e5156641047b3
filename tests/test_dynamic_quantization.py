"""quantize{mode=dynamic}: int8 linear layers whose inputs are quantized at run time, in the graph
and lowered (ONNX Runtime's DynamicQuantizeMatMul, torch's quantized::linear_dynamic).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
import graphopt.passes.fold_weight_quant  # noqa: F401  (registers the passes and the preset)
import graphopt.passes.fuse_conv_bn_relu  # noqa: F401
import graphopt.passes.quantize  # noqa: F401
from graphopt.ir import ops
from graphopt.errors import GraphoptError, LoweringError
from graphopt.ir.graph import get_attr_value
from graphopt.quantization import kernels, qdq
from graphopt.backends._onnx_symbolics import register_torchscript_symbolics
from test_int8_lowering import optimized_op_counts  # op types ONNX Runtime runs after its optimizations


@pytest.fixture(autouse=True)
def fixed_seed():
    """Models draw their weights from the global generator: same weights whatever the test order."""
    torch.manual_seed(0)


class Mlp(nn.Module):
    """Three linear layers with a residual add; works on (batch, features) and (batch, tokens, features)."""

    def __init__(self, width: int = 32, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, width, bias=bias), nn.Linear(width, width, bias=bias)
        self.head = nn.Linear(width, 4, bias=bias)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.head(torch.relu(self.fc2(h)) + h)


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


X2 = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
X3 = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def dynamic(model: nn.Module, x: torch.Tensor, pipeline: str = "quantize", *, calib=None, verify: str = "each",
            on_failure: str = "raise", **options):
    """Run ``pipeline`` with quantize in dynamic mode; returns (graph module, records by pass name)."""
    torch.manual_seed(0)
    manager = graphopt.PassManager(pipeline, verify=verify, on_failure=on_failure,
                                   options={"quantize": {"mode": "dynamic", **options}})
    result = manager.run(model.eval(), (x,), calibration_data=calib)
    return result.module, {r.name: r for r in result.report.records}


def targets(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if ops.is_op(n, "linear")]


class TestThePass:
    def test_each_linear_reads_its_input_through_a_run_time_chain_and_convs_stay_float(self):
        gm, records = dynamic(ConvThenLinear(), torch.randn(2, 3, 8, 8))
        (conv,) = [n for n in gm.graph.nodes if ops.is_op(n, "conv2d")]
        assert ops.arg(conv, "input").op == "placeholder" and ops.arg(conv, "weight").op == "get_attr"
        (linear,) = linears(gm)
        assert qdq.dynamic_source(ops.arg(linear, "input")) is not None
        assert qdq.is_weight_dequantize(ops.arg(linear, "weight"))
        counts = targets(gm)
        assert counts[qdq.CHOOSE_QPARAMS] == 1 and counts[qdq.QUANTIZE_DYNAMIC] == 1
        assert counts[qdq.QUANTIZE_PER_TENSOR] == 0 and counts[qdq.DEQUANTIZE_PER_TENSOR] == 0  # no static ranges
        assert list(linear.users)[0].op == "output"  # the output stays float
        assert records["quantize"].figures["units_by_op"] == {"linear": 1}

    def test_a_model_without_linear_layers_stays_float_and_says_why(self):
        gm, records = dynamic(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
        assert not qdq.has_qdq(gm) and records["quantize"].rewrites == 0
        assert "nothing to quantize under config x86 in dynamic mode (linear layers only)" in records["quantize"].notes

    def test_one_chain_per_consumer(self):
        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(16, 3), nn.Linear(16, 5)

            def forward(self, x):
                return self.a(x), self.b(x)

        gm, _ = dynamic(TwoHeads(), X2)
        chooses = [n for n in gm.graph.nodes if n.target is qdq.CHOOSE_QPARAMS]
        assert len(chooses) == 2 and all(c.args[0].op == "placeholder" for c in chooses)
        assert {qdq.dynamic_source(ops.arg(n, "input")).name for n in linears(gm)} == {"x"}

    @pytest.mark.parametrize("config,qrange,dtype,wmax", [("x86", (0, 255), torch.uint8, 64),
                                                         ("xnnpack", (-128, 127), torch.int8, 127)])
    def test_ranges_follow_the_config(self, config, qrange, dtype, wmax):
        gm, _ = dynamic(Mlp(), X2, pipeline="quantize,fold-weight-quantization", config=config)
        for node in gm.graph.nodes:
            if node.target is qdq.CHOOSE_QPARAMS:
                assert (node.args[1], node.args[2], node.args[4]) == (*qrange, dtype)
        for linear in linears(gm):
            dq = ops.arg(linear, "weight")
            integers = get_attr_value(gm, dq.args[0])
            assert dq.args[3] == 0 and dq.args[4:7] == (-wmax, wmax, torch.int8)
            assert integers.dtype == torch.int8 and int(integers.abs().max()) == wmax  # per channel: some row hits it

    def test_no_calibration_data_is_needed_and_none_is_warned_about(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, records = dynamic(Mlp(), X2)
        notes = " ".join(records["quantize"].notes)
        assert "no calibration needed" in notes and "synthesized" not in notes
        assert records["quantize"].figures["mode"] == "dynamic"

    def test_given_batches_only_measure_the_error(self):
        calib = [(torch.randn(6, 16),) for _ in range(3)]
        _, records = dynamic(Mlp(), X2, calib=calib, held_out_batches=2)
        assert "error measured on 2 given batch(es)" in " ".join(records["quantize"].notes)

    def test_ranges_follow_each_batch(self):
        """Where static ranges calibrated on small inputs saturate on a 100x larger batch, the
        dynamic graph chooses that batch's own range."""
        small = [(torch.randn(6, 16) * 0.1,) for _ in range(4)]
        static = graphopt.PassManager("quantize", verify="none", on_failure="raise").run(
            Mlp().eval(), (X2 * 0.1,), calibration_data=small).module
        torch.manual_seed(0)
        model = Mlp().eval()
        gm, _ = dynamic(model, X2)
        large = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * 10

        def sqnr(candidate) -> float:
            with torch.no_grad():
                ref, out = model(large), candidate(large)
            return 10 * math.log10(float(ref.pow(2).sum() / (ref - out).pow(2).sum()))

        assert sqnr(gm) > 30 > 10 > sqnr(static)

    def test_verified_by_the_pass_manager_within_the_budget(self):
        _, records = dynamic(Mlp(), X3, pipeline="mobile-int8")
        record = records["quantize"]
        assert record.status == "changed" and record.min_sqnr_db > 30
        assert records["fold-weight-quantization"].rewrites == 3

    def test_an_outlier_in_held_out_data_breaks_the_budget_and_rolls_back(self):
        model = Mlp().eval()
        with torch.no_grad():
            model.fc1.weight[:, 0] = 0.0  # feature 0 does not matter to the output...
        held_out = torch.randn(6, 16)
        held_out[0, 0] = 1e3  # ...but its one huge value sets the step of the whole tensor
        manager = graphopt.PassManager("quantize", verify="none", options={"quantize": {"mode": "dynamic"}})
        result = manager.run(model, (X2,), calibration_data=[(held_out,)])
        record = result.report.records[-1]
        assert record.status == "rolled-back"
        assert "below the 15 dB budget (mode=dynamic)" in record.error and "mode=static" in record.error
        assert not qdq.has_qdq(result.module)

    def test_skip_keep_float_worst_and_the_per_layer_report_work_as_in_static_mode(self):
        gm, records = dynamic(Mlp(), X2, skip=("head",), per_layer_report=True)
        assert ops.arg(linears(gm)[-1], "weight").op == "get_attr"
        rows = {row["layer"]: row for row in records["quantize"].figures["per_layer"]}
        assert set(rows) == {"linear", "linear_1"}
        assert all(r["isolated_sqnr_db"] > 30 and r["cumulative_sqnr_db"] > 30 for r in rows.values())
        gm, records = dynamic(Mlp(), X2, keep_float_worst=1)
        (kept,) = records["quantize"].figures["kept_float"]
        assert [ops.arg(n, "weight").op for n in linears(gm) if n.name == kept] == ["get_attr"]
        assert sum(qdq.is_weight_dequantize(ops.arg(n, "weight")) for n in linears(gm)) == 2

    def test_a_quantized_graph_is_left_alone_and_weights_fold_bit_identically(self):
        gm, _ = dynamic(Mlp(), X2)
        before = gm(X2)
        again, records = dynamic(gm, X2, pipeline="quantize,fold-weight-quantization")
        assert records["quantize"].rewrites == 0 and records["fold-weight-quantization"].rewrites == 3
        assert torch.equal(again(X2), before)
        assert targets(again)[qdq.QUANTIZE_PER_CHANNEL] == 0 and targets(again)[qdq.CHOOSE_QPARAMS] == 3

    def test_lowering_tolerance_is_four_steps_of_an_8_bit_grid_with_torchs_smallest_step_as_floor(self):
        model = Mlp()
        gm, _ = dynamic(model, X2)
        assert qdq.has_qdq(gm) and qdq.has_dynamic_qdq(gm)
        assert kernels.output_steps(gm) == [None]
        tolerance = kernels.lowering_tolerance(gm)
        assert tolerance.rtol == pytest.approx(kernels.LOWERING_STEPS / 255)
        widest_row = max(float(m.weight.abs().sum(1).max()) for m in (model.fc1, model.fc2, model.head))
        assert tolerance.atol == pytest.approx(kernels.TORCH_DYNAMIC_MIN_STEP * widest_row, rel=0.02)  # int8 weights


# --------------------------------------------------------------------------- lowering


def assert_refused_without_vnni(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], path) -> None:
    """The ONNX lowering refuses int8 weights beyond +-64 on an x86 CPU without VNNI, saying why
    and what to do, and writes nothing."""
    with pytest.raises(LoweringError, match=r"int8 weights exceed \+-64 .*no VNNI.*config='x86'") as info:
        graphopt.lower(gm, inputs, backend="onnx", path=path)
    assert isinstance(info.value, GraphoptError) and not path.exists()


class TestOnnxRuntime:
    @pytest.mark.parametrize("x", [X2, X3], ids=["2d", "3d"])
    @pytest.mark.parametrize("config", ["x86", "xnnpack"])
    def test_linears_fuse_into_dynamic_quantize_matmul(self, x, config, tmp_path):
        gm, _ = dynamic(Mlp(), x, pipeline="mobile-int8", config=config)
        if config == "xnnpack" and not kernels.has_vnni():
            # AVX2 without VNNI: ONNX Runtime's int8 kernels would saturate on xnnpack's full-range
            # weights, and the lowering refuses them (on VNNI CPUs they lower and verify, below)
            assert_refused_without_vnni(gm, (x,), tmp_path / "m.onnx")
            return
        artifact = graphopt.lower(gm, (x,), backend="onnx", path=tmp_path / "m.onnx")
        assert artifact.verdict.ok and artifact.report["integer_linears"] == 3
        written = artifact.report["op_counts"]
        assert written["DynamicQuantizeLinear"] == 3 and written["MatMulInteger"] == 3
        optimized = optimized_op_counts(artifact.path)
        assert optimized["DynamicQuantizeMatMul"] == 3
        leftovers = {"MatMulInteger", "MatMul", "Gemm", "FusedGemm", "MatMulNBits", "DynamicQuantizeLinear"}
        assert not leftovers & set(optimized)
        # the parameters choose_qparams chooses and exact integer products: a step off anywhere would be ~1e-3
        assert artifact.verdict.outputs[0].max_rel < 1e-4

    @pytest.mark.parametrize("config", ["x86", "xnnpack"])
    def test_without_vnni_full_range_weights_are_refused_and_7_bit_ones_lowered(self, config, monkeypatch,
                                                                              tmp_path):
        """Runs on every CPU: the VNNI detection the backend asks says no, as on an AVX2-only CPU."""
        monkeypatch.setattr(kernels, "has_vnni", lambda: False)
        gm, _ = dynamic(Mlp(), X2, pipeline="mobile-int8", config=config)
        if config == "xnnpack":
            assert len(kernels.saturating_weights(gm)) == 3  # int8 weights up to 127 in each linear
            assert_refused_without_vnni(gm, (X2,), tmp_path / "m.onnx")
        else:  # 7-bit weights (+-64) cannot saturate: lowered and verified as on any CPU
            assert kernels.saturating_weights(gm) == []
            artifact = graphopt.lower(gm, (X2,), backend="onnx", path=tmp_path / "m.onnx")
            assert artifact.verdict.ok and artifact.report["integer_linears"] == 3

    @pytest.mark.parametrize("flags, vnni", [("fpu sse avx2 fma", False), ("avx2 avx512f avx512_vnni", True),
                                             ("avx2 avx_vnni", True)])
    def test_vnni_is_detected_from_the_cpu_flags(self, flags, vnni, monkeypatch):
        monkeypatch.setattr(kernels.Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n")
        assert kernels.has_vnni.__wrapped__() is vnni  # the uncached detection

    def test_unfolded_weights_fuse_too(self, tmp_path):
        gm, _ = dynamic(Mlp(), X2)
        assert targets(gm)[qdq.QUANTIZE_PER_CHANNEL] == 3
        artifact = graphopt.lower(gm, (X2,), backend="onnx", path=tmp_path / "m.onnx")
        assert artifact.verdict.ok and optimized_op_counts(artifact.path)["DynamicQuantizeMatMul"] == 3

    @pytest.mark.parametrize("config", ["x86", "xnnpack"])
    def test_op_by_op_export_is_right_though_not_fused(self, config, tmp_path):
        """Without the integer rewrite the symbolics write DynamicQuantizeLinear -> DequantizeLinear
        -> Gemm: the same numbers (int8 activations read as DynamicQuantizeLinear's uint8 ones),
        but ONNX Runtime runs the Gemm in float."""
        gm, _ = dynamic(Mlp(), X2, pipeline="mobile-int8", config=config)
        register_torchscript_symbolics(18)
        torch.onnx.export(gm, (X2,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=18)
        assert "Gemm" in optimized_op_counts(tmp_path / "m.onnx")
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        for x in (X2, X2 * 100, torch.randint(-1, 2, X2.shape).float()):
            with torch.no_grad():
                want = gm(x)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4

    def test_the_graph_given_to_lower_is_untouched(self, tmp_path):
        gm, _ = dynamic(Mlp(), X2, pipeline="mobile-int8")
        code = gm.code
        graphopt.lower(gm, (X2,), backend="onnx", path=tmp_path / "m.onnx")
        assert gm.code == code and targets(gm)[qdq.CHOOSE_QPARAMS] == 3


class TestLiteInterpreter:
    @pytest.mark.parametrize("engine", ["x86", "qnnpack"])
    @pytest.mark.parametrize("x", [X2, X3], ids=["2d", "3d"])
    @pytest.mark.parametrize("bias", [True, False])
    def test_linears_run_on_linear_dynamic(self, x, engine, bias, tmp_path):
        """Without biases the outputs of the verification's tiny inputs (x 1e-3) are as tiny, and
        torch's coarser smallest step shows (see kernels.TORCH_DYNAMIC_MIN_STEP)."""
        gm, _ = dynamic(Mlp(bias=bias), x, pipeline="mobile-int8")
        artifact = graphopt.lower(gm, (x,), backend="torchscript-mobile", path=tmp_path / "m.ptl", engine=engine)
        assert artifact.verdict.ok
        assert artifact.report["int8_layers"] == [f"{n.name} -> DynamicLinear" for n in linears(gm)]
        assert artifact.report["op_counts"]["quantized::linear_dynamic"] == 3
        assert "aten::linear" not in artifact.report["op_counts"]
        assert "quantized::linear_dynamic" in " ".join(artifact.report["operators"])
