"""correct-quantization-bias: the correction is the measured mean error, it improves int8 output
SQNR on fresh data, it is taken back when held-out data gets worse, and where it must not run."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.app import examples
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value
from graphopt.quantization import qdq
from graphopt.verify import sqnr_db

PASS = "correct-quantization-bias"
BEFORE = "canonicalize,eliminate-dead-code,fuse-conv-bn-relu,quantize"
AFTER = "fold-weight-quantization,eliminate-dead-code"


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


def run(model, inputs, pipeline, calibration=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize warns when calibration data is synthesized
        result = graphopt.PassManager(pipeline, on_failure="raise").run(model, inputs, calibration_data=calibration)
    return result.module, {r.name: r for r in result.report.records}


def weighted(gm):
    return [n for n in gm.graph.nodes if ops.is_op(n, "conv2d", "linear")]


class Positive(nn.Module):
    """A linear layer on non-negative inputs: int8 weight error has a mean there."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(24, 12, bias=bias)

    def forward(self, x):
        return self.fc(x)


def batches(count, shape=(32, 24), mean=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [((torch.rand(*shape, generator=gen) * 2 * mean),) for _ in range(count)]


class TestCorrection:
    def test_the_new_bias_is_the_old_one_minus_the_mean_error_on_the_calibration_batches(self):
        model, data = Positive().eval(), batches(6)
        quantized, _ = run(model, data[0], BEFORE, data)
        corrected, records = run(quantized, data[0], PASS, data)  # 4 calibration + 2 held-out batches
        assert records[PASS].rewrites == 1
        (fc,) = weighted(quantized)
        x_dq, w_dq = ops.arg(fc, "input"), ops.arg(fc, "weight")
        q = x_dq.args[0]
        w_int8 = qdq.constant_value(quantized, w_dq)
        errors = []
        for (x,) in data[:4]:
            x_in = x_dq.target(q.target(x, *q.args[1:]), *x_dq.args[1:])
            errors.append(x_in @ (w_int8 - model.fc.weight.detach()).T)
        expected = model.fc.bias.detach() - torch.cat(errors).mean(0)
        (fc_after,) = weighted(corrected)
        torch.testing.assert_close(get_attr_value(corrected, ops.arg(fc_after, "bias")), expected, rtol=1e-5, atol=1e-7)
        assert fc_after.meta["bias_corrected"] is True

    def test_a_layer_without_bias_gets_one(self):
        model, data = Positive(bias=False).eval(), batches(6)
        gm, records = run(model, data[0], f"{BEFORE},{PASS}", data)
        assert records[PASS].rewrites == 1
        bias = ops.arg(weighted(gm)[0], "bias")
        assert bias is not None and str(bias.target).endswith("bias_corrected")

    def test_it_improves_output_sqnr_on_fresh_data_for_a_cnn(self):
        model, example = examples.get_example("mobilenet_cnn")
        gen = torch.Generator().manual_seed(3)
        data = [(torch.randn(4, 3, 32, 32, generator=gen),) for _ in range(10)]
        fresh = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
        plain, _ = run(model, example, f"{BEFORE},{AFTER}", data)
        corrected, records = run(model, example, f"{BEFORE},{PASS},{AFTER}", data)
        assert records[PASS].rewrites == len([n for n in weighted(plain)])
        held = records[PASS].figures["held_out_sqnr_db"]
        assert all(a >= b for a, b in zip(held["after"], held["before"]))
        with torch.no_grad():
            want = torch.cat([model(x) for x in fresh])
            before = sqnr_db(want, torch.cat([plain(x) for x in fresh]))
            after = sqnr_db(want, torch.cat([corrected(x) for x in fresh]))
        assert after > before + 1.0, (before, after)

    def test_dynamic_int8_linears_are_corrected_too(self):
        model, data = examples.get_example("mlp")[0], batches(6, shape=(8, 64))
        _, records = run(model, data[0], f"canonicalize,quantize{{mode=dynamic}},{PASS}", data)
        assert records[PASS].rewrites == 3

    def test_a_second_run_leaves_corrected_layers_alone(self):
        model, data = Positive().eval(), batches(6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = graphopt.PassManager([*BEFORE.split(","), PASS, PASS], on_failure="raise").run(
                model, data[0], calibration_data=data)
        assert [r.rewrites for r in result.report.records[-2:]] == [1, 0]


class TestTakenBack:
    def test_when_held_out_data_gets_worse_every_correction_is_undone(self):
        # calibration inputs all positive, the two held-out batches all negative: the error's mean
        # flips sign, so subtracting it doubles the error there
        model = Positive().eval()
        data = batches(4) + [(-x,) for (x,) in batches(2, seed=7)]
        quantized, _ = run(model, data[0], BEFORE, data)
        gm, records = run(quantized, data[0], PASS, data)
        record = records[PASS]
        assert record.rewrites == 0 and record.status == "unchanged"
        assert "taken back" in record.declines[0][1] and "dB" in record.declines[0][1]
        (fc,) = weighted(gm)
        assert not str(ops.arg(fc, "bias").target).endswith("_corrected") and "bias_corrected" not in fc.meta
        for (x,) in data:
            torch.testing.assert_close(gm(x), quantized(x), rtol=0, atol=0)


class TestWhereItDoesNotRun:
    def test_after_fold_weight_quantization_it_says_to_run_it_before(self):
        model, data = Positive().eval(), batches(6)
        folded, _ = run(model, data[0], f"{BEFORE},fold-weight-quantization", data)  # (one pipeline refuses the order)
        _, records = run(folded, data[0], PASS, data)
        assert records[PASS].rewrites == 0
        assert "between quantize and fold-weight-quantization" in records[PASS].declines[0][1]

    def test_a_float_graph_has_nothing_to_correct(self):
        _, records = run(Positive().eval(), batches(1)[0], PASS)
        assert records[PASS].rewrites == 0 and records[PASS].declines == []


def test_the_accurate_preset_lowers_to_onnx_and_verifies(tmp_path):
    model, example = examples.get_example("mobilenet_cnn")
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 3, 32, 32, generator=gen),) for _ in range(6)]
    gm, records = run(model, example, "mobile-int8-accurate", data)
    assert records[PASS].rewrites > 0
    assert any(str(ops.arg(n, "bias").target).endswith("_corrected") for n in weighted(gm))
    artifact = graphopt.lower(gm, example, backend="onnx", path=tmp_path / "m")
    assert all(v["ok"] for v in artifact.report["verification"].values())
