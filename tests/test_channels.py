"""graphopt.channels: the coupling analysis (which tensor dims go together, with which index
mapping, and what is frozen and why), dead-channel detection, and graphopt.ir.costs.

Every model is captured with graphopt.capture, so the analysis sees the canonical form passes see.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import channels
from graphopt.ir.costs import costs, macs


def analyze(model: nn.Module, *shape: int) -> channels.ChannelAnalysis:
    inputs = (torch.randn(*shape),)
    return channels.analyze(graphopt.capture(model.eval(), inputs))


def dims(group: channels.ChannelGroup) -> dict[tuple[str, int], np.ndarray]:
    """(tensor name, dim) -> positions of each unit, for every tensor dim the group cuts."""
    return {(d.names[0], d.dim): d.positions for d in group.dims}


def out_group(analysis: channels.ChannelAnalysis, layer: str) -> channels.ChannelGroup:
    group = analysis.group_of(layer)
    assert group is not None, f"no group holds the outputs of {layer}"
    return group


def reasons(group: channels.ChannelGroup) -> str:
    return " | ".join(r for _, r in group.frozen)


class ConvBnConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x)))).sum((2, 3))


class TestChains:
    def test_conv_norm_activation_conv_is_one_group_with_identity_mapping(self):
        a = analyze(ConvBnConv(), 1, 3, 6, 6)
        g = out_group(a, "conv1")
        assert not g.frozen and g.channels == 8 and g.width == 1
        ident = np.arange(8).reshape(8, 1)
        expected = {("conv1.weight", 0), ("conv1.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0),
                    ("bn.weight", 0), ("bn.bias", 0), ("conv2.weight", 1)}
        assert set(dims(g)) == expected
        for positions in dims(g).values():
            assert np.array_equal(positions, ident)
        assert [layer.name for layer in g.consumers] == ["conv2"]

    def test_graph_input_freezes_the_first_layer_inputs(self):
        a = analyze(ConvBnConv(), 1, 3, 6, 6)
        first_in = next(g for g in a.groups if ("conv1.weight", 1) in dims(g))
        assert "graph input 'x'" in reasons(first_in)

    def test_reduction_over_channels_freezes_them(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        gm = graphopt.capture(model.eval(), (torch.randn(1, 3, 6, 6),))
        with gm.graph.inserting_before(gm.graph.output_node()):
            total = gm.graph.call_method("sum", (gm.graph.output_node().args[0], 1))
        gm.graph.output_node().args = (total,)
        gm.recompile()
        a = channels.analyze(gm, (torch.randn(1, 3, 6, 6),))
        assert "sum reduces over channels" in reasons(out_group(a, "2"))

    def test_classifier_output_is_frozen(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        a = analyze(model, 2, 3, 6, 6)
        assert "graph output" in reasons(out_group(a, "3"))
        assert not out_group(a, "0").frozen


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.c(F.relu(y + self.b(y)))


class TestElementwise:
    def test_residual_add_couples_both_branches_index_by_index(self):
        a = analyze(Residual(), 1, 3, 5, 5)
        g = out_group(a, "a")
        assert g is out_group(a, "b")
        assert {layer.name for layer in g.producers} == {"a", "b"}
        d = dims(g)
        assert np.array_equal(d["a.weight", 0], d["b.weight", 0])
        assert np.array_equal(d["b.weight", 1], d["a.weight", 0])  # b reads the same channels it adds to

    def test_per_channel_scale_couples_channels(self):
        class SE(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
                self.head = nn.Conv2d(8, 2, 1)

            def forward(self, x):
                y = self.conv(x)
                s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
                return self.head(y * s)  # (N,C,1,1) * (N,C,H,W): C is coupled

        a = analyze(SE(), 1, 3, 6, 6)
        assert out_group(a, "conv") is out_group(a, "fc2")

    def test_broadcast_mask_does_not_couple_channels(self):
        class Masked(nn.Module):  # HARD-CASES D7
            def __init__(self):
                super().__init__()
                self.conv, self.mask, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 1, 3), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                return self.head(self.conv(x) * torch.sigmoid(self.mask(x)))  # (N,1,H,W) * (N,C,H,W)

        a = analyze(Masked(), 1, 3, 6, 6)
        g = out_group(a, "conv")
        assert not g.frozen and g.channels == 8
        assert a.group_of("mask") is not g

    def test_channel_count_read_as_a_number_freezes(self):
        class Reads(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(16, 2)

            def forward(self, x):
                y = self.conv(x)
                return self.fc(y.reshape(y.size(0), y.size(1), -1).flatten(1))

        a = analyze(Reads(), 1, 3, 4, 4)
        assert "read as a number" in reasons(out_group(a, "conv"))


class TestConcatSplit:
    def test_cat_maps_each_input_to_its_offset(self):
        class Cat(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

            def forward(self, x):
                return self.c(torch.cat([self.a(x), self.b(x)], 1)).sum((2, 3))

        a = analyze(Cat(), 1, 3, 4, 4)
        ga, gb = out_group(a, "a"), out_group(a, "b")
        assert ga is not gb and not ga.frozen and not gb.frozen
        assert dims(ga)["c.weight", 1].ravel().tolist() == [0, 1, 2, 3]
        assert dims(gb)["c.weight", 1].ravel().tolist() == [4, 5, 6, 7, 8, 9]

    def test_split_sections_are_separate_groups_with_rewritable_sizes(self):
        class Split(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.p, self.q = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(5, 2, 1)

            def forward(self, x):
                a, b = torch.split(self.conv(x), [3, 5], dim=1)  # sizes hard-coded (HARD-CASES D2)
                return (self.p(a) + self.q(b)).sum((2, 3))

        a = analyze(Split(), 1, 3, 4, 4)
        first = next(g for g in a.groups if ("p.weight", 1) in dims(g))
        second = next(g for g in a.groups if ("q.weight", 1) in dims(g))
        assert first is not second
        assert dims(first)["conv.weight", 0].ravel().tolist() == [0, 1, 2]
        assert dims(second)["conv.weight", 0].ravel().tolist() == [3, 4, 5, 6, 7]
        assert any("split sections" in what for what in first.args)

    def test_chunk_couples_index_i_of_every_chunk(self):
        class Chunk(nn.Module):  # HARD-CASES D3: equal counts per chunk
            def __init__(self):
                super().__init__()
                self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

            def forward(self, x):
                a, b = self.conv(x).chunk(2, dim=1)
                return self.head(a * torch.sigmoid(b) + b).sum((2, 3))

        a = analyze(Chunk(), 1, 3, 4, 4)
        g = out_group(a, "conv")
        assert g.width == 2 and len(g) == 4
        assert dims(g)["conv.weight", 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]

    def test_uneven_split_is_frozen(self):
        class Uneven(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 7, 1)

            def forward(self, x):
                a, b, c = self.conv(x).split(3, dim=1)  # 3 + 3 + 1
                return a + b, c

        a = analyze(Uneven(), 1, 3, 4, 4)
        assert "uneven" in reasons(out_group(a, "conv"))


class TestGroupedConvs:
    def test_depthwise_couples_input_and_output_and_rewrites_groups(self):
        class DW(nn.Module):
            def __init__(self):
                super().__init__()
                self.pw, self.dw, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 2, 1)

            def forward(self, x):
                return self.head(F.relu(self.dw(F.relu(self.pw(x))))).sum((2, 3))

        a = analyze(DW(), 1, 3, 5, 5)
        g = out_group(a, "pw")
        assert g is out_group(a, "dw") and g.width == 1 and not g.frozen
        d = dims(g)
        assert np.array_equal(d["pw.weight", 0], d["dw.weight", 0])
        assert any("groups of" in what for what in g.args)

    def test_grouped_conv_prunes_whole_groups(self):
        class Grouped(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.g, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, groups=4), nn.Conv2d(12, 2, 1)

            def forward(self, x):
                return self.head(self.g(self.a(x))).sum((2, 3))

        a = analyze(Grouped(), 1, 3, 5, 5)
        g = out_group(a, "a")
        assert g is out_group(a, "g") and len(g) == 4
        d = dims(g)
        assert d["a.weight", 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # 2 inputs per conv group
        assert d["g.weight", 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # 3 outputs
        assert g.width == 2  # counted in the narrower producer dim
        per_group_inputs = next(x for x in a.groups if ("g.weight", 1) in dims(x))
        assert "per-group input width" in reasons(per_group_inputs)


class TestReshapes:
    def test_flatten_into_linear_maps_channel_to_its_spatial_block(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 3, 5), nn.ReLU(),
                              nn.Linear(5, 1))
        a = analyze(model, 2, 3, 4, 5)
        g = out_group(a, "0")
        assert dims(g)["3.weight", 1].tolist() == [list(range(c * 6, c * 6 + 6)) for c in range(4)]

    def test_view_with_literal_sizes_is_rewritten(self):
        class View(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 4, 2)

            def forward(self, x):
                return self.fc(self.conv(x).view(-1, 16))

        a = analyze(View(), 2, 3, 4, 4)
        g = out_group(a, "conv")
        assert not g.frozen and any("sizes of view" in what for what in g.args)

    def test_linear_view_conv_transpose_couples_feature_blocks(self):
        class Decoder(nn.Module):  # HARD-CASES D5
            def __init__(self):
                super().__init__()
                self.fc, self.up = nn.Linear(6, 4 * 3 * 3), nn.ConvTranspose2d(4, 2, 2, stride=2)

            def forward(self, z):
                return self.up(self.fc(z).view(-1, 4, 3, 3)).sum((2, 3))

        a = analyze(Decoder(), 2, 6)
        g = out_group(a, "fc")
        assert not g.frozen and len(g) == 4 and g.width == 9
        assert dims(g)["fc.weight", 0].tolist() == [list(range(c * 9, c * 9 + 9)) for c in range(4)]
        assert dims(g)["up.weight", 0].ravel().tolist() == [0, 1, 2, 3]

    def test_permute_to_channels_last_then_linear(self):
        class NHWC(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))

        a = analyze(NHWC(), 1, 3, 4, 4)
        g = out_group(a, "conv")
        assert not g.frozen and ("fc.weight", 1) in dims(g)

    def test_reshape_that_cannot_be_mapped_is_frozen_with_a_reason(self):
        class Scramble(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.head = nn.Conv1d(3, 6, 1), nn.Conv1d(4, 2, 1)

            def forward(self, x):
                return self.head(self.conv(x).reshape(-1, 4, 6))  # (N,6,4) -> (N,4,6)

        a = analyze(Scramble(), 1, 3, 4)
        assert "does not map onto whole output indices" in reasons(out_group(a, "conv"))


class TestNorms:
    def test_group_norm_couples_its_groups_and_rewrites_num_groups(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
        a = analyze(model, 1, 3, 4, 4)
        g = out_group(a, "0")
        assert g.width == 2 and len(g) == 4 and not g.frozen
        assert ("1.weight", 0) in dims(g) and any("num_groups" in what for what in g.args)

    def test_layer_norm_over_features_rewrites_normalized_shape(self):
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4))
        a = analyze(model, 2, 5, 4)
        g = out_group(a, "0")
        assert not g.frozen and ("1.weight", 0) in dims(g)
        assert any("normalized_shape" in what for what in g.args)


class TestOpaque:
    def test_opaque_module_freezes_adjacent_groups(self):
        class Custom(nn.Module):
            def forward(self, x):
                return x * 2

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.custom, self.b = nn.Conv2d(3, 4, 1), Custom(), nn.Conv2d(4, 2, 1)

            def forward(self, x):
                return self.b(self.custom(self.a(x))).sum((2, 3))

        inputs = (torch.randn(1, 3, 4, 4),)
        gm = graphopt.capture(M().eval(), inputs, leaf_modules=(Custom,))
        a = channels.analyze(gm)
        assert "opaque module call 'custom'" in reasons(out_group(a, "a"))
        b_inputs = next(g for g in a.groups if ("b.weight", 1) in dims(g))
        assert "opaque module 'custom'" in reasons(b_inputs)

    def test_unknown_op_freezes_instead_of_crashing(self):
        class Cumsum(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

            def forward(self, x):
                return self.head(torch.cumsum(self.conv(x), 1)).sum((2, 3))

        a = analyze(Cumsum(), 1, 3, 4, 4)
        assert "has no channel rule" in reasons(out_group(a, "conv"))

    def test_coupling_graph_links_groups_to_tensor_dims(self):
        a = analyze(Residual(), 1, 3, 5, 5)
        g = out_group(a, "a")
        assert ("dim", "b.weight", 1) in a.graph[("group", g.id)]


class TestDeadUnits:
    @staticmethod
    def model(pad: int, bias_value: float, batch_norm: bool) -> tuple[nn.Module, tuple[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4) if batch_norm else nn.Identity(),
                              nn.ReLU(), nn.Conv2d(4, 3, 3, padding=pad), nn.Flatten(), nn.LazyLinear(2))
        inputs = (torch.randn(2, 3, 6, 6),)
        model(*inputs)
        with torch.no_grad():
            model[0].weight[2] = 0
            model[0].bias[2] = bias_value
        return model.eval(), inputs

    def dead(self, pad: int, bias_value: float, batch_norm: bool = False) -> dict[int, channels.DeadUnit]:
        model, inputs = self.model(pad, bias_value, batch_norm)
        gm = graphopt.capture(model, inputs)
        return channels.dead_units(channels.analyze(gm), inputs)

    def test_zero_weights_and_zero_constant_are_dead_even_before_padding(self):
        (unit,) = self.dead(pad=1, bias_value=-3.0).values()  # relu(-3) = 0 reaches the next conv
        assert unit.bias_deltas == {}

    def test_non_zero_constant_is_compensated_into_an_unpadded_consumer(self):
        (unit,) = self.dead(pad=0, bias_value=5.0).values()
        (delta,) = unit.bias_deltas.values()
        assert delta.shape == (3,) and bool((delta != 0).all())

    def test_non_zero_constant_before_zero_padding_is_not_dead(self):
        assert self.dead(pad=1, bias_value=5.0) == {}

    def test_live_channel_is_not_dead(self):
        model, inputs = self.model(0, 0.0, False)
        with torch.no_grad():
            model[0].weight[2, 0, 0, 0] = 1e-30
        assert channels.dead_units(channels.analyze(graphopt.capture(model, inputs)), inputs) == {}


class TestCosts:
    def test_macs_params_and_bytes_from_shapes(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                              nn.Linear(8 * 2 * 2, 5))
        gm = graphopt.capture(model.eval(), (torch.randn(1, 3, 6, 6),))
        c = costs(gm)
        expected = 8 * 4 * 4 * 3 * 9 + 8 * 2 * 2 * 9 + 5 * 32
        assert macs(gm) == c.macs == expected
        assert c.parameters == sum(p.numel() for p in model.parameters())
        assert c.bytes == 4 * c.parameters
