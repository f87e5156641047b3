"""smooth-activations: scales chosen as documented, outputs exact, transformer blocks and
transformers' BERT/DistilBERT (small random configs, no download), and what it declines."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.app import examples
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value
from graphopt.verify import Tolerance

PASS = "smooth-activations"


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


class NormThenLinears(nn.Module):
    """A layer norm with outlier channels read by two linear layers (like q and k)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q, self.k = nn.Linear(dim, 8), nn.Linear(dim, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.weight[[2, 9]] *= 40.0
            self.norm.bias.normal_(0, 0.1)

    def forward(self, x):
        y = self.norm(x)
        return self.q(y) * self.k(y)


def run(model, inputs, pipeline=PASS, calibration=None):
    result = graphopt.PassManager(pipeline, on_failure="raise").run(model, inputs, calibration_data=calibration)
    return result.module, result.report.records[-1]


def norm_and_readers(gm):
    norm = next(n for n in gm.graph.nodes if ops.is_op(n, "layer_norm"))
    return norm, [u for u in norm.users if ops.is_op(u, "linear")]


def channel_max_of(gm, node, batches) -> torch.Tensor:
    """max |value of ``node``| per last-dim channel over ``batches``."""
    seen = []

    class Tap(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is node:
                seen.append(value.detach().abs().reshape(-1, value.shape[-1]).amax(0))
            return value

    with torch.no_grad():
        for batch in batches:
            Tap(gm).run(*batch)
    return torch.stack(seen).amax(0)


def assert_same(gm, model, inputs):
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class TestScales:
    def test_alpha_half_gives_activation_and_weight_columns_the_same_range(self):
        model, x = NormThenLinears().eval(), torch.randn(4, 5, 16)
        batches = [(torch.randn(4, 5, 16),) for _ in range(3)]
        gm, record = run(model, (x,), calibration=batches)
        assert record.rewrites == 1
        norm, linears = norm_and_readers(gm)
        assert {lin.name for lin in linears} == {"linear", "linear_1"}
        x_max = channel_max_of(gm, norm, batches)
        w_max = torch.stack([get_attr_value(gm, ops.arg(lin, "weight")).abs().amax(0) for lin in linears]).amax(0)
        torch.testing.assert_close(x_max, w_max, rtol=1e-4, atol=0)
        assert_same(gm, model, (x,))

    def test_alpha_zero_normalizes_every_weight_column_to_one(self):
        model, x = NormThenLinears().eval(), torch.randn(4, 5, 16)
        gm, record = run(model, (x,), f"{PASS}{{alpha=0}}", calibration=[(x,)])
        assert record.rewrites == 1
        _, linears = norm_and_readers(gm)
        w_max = torch.stack([get_attr_value(gm, ops.arg(lin, "weight")).abs().amax(0) for lin in linears]).amax(0)
        torch.testing.assert_close(w_max, torch.ones(16), rtol=1e-5, atol=0)
        assert_same(gm, model, (x,))

    def test_the_outlier_channels_get_the_largest_scales(self):
        model, x = NormThenLinears().eval(), torch.randn(4, 5, 16)
        gm, _ = run(model, (x,), calibration=[(x,)])
        norm, _ = norm_and_readers(gm)
        weight = get_attr_value(gm, ops.arg(norm, "weight"))
        s = model.norm.weight.detach() / weight
        assert set(s.topk(2).indices.tolist()) == {2, 9}

    def test_without_calibration_data_it_says_the_ranges_are_synthesized(self):
        _, record = run(NormThenLinears().eval(), (torch.randn(2, 3, 16),))
        assert record.rewrites == 1 and any("no calibration data" in n for n in record.notes)

    def test_a_second_run_finds_nothing_to_move_and_the_model_is_untouched(self):
        model, x = NormThenLinears().eval(), torch.randn(4, 5, 16)
        state = copy.deepcopy(model.state_dict())
        result = graphopt.PassManager([PASS, PASS], on_failure="raise").run(model, (x,), calibration_data=[(x,)])
        assert [r.rewrites for r in result.report.records] == [1, 0]
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    def test_a_norm_without_affine_parameters_gets_a_weight(self):
        model = NormThenLinears().eval()
        model.norm = nn.LayerNorm(16, elementwise_affine=False)
        x = torch.randn(2, 3, 16) * torch.linspace(0.1, 10, 16)
        gm, record = run(model, (x,), calibration=[(x,)])
        assert record.rewrites == 1
        norm, _ = norm_and_readers(gm)
        assert ops.arg(norm, "weight") is not None and ops.arg(norm, "bias") is None
        assert_same(gm, model, (x,))
        model, x = model.double(), x.double()  # found by the property kit: the new weight took float32
        gm, record = run(model, (x,), calibration=[(x,)])
        norm, _ = norm_and_readers(gm)
        assert record.rewrites == 1 and get_attr_value(gm, ops.arg(norm, "weight")).dtype == torch.float64


class TestTransformers:
    def test_pre_norm_block_smooths_both_norms(self):
        model, inputs = examples.get_example("transformer_block")
        gm, record = run(model, inputs)
        assert record.rewrites == 2
        assert_same(gm, model, inputs)

    @pytest.mark.parametrize("name", ["bert", "distilbert"])
    def test_post_norm_models_decline_by_default_and_smooth_with_rescaled_residuals(self, name):
        spec = importlib.util.spec_from_file_location(
            "transformers_small_models", Path(__file__).resolve().parent.parent / "examples" / "transformers_small_models.py")
        pytest.importorskip("transformers")
        small = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(small)
        make, make_inputs = small.MODELS[name]
        model, example = make().eval(), make_inputs()
        gm = graphopt.capture(model, example, dynamic_shapes=[{0: "batch", 1: "seq"}])

        _, record = run(gm, example)
        assert record.rewrites == 0
        assert sum("also read by add" in reason for _, reason in record.declines) == 4

        smoothed, record = run(gm, example, f"{PASS}{{other_readers=rescale}}")
        assert record.rewrites == 4  # two norms per layer; the final one feeds no linear layer
        muls = [n for n in smoothed.graph.nodes if ops.is_op(n, "mul") and "smoothing" in str(n.args[1].target)]
        assert len(muls) == 4 and all(ops.is_op(next(iter(m.users)), "add") for m in muls)
        tolerance = Tolerance.for_dtype(torch.float32)
        for size in ((1, 5), (3, 11)):
            ids = torch.randint(0, 100, size)
            with torch.no_grad():
                want, got = model(ids), smoothed(ids)
            for key in ("logits", "last_hidden_state"):
                if key in want:
                    w, g = want[key], got[key]
                    assert float((w - g).abs().max()) <= tolerance.atol + tolerance.rtol * float(w.abs().max())


class TestDeclines:
    def reasons(self, model, inputs, pipeline=PASS):
        _, record = run(model, inputs, pipeline)
        assert record.rewrites == 0
        return " | ".join(r for _, r in record.declines)

    def test_a_norm_over_two_dims(self):
        class TwoDims(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm, self.fc = nn.LayerNorm([3, 4]), nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(self.norm(x))

        assert "normalizes 2 dims" in self.reasons(TwoDims().eval(), (torch.randn(2, 3, 4),))

    def test_a_norm_read_by_a_residual_add_by_default(self):
        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

            def forward(self, x):
                y = self.norm(x)
                return self.fc(y) + y

        assert "other_readers=rescale" in self.reasons(Residual().eval(), (torch.randn(2, 4),))

    def test_a_norm_that_is_a_graph_output_even_when_rescaling(self):
        class Returned(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

            def forward(self, x):
                y = self.norm(x)
                return self.fc(y), y

        reasons = self.reasons(Returned().eval(), (torch.randn(2, 4),), f"{PASS}{{other_readers=rescale}}")
        assert "graph output" in reasons

    def test_a_norm_whose_output_is_written_in_place(self):
        class Written(nn.Module):  # found by the property kit: the write went to the rescaled copy
            def __init__(self):
                super().__init__()
                self.norm, self.fc = nn.LayerNorm(7), nn.Linear(7, 4, bias=False)

            def forward(self, x):
                y = self.norm(x)
                y.add_(x)
                return y + x, self.fc(y)

        reasons = self.reasons(Written().eval(), (torch.randn(2, 3, 7),), f"{PASS}{{other_readers=rescale}}")
        assert "written in place by add_" in reasons

    def test_a_norm_no_linear_reads(self):
        class NoLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = nn.LayerNorm(4)

            def forward(self, x):
                return torch.relu(self.norm(x))

        assert "no linear layer reads it" in self.reasons(NoLinear().eval(), (torch.randn(2, 4),))

