"""prune-channels: every coupling topology after a real cut, rounding, exactness of dead channels,
importance criteria, options, the report, safety rules, trainability, backends and random models.

Models are captured with graphopt.capture; most tests call the pass function with a PassContext
(what the PassManager does), a few go through the manager and pipeline strings.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.ir import ops
from graphopt.errors import OptionError, PassError
from graphopt.pipeline.passes import PassContext, RewriteBudget
from graphopt.passes.prune_channels import batch_norm_training, prune_channels, units_to_keep
from graphopt.testing.strategies import models, randomize_


def prune(model: nn.Module, inputs: tuple[torch.Tensor, ...], budget: RewriteBudget | None = None,
          calibration_data=None, **options) -> tuple[fx.GraphModule, PassContext]:
    gm = graphopt.capture(model.eval(), inputs)
    ctx = PassContext("prune-channels", options, inputs, calibration_data=calibration_data,
                      budget=budget or RewriteBudget())
    prune_channels(gm, ctx, **options)
    return gm, ctx


def weight(gm: fx.GraphModule, name: str) -> torch.Tensor:
    return gm.get_parameter(f"{name}.weight")


def node_of(gm: fx.GraphModule, *names: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if ops.op_name(n) in names or n.target in names)


def assert_same_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    got, want = gm(*inputs), model(*inputs)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert [g.shape for g in got] == [w.shape for w in want]


def assert_exact(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    got, want = gm(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_(model, seed).eval()


# --------------------------------------------------------------------------- topologies


class TestTopologies:
    def test_conv_norm_activation_conv(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                         nn.Conv2d(16, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
        inputs = (torch.randn(2, 3, 6, 6),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert weight(gm, "0").shape == (8, 3, 3, 3) and weight(gm, "3").shape == (2, 8, 3, 3)
        assert gm.get_buffer("1.running_mean").shape == (8,) and weight(gm, "1").shape == (8,)
        assert weight(gm, "5").shape == (3, 2 * 16)  # flatten: each kept channel keeps its 4x4 block
        assert_same_shapes(gm, model, inputs)

    def test_residual_add_prunes_the_same_indices_on_both_branches(self):
        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                y = self.a(x)
                return self.head(F.relu(y + self.b(F.relu(y))))

        model, inputs = randomized(Res()), (torch.randn(1, 3, 5, 5),)
        gm, _ = prune(model, inputs, ratio=0.5)
        kept_a = [i for i in range(8) if any(torch.equal(model.a.weight[i], r) for r in weight(gm, "a"))]
        kept_b = [i for i in range(8) if any(torch.equal(model.b.weight[i, kept_a], r) for r in weight(gm, "b"))]
        assert len(kept_a) == 4 and kept_a == kept_b
        assert_same_shapes(gm, model, inputs)

    def test_split_with_hard_coded_sizes_is_rewritten(self):
        class Split(nn.Module):  # HARD-CASES D2
            def __init__(self):
                super().__init__()
                self.conv, self.p, self.q = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                a, b = torch.split(self.conv(x), [8, 8], dim=1)
                return self.p(a) + self.q(b)

        model, inputs = randomized(Split()), (torch.randn(1, 3, 4, 4),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert node_of(gm, torch.split).args[1] == [4, 4]
        assert weight(gm, "conv").shape[0] == 8
        assert_same_shapes(gm, model, inputs)

    def test_chunk_keeps_equal_counts_per_chunk(self):
        class GLU(nn.Module):  # HARD-CASES D3
            def __init__(self):
                super().__init__()
                self.conv, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                a, b = self.conv(x).chunk(2, dim=1)
                return self.head(a * torch.sigmoid(b))

        model, inputs = randomized(GLU()), (torch.randn(1, 3, 4, 4),)
        gm, _ = prune(model, inputs, ratio=0.25)
        assert weight(gm, "conv").shape[0] == 12 and weight(gm, "head").shape[1] == 6
        assert_same_shapes(gm, model, inputs)

    def test_depthwise_conv_updates_groups(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                         nn.ReLU6(), nn.Conv2d(16, 4, 1)))
        inputs = (torch.randn(1, 3, 5, 5),)
        gm, _ = prune(model, inputs, ratio=0.5)
        dw = [n for n in gm.graph.nodes if ops.is_op(n, "conv2d")][1]
        assert ops.arg(dw, "groups") == 8 and weight(gm, "2").shape == (8, 1, 3, 3)
        assert_same_shapes(gm, model, inputs)

    def test_grouped_conv_loses_whole_groups(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=4),
                                         nn.ReLU(), nn.Conv2d(8, 2, 1)))
        inputs = (torch.randn(1, 3, 5, 5),)
        gm, _ = prune(model, inputs, ratio=0.5)
        grouped = [n for n in gm.graph.nodes if ops.is_op(n, "conv2d")][1]
        assert ops.arg(grouped, "groups") == 2
        assert weight(gm, "2").shape == (4, 4, 3, 3) and weight(gm, "0").shape[0] == 8
        assert_same_shapes(gm, model, inputs)

    def test_a_conv_whose_weight_is_standardized_per_call_keeps_its_channels(self):
        """NF-ResNet's ScaledStdConv2d: the weight is computed per call from a reshape of fixed
        shape, so its output channels cannot be cut; the convs after it still can."""
        class StdConv(nn.Conv2d):
            def forward(self, x):
                w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                 momentum=0.0, eps=1e-5).reshape_as(self.weight)
                return F.conv2d(x, w, self.bias, self.stride, self.padding)

        model = randomized(nn.Sequential(StdConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                         nn.Conv2d(8, 2, 1)))
        inputs = (torch.randn(1, 3, 9, 9),)
        gm, ctx = prune(model, inputs, ratio=0.5)
        assert weight(gm, "0").shape == (8, 3, 3, 3) and weight(gm, "2").shape == (4, 8, 3, 3)
        assert ctx.declines == [("conv2d_2", "channels of 4 (2) left whole: graph output: its shape must not change (at output)")]
        assert_same_shapes(gm, model, inputs)

    def test_view_sizes_and_linear_features_follow(self):
        class View(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 2 * 2, 5)

            def forward(self, x):
                return self.fc(F.relu(self.conv(x)).view(-1, 32))

        model, inputs = randomized(View()), (torch.randn(2, 3, 4, 4),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert node_of(gm, "view").args[1:] == (-1, 16)
        assert weight(gm, "fc").shape == (5, 16)
        assert_same_shapes(gm, model, inputs)

    def test_linear_view_conv_transpose(self):
        class Decoder(nn.Module):  # HARD-CASES D5
            def __init__(self):
                super().__init__()
                self.fc, self.up = nn.Linear(6, 8 * 3 * 3), nn.ConvTranspose2d(8, 2, 2, stride=2)

            def forward(self, z):
                return self.up(F.relu(self.fc(z)).view(z.size(0), 8, 3, 3))

        model, inputs = randomized(Decoder()), (torch.randn(2, 6),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert weight(gm, "fc").shape == (36, 6) and weight(gm, "up").shape == (4, 2, 2, 2)
        assert node_of(gm, "view").args[2] == 4
        assert_same_shapes(gm, model, inputs)

    def test_permute_to_channels_last_into_linear(self):
        class NHWC(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(F.relu(self.conv(x)).permute(0, 2, 3, 1))

        model, inputs = randomized(NHWC()), (torch.randn(1, 3, 4, 4),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert weight(gm, "fc").shape == (4, 4)
        assert_same_shapes(gm, model, inputs)

    def test_group_norm_and_layer_norm_arguments_follow(self):
        class Norms(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.gn, self.head = nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 1)
                self.fc1, self.ln, self.fc2 = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 3)

            def forward(self, x):
                y = self.head(F.relu(self.gn(self.conv(x)))).mean((2, 3))
                return self.fc2(F.gelu(self.ln(self.fc1(y))))

        model, inputs = randomized(Norms()), (torch.randn(2, 3, 4, 4),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert ops.arg(node_of(gm, "group_norm"), "num_groups") == 2 and weight(gm, "gn").shape == (8,)
        assert ops.arg(node_of(gm, "layer_norm"), "normalized_shape") == (6,)
        assert_same_shapes(gm, model, inputs)

    def test_broadcast_mask_leaves_channels_prunable(self):
        class Masked(nn.Module):  # HARD-CASES D7
            def __init__(self):
                super().__init__()
                self.conv, self.mask, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 1, 3), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                return self.head(self.conv(x) * torch.sigmoid(self.mask(x)))

        model, inputs = randomized(Masked()), (torch.randn(1, 3, 6, 6),)
        gm, _ = prune(model, inputs, ratio=0.5)
        assert weight(gm, "conv").shape[0] == 4 and weight(gm, "mask").shape[0] == 1
        assert_same_shapes(gm, model, inputs)

    def test_classifier_and_frozen_groups_keep_their_shape(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 10)))
        inputs = (torch.randn(1, 3, 4, 4),)
        gm, ctx = prune(model, inputs, ratio=0.9)
        assert weight(gm, "3").shape[0] == 10  # HARD-CASES D4
        assert any("graph output" in reason for _, reason in ctx.declines)
        assert_same_shapes(gm, model, inputs)


# --------------------------------------------------------------------------- rounding


class TestRounding:
    @pytest.mark.parametrize("units, ratio, round_to, expected", [
        (12, 0.5, 8, 8),    # 6 rounds to the nearest multiple, 8 (HARD-CASES D10: not "no pruning")
        (12, 0.2, 8, 8),    # 9.6 -> 8
        (64, 0.3, 8, 48),   # 44.8 -> 48
        (64, 0.99, 8, 8),   # never rounds to zero (D11)
        (6, 0.9, 8, 6),     # a group smaller than round_to is left whole
        (10, 0.0, 8, 10),   # ratio 0 cuts no live channel
        (10, 0.95, 1, 1),   # at least one channel
    ])
    def test_kept_count(self, units, ratio, round_to, expected):
        assert units_to_keep(units, 1, ratio, round_to) == expected

    def test_min_channels_and_unit_width(self):
        assert units_to_keep(32, 1, 0.9, 1, min_channels=10) == 10
        assert units_to_keep(32, 1, 0.9, 4, min_channels=10) == 12
        assert units_to_keep(8, 2, 0.5, 8) == 4  # units of 2 channels: 8 channels kept
        assert units_to_keep(16, 1, 0.0, 4, dead=5) == 12  # dead channels go even at ratio 0, rounded up

    def test_counts_in_the_graph_are_multiples(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), nn.Conv2d(12, 20, 1), nn.ReLU(),
                                         nn.Conv2d(20, 2, 1)))
        inputs = (torch.randn(1, 3, 4, 4),)
        gm, ctx = prune(model, inputs, ratio=0.5, round_to=8)
        assert weight(gm, "0").shape[0] == 8 and weight(gm, "2").shape[0] == 8
        assert [g["channels"] for g in ctx.figures["groups"]] == [[12, 8], [20, 8]]


# --------------------------------------------------------------------------- dead channels


def with_dead_channels(model: nn.Module, layer: nn.Module, rows: list[int], bias: float | None) -> nn.Module:
    with torch.no_grad():
        layer.weight[rows] = 0
        if bias is not None:
            layer.bias[rows] = bias
    return model


class TestDeadChannelsAreExact:
    def test_bias_is_folded_into_the_next_layer(self):
        # HARD-CASES D14: zero weights with bias 5 changed outputs by 4.7 when the bias was ignored
        model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
        with_dead_channels(model, model[0], [1, 6], 5.0)
        inputs = (torch.randn(2, 3, 6, 6),)
        gm, ctx = prune(model, inputs, ratio=0.0)
        assert weight(gm, "0").shape[0] == 6 and ctx.figures["groups"][0]["exact"]
        assert_exact(gm, model, inputs)

    def test_through_batch_norm_into_linear(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)))
        with_dead_channels(model, model[0], [0, 3, 4], None)
        inputs = (torch.randn(2, 3, 6, 6),)
        gm, _ = prune(model, inputs, ratio=0.0)
        assert weight(gm, "0").shape[0] == 5
        assert_exact(gm, model, inputs)

    def test_zero_constant_before_a_padded_conv_and_residual_branches(self):
        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
                self.head = nn.Conv2d(8, 2, 3, padding=1)

            def forward(self, x):
                y = F.relu(self.a(x))
                return self.head(F.relu(y + self.b(y)))

        model = randomized(Res())
        with_dead_channels(model, model.a, [2, 5], -1.0)  # relu(-1) = 0 ...
        with_dead_channels(model, model.b, [2, 5], -2.0)  # ... and 0 + relu(...) stays 0 after padding
        inputs = (torch.randn(1, 3, 5, 5),)
        gm, ctx = prune(model, inputs, ratio=0.0)
        assert weight(gm, "a").shape[0] == 6 and ctx.figures["groups"][0]["dead_removed"] == 2
        assert_exact(gm, model, inputs)

    def test_constant_before_zero_padding_is_kept(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1)))
        with_dead_channels(model, model[0], [3], 2.0)
        inputs = (torch.randn(1, 3, 4, 4),)
        gm, ctx = prune(model, inputs, ratio=0.0)
        assert weight(gm, "0").shape[0] == 8 and ctx.figures["groups"] == []

    def test_dead_channels_go_first_under_a_ratio(self):
        model = randomized(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 2)))
        with_dead_channels(model, model[0], [0, 1], 0.5)
        inputs = (torch.randn(1, 3, 2, 2),)
        gm, ctx = prune(model, inputs, ratio=0.25)
        assert ctx.figures["groups"][0]["exact"] and ctx.figures["groups"][0]["channels"] == [8, 6]
        assert_exact(gm, model, inputs)


# --------------------------------------------------------------------------- importance and options


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def stack_with_norms(rows: list[float], gammas: list[float]) -> nn.Module:
    model = randomized(Stack())
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor(rows).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model.head.weight.fill_(1.0)
        model.bn.weight.copy_(torch.tensor(gammas))
    return model


def kept_rows(gm: fx.GraphModule) -> list[float]:
    return weight(gm, "conv")[:, 0, 0, 0].tolist()


class TestImportance:
    inputs = (torch.randn(1, 3, 2, 2),)

    def test_l1_and_l2_keep_the_largest_weights(self):
        model = stack_with_norms([0.1, 3.0, 0.2, 2.0], [1.0, 1.0, 1.0, 1.0])
        for criterion in ("l1", "l2"):
            gm, _ = prune(model, self.inputs, ratio=0.5, importance=criterion)
            assert kept_rows(gm) == [3.0, 2.0]

    def test_bn_scale_ranks_by_gamma(self):
        model = stack_with_norms([0.1, 3.0, 0.2, 2.0], [5.0, 0.1, 4.0, 0.2])
        gm, _ = prune(model, self.inputs, ratio=0.5, importance="bn_scale")
        assert [round(v, 3) for v in kept_rows(gm)] == [0.1, 0.2]

    def test_aggregation_max_keeps_what_any_layer_relies_on(self):
        model = stack_with_norms([1.0, 1.0, 1.0, 1.0], [1.0] * 4)
        with torch.no_grad():
            model.head.weight.copy_(torch.tensor([[0.1, 0.1, 9.0, 0.1], [0.1, 0.1, 0.1, 0.1]]).view(2, 4, 1, 1))
        gm, _ = prune(model, self.inputs, ratio=0.75, aggregation="max")
        assert weight(gm, "head")[0, 0, 0, 0].item() == 9.0

    def test_user_callable_decides(self):
        def prefer_last(group, gm):
            return list(range(len(group)))

        gm, _ = prune(stack_with_norms([3.0, 2.0, 0.2, 0.1], [1.0] * 4), self.inputs, ratio=0.5, importance=prefer_last)
        assert [round(v, 3) for v in kept_rows(gm)] == [0.2, 0.1]

    def test_callable_returning_wrong_count_is_named(self):
        with pytest.raises(PassError, match="one score per unit"):
            prune(stack_with_norms([1.0] * 4, [1.0] * 4), self.inputs, ratio=0.5, importance=lambda g, gm: [1.0])


class TestOptions:
    def resnetish(self):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

            def forward(self, x):
                return F.relu(x + self.conv2(F.relu(self.conv1(x))))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem, self.layer1, self.layer2 = nn.Conv2d(3, 8, 3, padding=1), Block(), Block()
                self.fc = nn.Linear(8, 2)

            def forward(self, x):
                return self.fc(self.layer2(self.layer1(F.relu(self.stem(x)))).mean((2, 3)))

        return randomized(Net()), (torch.randn(1, 3, 6, 6),)

    def test_per_layer_ratios_and_skip_from_a_pipeline_string(self):
        model, inputs = self.resnetish()
        result = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5,ratios=layer2.*=0.25;layer1.*=0.75,"
                                                  "skip=layer1.conv1}", verify="none", on_failure="raise")
        gm = result.module
        assert weight(gm, "layer1.conv1").shape[0] == 8  # skipped
        assert weight(gm, "layer2.conv1").shape[0] == 6  # layer2.* = 0.25
        assert weight(gm, "stem").shape[0] == 8  # the residual stream feeds layer1.conv1: left whole
        assert any("skip pattern 'layer1.conv1'" in r for _, r in result.report.records[0].declines)

    @pytest.mark.parametrize("ratios, stream", [({"layer1.*": 0.75, "layer2.*": 0.25}, 2),
                                                ({"layer2.*": 0.25, "layer1.*": 0.75}, 6)])
    def test_first_matching_pattern_wins_for_a_group(self, ratios, stream):
        model, inputs = self.resnetish()
        gm, _ = prune(model, inputs, ratio=0.0, ratios=ratios)  # the stream holds layer1.conv2 and layer2.conv2
        assert weight(gm, "stem").shape[0] == stream
        assert weight(gm, "layer1.conv1").shape[0] == 2 and weight(gm, "layer2.conv1").shape[0] == 6

    @pytest.mark.parametrize("options, message", [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratios": "layer1.*"}, "pattern=ratio"),
        ({"ratios": "a=x"}, "not a number"),
        ({"importance": "taylor"}, "importance must be"),
        ({"round_to": 0}, "round_to"),
    ])
    def test_bad_options_say_what_to_write(self, options, message):
        model, inputs = self.resnetish()
        with pytest.raises(OptionError, match=message):
            prune(model, inputs, **options)

    def test_preset_is_registered(self):
        assert "prune-channels" in graphopt.available_presets()["mobile-pruned"]


# --------------------------------------------------------------------------- report and safety


class TestReportAndSafety:
    def model(self):
        return randomized(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(), nn.Linear(32, 10))), (torch.randn(2, 3, 8, 8),)

    def test_figures_and_notes(self):
        model, inputs = self.model()
        gm, ctx = prune(model, inputs, ratio=0.5)
        params, macs, size = (ctx.figures[k] for k in ("parameters", "macs", "bytes"))
        assert params[0] == sum(p.numel() for p in model.parameters()) and params[1] < params[0] / 3
        assert macs[1] <= 0.3 * macs[0] and size[1] < size[0]
        assert [g["channels"] for g in ctx.figures["groups"]] == [[32, 16]] * 3
        assert any(note.startswith("model: parameters") for note in ctx.notes)

    def test_original_tensors_are_never_modified(self):
        model, inputs = self.model()
        gm = graphopt.capture(model, inputs)
        before = {name: (t, t.clone(), t._version) for name, t in gm.state_dict(keep_vars=True).items()}
        prune_channels(gm, PassContext("prune-channels", {}, inputs), ratio=0.5)
        for name, (t, copy, version) in before.items():
            assert t._version == version and torch.equal(t, copy), name

    def test_pruned_module_fine_tunes(self):
        model, inputs = self.model()
        gm, _ = prune(model, inputs, ratio=0.5)
        params = list(gm.parameters())
        assert params and all(p.requires_grad for p in params)
        target = torch.randn(2, 10)
        optimizer = torch.optim.SGD(params, lr=0.05)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = F.mse_loss(gm(*inputs), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]

    def test_batch_norm_training_block_updates_statistics_then_restores_inference(self):
        model, inputs = self.model()
        gm, _ = prune(model, inputs, ratio=0.5)
        mean_before = gm.get_buffer("4.running_mean").clone()
        with batch_norm_training(gm):
            gm(torch.randn(8, 3, 8, 8) * 3 + 1)
            assert all(ops.arg(n, "training") for n in gm.graph.nodes if ops.is_op(n, "batch_norm"))
        assert not torch.equal(gm.get_buffer("4.running_mean"), mean_before)
        assert not any(ops.arg(n, "training") for n in gm.graph.nodes if ops.is_op(n, "batch_norm"))
        torch.testing.assert_close(gm(*inputs), gm(*inputs))

    def test_calibration_data_re_estimates_downstream_statistics(self):
        model, inputs = self.model()
        batches = [(torch.randn(16, 3, 8, 8),) for _ in range(4)]
        gm, ctx = prune(model, inputs, calibration_data=batches, ratio=0.5)
        assert ctx.figures["batch_norms_recalibrated"] == 1  # bn 4 follows a lossy cut; bn 1 precedes them all
        assert set(gm.get_buffer("1.running_mean").tolist()) <= set(model[1].running_mean.tolist())
        conv3 = next(n for n in gm.graph.nodes if ops.is_op(n, "conv2d") and ops.arg(n, "weight").target == "3.weight")
        seen = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                seen[n] = super().run_node(n)
                return seen[n]

        with torch.no_grad():
            Recorder(gm).run(torch.cat([b[0] for b in batches]))
        torch.testing.assert_close(gm.get_buffer("4.running_mean"), seen[conv3].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gm.get_buffer("4.running_var"), seen[conv3].var((0, 2, 3)), rtol=1e-4, atol=1e-5)

    def test_rewrite_budget_limits_groups_cut(self):
        model, inputs = self.model()
        gm, ctx = prune(model, inputs, budget=RewriteBudget(1), ratio=0.5)
        assert len(ctx.figures["groups"]) == 1 and weight(gm, "3").shape[0] == 32

    def test_through_the_pass_manager_with_verification(self):
        model, inputs = self.model()
        result = graphopt.optimize(model, inputs, "prune-channels{ratio=0.5,round_to=8}", verify="each",
                                   on_failure="raise")
        record = result.report.records[0]
        assert record.status == "changed" and record.rewrites == 3
        assert result.module(*inputs).shape == (2, 10)

    @pytest.mark.parametrize("verify", ["each", "final"])
    def test_without_a_budget_the_report_gives_the_sqnr_and_says_no_budget_not_ok(self, verify):
        model, inputs = self.model()
        report = graphopt.optimize(model, inputs, "prune-channels{ratio=0.9}", verify=verify).report
        (record,) = report.records
        assert record.status == "changed" and record.check == "no budget" and record.contract == "lossy(no budget)"
        (sqnr,) = record.figures["output_sqnr_db"]  # measured by the pass itself, whatever the verify mode
        assert sqnr < 10 and any(f"output SQNR {sqnr:.1f} dB" in note and "no budget" in note for note in record.notes)
        if verify == "each":
            assert record.min_sqnr_db < 10
        assert report.final_check == "no budget" and report.unbudgeted == ["prune-channels"]
        text = str(report)
        assert "captured model: no budget: output SQNR" in text and "captured model: ok" not in text
        data = json.loads(json.dumps(report.to_dict()))
        assert data["final_check"] == "no budget" and data["records"][0]["check"] == "no budget"
        assert data["records"][0]["figures"]["output_sqnr_db"] == [pytest.approx(sqnr)]
        assert data["records"][0]["options"]["min_sqnr"] is None

    @pytest.mark.parametrize("verify", ["each", "none"])
    def test_min_sqnr_rolls_back_a_cut_below_it(self, verify):
        model, inputs = self.model()
        result = graphopt.optimize(model, inputs, "prune-channels{ratio=0.9,min_sqnr=20}", verify=verify)
        (record,) = result.report.records
        assert record.status == "rolled-back" and record.contract == "lossy(sqnr>=20dB)" and record.check is None
        assert "below the min_sqnr budget of 20 dB" in record.error
        assert weight(result.module, "3").shape[0] == 32 and not result.report.unbudgeted
        if verify == "each":
            assert result.report.final_check == "ok"
        data = json.loads(json.dumps(result.report.to_dict()))
        assert data["records"][0]["status"] == "rolled-back" and data["records"][0]["options"]["min_sqnr"] == 20
        with pytest.raises(PassError, match="min_sqnr budget of 20 dB"):
            graphopt.optimize(model, inputs, "prune-channels{ratio=0.9,min_sqnr=20}", on_failure="raise")

    def test_min_sqnr_keeps_a_cut_within_it_and_says_ok(self):
        model, inputs = self.model()
        result = graphopt.optimize(model, inputs, "prune-channels", verify="each", options={
            "prune-channels": {"ratio": 0.1, "min_sqnr": 3.0}})
        (record,) = result.report.records
        assert record.status == "changed" and record.check == "ok" and record.contract == "lossy(sqnr>=3dB)"
        assert record.min_sqnr_db >= 3.0 and record.figures["output_sqnr_db"][0] >= 3.0
        assert result.report.final_check == "ok" and "captured model: ok" in str(result.report)
        assert weight(result.module, "3").shape[0] < 32


@pytest.mark.parametrize("backend", ["onnx", "torchscript-mobile"])
def test_pruned_graph_lowers(backend, tmp_path):
    pytest.importorskip(f"graphopt.backends.{backend.replace('-', '_')}")
    model = randomized(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(16 * 16, 4)))
    inputs = (torch.randn(1, 3, 4, 4),)
    gm, _ = prune(model, inputs, ratio=0.5, round_to=4)
    artifact = graphopt.lower(gm, inputs, backend=backend, path=tmp_path / "pruned")
    assert artifact.verdict.ok


# --------------------------------------------------------------------------- random models


class ConvBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project = nn.Conv2d(2 * c, w, 1)

    def forward(self, x):
        return self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))


class GroupedBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.conv = nn.Conv2d(c, w, 3, padding=1, groups=4)

    def forward(self, x):
        return F.relu(self.conv(x))


class CatBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, w // 2, 1), nn.Conv2d(c, w - w // 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


class ChunkBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * w, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return a * torch.sigmoid(b)


class SplitBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.w, self.conv = w, nn.Conv2d(c, w, 1)

    def forward(self, x):
        a, b = torch.split(self.conv(x), [self.w // 4, self.w - self.w // 4], dim=1)
        return torch.cat([F.relu(a), torch.tanh(b)], 1)


class GroupNormBlock(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(c, w, 1), nn.GroupNorm(4, w)

    def forward(self, x):
        return F.silu(self.gn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, w: int):
        super().__init__()
        self.fc1, self.fc2, self.mask = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), nn.Conv2d(c, 1, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale * torch.sigmoid(self.mask(x))


BLOCKS = {"conv": ConvBlock, "residual": ResidualBlock, "inverted": InvertedResidual, "grouped": GroupedBlock,
          "cat": CatBlock, "chunk": ChunkBlock, "split": SplitBlock, "group_norm": GroupNormBlock,
          "se": SqueezeExcite}
KEEPS_WIDTH = {"residual", "se"}


class Net(nn.Module):
    """A stem, random blocks, and one of three heads (pooled linear, flatten linear, view linear)."""

    def __init__(self, blocks: list[tuple[str, int]], head: str, spatial: int = 4):
        super().__init__()
        c = blocks[0][1] if blocks[0][0] in KEEPS_WIDTH else 8
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        layers = []
        for kind, w in blocks:
            layers.append(BLOCKS[kind](c, w))
            c = c if kind in KEEPS_WIDTH else w
        self.blocks, self.head, self.features = nn.Sequential(*layers), head, c * spatial * spatial
        self.fc = nn.Linear(c if head == "pool" else self.features, 5)

    def forward(self, x):
        y = self.blocks(F.relu(self.stem(x)))
        if self.head == "pool":
            return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))
        if self.head == "view":
            return self.fc(y.view(-1, self.features))
        return self.fc(torch.flatten(y, 1))


nets = st.builds(
    lambda blocks, head, seed: randomized(Net(blocks, head), seed),
    st.lists(st.tuples(st.sampled_from(sorted(BLOCKS)), st.sampled_from([4, 8, 12, 16])), min_size=1, max_size=5),
    st.sampled_from(["pool", "flatten", "view"]),
    st.integers(0, 1000),
)
NET_INPUTS = (torch.randn(2, 3, 4, 4),)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(nets, st.floats(0.0, 0.95), st.sampled_from([1, 2, 4, 8]))
def test_random_nets_stay_runnable_with_rounded_counts(net, ratio, round_to):
    gm, ctx = prune(net, NET_INPUTS, ratio=ratio, round_to=round_to)
    assert_same_shapes(gm, net, NET_INPUTS)
    for group in ctx.figures["groups"]:
        before, after = group["channels"]
        assert 0 < after < before and after % round_to == 0
    for name, p in gm.named_parameters():
        assert all(s > 0 for s in p.shape), name


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(nets, st.data())
def test_random_nets_with_dead_channels_are_unchanged(net, data):
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not net.fc]
    for layer in layers:
        rows = data.draw(st.lists(st.integers(0, layer.weight.shape[0] - 1), max_size=3, unique=True))
        with_dead_channels(net, layer, rows, data.draw(st.sampled_from([0.0, -1.0, 1.5])))
    gm, ctx = prune(net, NET_INPUTS, ratio=0.0)
    torch.testing.assert_close(gm(*NET_INPUTS), net(*NET_INPUTS), rtol=1e-4, atol=1e-4)
    assert all(group["exact"] for group in ctx.figures["groups"])


class _Heads(nn.Module):
    """A fresh layer on each output of a generated model, so its last channels are prunable."""

    def __init__(self, body: nn.Module, outputs: tuple[torch.Tensor, ...]):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleList(
            nn.Conv2d(o.shape[1], 3, 1) if o.dim() == 4 else nn.Conv1d(o.shape[1], 3, 1) if o.dim() == 3
            else nn.Linear(o.shape[-1], 3) for o in outputs)

    def on(self, outputs):
        if len(self.heads) == 1:
            return self.heads[0](outputs)
        return tuple(head(outputs[i]) for i, head in enumerate(self.heads))


class _Heads1(_Heads):
    def forward(self, x):
        return self.on(self.body(x))


class _Heads2(_Heads):
    def forward(self, x, x2):
        return self.on(self.body(x, x2))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(models(max_depth=7), st.floats(0.0, 0.95), st.sampled_from([1, 2, 4, 8]))
def test_generated_models_stay_runnable(case, ratio, round_to):
    """graphopt.testing models (every op kind it draws) with a head on each output."""
    with torch.no_grad():
        outputs = case.module(*case.example_inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(0)
    model = (_Heads1 if len(case.example_inputs) == 1 else _Heads2)(case.module, outputs).eval()
    gm, ctx = prune(model, case.example_inputs, ratio=ratio, round_to=round_to)
    assert_same_shapes(gm, model, case.example_inputs)
    for group in ctx.figures["groups"]:
        assert 0 < group["channels"][1] and group["channels"][1] % round_to == 0


@pytest.mark.parametrize("name", ["resnet_cnn", "mobilenet_cnn"])
def test_pruning_after_fusion_prunes_as_much_as_before_it(name):
    """Fusion makes a unit's activation write in place into the conv's output; channels must
    flow through it as through the activation, not freeze the conv."""
    from graphopt.app import examples
    from graphopt.ir import graph as G

    model, inputs = examples.get_example(name)
    after = graphopt.optimize(model, inputs, pipeline="mobile-fp32,prune-channels{ratio=0.5}")
    before = graphopt.optimize(model, inputs, pipeline="canonicalize,prune-channels{ratio=0.5},mobile-fp32")
    assert not after.report.failed and not before.report.failed
    assert G.param_bytes(after.module) == G.param_bytes(before.module) < 0.5 * G.param_bytes(graphopt.capture(model, inputs))
