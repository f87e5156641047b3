"""equalize-cross-layer: which pairs it equalizes, that ranges end up balanced, that outputs stay
exact, and every pair it must decline (with the reason)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.testing
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value
from graphopt.pipeline.passes import RewriteBudget

PASS = "equalize-cross-layer"
FUSED = f"fuse-conv-bn-relu,{PASS}"


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


def skewed_bn(channels: int) -> nn.BatchNorm2d:
    """Batch norm whose channel scales span three decades: the ranges equalization evens out."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(10 ** torch.empty(channels).uniform_(-2, 1))
        bn.bias.normal_(0, 0.1)
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


class Separable(nn.Module):
    """conv-BN-ReLU -> depthwise conv-BN-ReLU -> pointwise conv: a chain of two pairs."""

    def __init__(self, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = skewed_bn(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = skewed_bn(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.act1, self.act2 = act(), act()

    def forward(self, x):
        return self.pw(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.conv(x)))))))


class Pair(nn.Module):
    """Two layers with an activation between them; ``also`` returns the middle value too."""

    def __init__(self, first: nn.Module, second: nn.Module, act: nn.Module | None = None, also: bool = False):
        super().__init__()
        self.first, self.second, self.act, self.also = first, second, act or nn.Identity(), also
        with torch.no_grad():
            self.first.weight.mul_(torch.logspace(-1, 1, self.first.weight.shape[0]).reshape(
                -1, *[1] * (self.first.weight.dim() - 1)))

    def forward(self, x):
        middle = self.act(self.first(x))
        return (self.second(middle), middle) if self.also else self.second(middle)


def run(model: nn.Module, x: torch.Tensor, pipeline: str = PASS, budget: RewriteBudget | None = None):
    result = graphopt.PassManager(pipeline, on_failure="raise").run(model, (x,), budget=budget)
    return result.module, result.report.records[-1]


def layer_pairs(gm) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(first weight, second weight, second's groups) of every conv->(relu)->conv in ``gm``."""
    out = []
    for node in gm.graph.nodes:
        if ops.is_op(node, "conv2d", "linear"):
            x = ops.arg(node, "input")
            if isinstance(x, torch.fx.Node) and ops.is_op(x, "relu"):
                x = ops.call_arg(x, "input", 0)
            if isinstance(x, torch.fx.Node) and ops.is_op(x, "conv2d", "linear"):
                groups = 1 if ops.is_op(node, "linear") else ops.arg(node, "groups")
                out.append((get_attr_value(gm, ops.arg(x, "weight")), get_attr_value(gm, ops.arg(node, "weight")), groups))
    return out


def ranges(w1: torch.Tensor, w2: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
    r2 = w2.abs().reshape(groups, w2.shape[0] // groups, w2.shape[1], -1).amax(dim=(1, 3)).reshape(-1)
    return r1, r2


def assert_exact(gm, model, x):
    with torch.no_grad():
        want, got = model(x), gm(x)
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


class TestEqualizes:
    def test_a_depthwise_separable_chain_after_fusion_gets_balanced_ranges_and_the_same_outputs(self):
        model, x = Separable().eval(), torch.randn(2, 3, 8, 8)
        before = [ranges(*p) for p in layer_pairs(run(model, x, "fuse-conv-bn-relu")[0])]
        assert max(float((r1 / r2).log().abs().max().detach()) for r1, r2 in before) > 1.0  # skewed to start with
        gm, record = run(model, x, FUSED)
        assert record.rewrites == 2 and record.figures["pairs_equalized"] == 2
        pairs = layer_pairs(gm)
        assert len(pairs) == 2
        for w1, w2, groups in pairs:
            r1, r2 = ranges(w1, w2, groups)
            torch.testing.assert_close(r1, r2, rtol=2e-3, atol=0)
        assert_exact(gm, model, x)

    def test_plain_conv_relu_conv_without_batch_norm(self):
        model = Pair(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3), nn.ReLU()).eval()
        x = torch.randn(2, 3, 9, 9)
        gm, record = run(model, x)
        assert record.rewrites == 1
        (w1, w2, groups), = layer_pairs(gm)
        r1, r2 = ranges(w1, w2, groups)
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)
        assert_exact(gm, model, x)

    def test_identity_between_linears_on_3d_input(self):
        model, x = Pair(nn.Linear(5, 7), nn.Linear(7, 3)).eval(), torch.randn(2, 4, 5)
        gm, record = run(model, x)
        assert record.rewrites == 1
        assert_exact(gm, model, x)

    def test_grouped_second_conv_scales_the_columns_of_each_group(self):
        model, x = Pair(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3, groups=2), nn.ReLU()).eval(), torch.randn(1, 4, 6, 6)
        gm, record = run(model, x)
        assert record.rewrites == 1
        (w1, w2, groups), = layer_pairs(gm)
        torch.testing.assert_close(*ranges(w1, w2, groups), rtol=1e-5, atol=0)
        assert_exact(gm, model, x)

    def test_float64_models_keep_their_dtype_and_match_tightly(self):
        model, x = Separable().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
        gm, record = run(model, x, FUSED)
        assert record.rewrites == 2
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
        assert all(w1.dtype == torch.float64 for w1, _, _ in layer_pairs(gm))

    def test_second_run_finds_the_ranges_balanced(self):
        model, x = Separable().eval(), torch.randn(2, 3, 8, 8)
        result = graphopt.PassManager([*FUSED.split(","), PASS], on_failure="raise").run(model, (x,))
        assert [r.rewrites for r in result.report.records[1:]] == [2, 0]

    def test_the_model_and_tied_weights_keep_their_values(self):
        model, x = Separable().eval(), torch.randn(2, 3, 8, 8)
        state = copy.deepcopy(model.state_dict())
        gm, _ = run(model, x, FUSED)
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), name
        assert any(n.op == "get_attr" and str(n.target).endswith("_equalized") for n in gm.graph.nodes)

    def test_each_chain_asks_the_budget(self):
        model, x = Separable().eval(), torch.randn(2, 3, 8, 8)
        gm, record = run(model, x, FUSED, budget=RewriteBudget(limit=4))  # fuse takes the first four
        assert record.rewrites == 0 and not any(str(n.target).endswith("_equalized") for n in gm.graph.nodes)


class TestDeclines:
    def declines(self, model, x, pipeline=PASS):
        gm, record = run(model, x, pipeline)
        assert record.rewrites == 0
        assert_exact(gm, model, x)
        return " | ".join(reason for _, reason in record.declines)

    def test_relu6_because_its_clamp_would_become_per_channel(self):
        assert "hardtanh(0, 6)" in self.declines(Separable(nn.ReLU6).eval(), torch.randn(1, 3, 8, 8), FUSED)

    def test_a_middle_value_with_another_reader(self):
        class Tap(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

            def forward(self, x):
                y = torch.relu(self.a(x))
                return self.b(y) + y.mean()

        assert "also read by" in self.declines(Tap().eval(), torch.randn(1, 3, 4, 4))

    def test_a_middle_value_that_is_a_graph_output(self):
        model = Pair(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), also=True).eval()
        assert "graph output" in self.declines(model, torch.randn(1, 3, 4, 4))

    def test_a_conv_feeding_a_linear_on_another_axis(self):
        model = Pair(nn.Conv2d(3, 4, 1), nn.Linear(4, 2), nn.ReLU()).eval()
        assert "channel axis" in self.declines(model, torch.randn(1, 3, 4, 4))

    def test_a_transposed_conv(self):
        model = Pair(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 2, 2), nn.ReLU()).eval()
        assert "transposed" in self.declines(model, torch.randn(1, 3, 4, 4))

    def test_channels_the_channel_analysis_freezes(self):
        class Shared(nn.Module):
            """The second conv is called again on a graph input: the channels are pinned to it."""

            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

            def forward(self, x, z):
                return self.b(torch.relu(self.a(x))) + self.b(z)

        model, inputs = Shared().eval(), (torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))
        record = graphopt.PassManager(PASS, on_failure="raise").run(model, inputs).report.records[0]
        assert record.rewrites == 0
        assert "frozen" in record.declines[0][1] and "graph input 'z'" in record.declines[0][1]

    def test_a_non_homogeneous_activation_is_not_a_candidate(self):
        _, record = run(Pair(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.SiLU()).eval(), torch.randn(1, 3, 4, 4))
        assert record.rewrites == 0 and record.declines == []


# soundness of the pair after fusion (in-place relu units, folded batch norms); how often
# equalization alone fires is guarded by test_properties.test_equalize_cross_layer
test_sound_on_generated_models_after_fusion = graphopt.testing.property_test(
    FUSED, min_fired=3, ops=["conv2d", "conv1d", "batch_norm", "relu", "relu6", "linear", "add", "flatten"],
)
