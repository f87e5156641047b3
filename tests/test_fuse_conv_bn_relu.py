"""fuse-conv-bn-relu: batch-norm folding into conv/linear and conv+activation fusion units.

Every batch norm gets random running statistics and affine parameters (a fresh one is an
identity and would hide a wrong fold). Outputs are compared with the eager model.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import graphopt.passes.fuse_conv_bn_relu  # noqa: F401  (registers the pass)
from graphopt.ir import ops
from graphopt.ir.ops import fused_activation_op
from graphopt.capture import capture
from graphopt.pipeline.passes import RewriteBudget
from graphopt.ir.purity import mutated_values
from graphopt.testing import Case, assert_sound

PASS = "fuse-conv-bn-relu"


# --------------------------------------------------------------------------- helpers


def randomize(bn: nn.modules.batchnorm._BatchNorm, *, min_var: float = 0.2) -> nn.Module:
    """Give ``bn`` random statistics (and affine parameters, when it has them)."""
    with torch.no_grad():
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn_like(bn.running_mean))
            bn.running_var.copy_(torch.rand_like(bn.running_var) * 2 + min_var)
        if bn.affine:
            bn.weight.copy_(torch.randn_like(bn.weight))
            bn.bias.copy_(torch.randn_like(bn.bias))
    return bn


def run_pass(model: nn.Module | fx.GraphModule, inputs: tuple, *, verify: str = "each",
             budget: RewriteBudget | None = None, **options):
    """Capture ``model`` (unless captured already) and run only this pass; returns (graph
    module, the pass's record)."""
    manager = graphopt.PassManager([PASS], verify=verify, on_failure="raise",
                                   options={PASS: options} if options else None)
    result = manager.run(model, inputs, budget=budget)
    return result.module, result.report.records[0]


def count_op(gm: fx.GraphModule, name: str) -> int:
    return sum(1 for n in gm.graph.nodes if ops.is_op(n, name))


def rel_error(got, want) -> float:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_same_outputs(gm, model, inputs, rtol: float = 1e-5):
    got, want = gm(*inputs), model(*inputs)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        error = rel_error(g, w)
        assert error <= rtol, f"output {i}: relative error {error:.3g} > {rtol:g}"


def conv_node(gm: fx.GraphModule) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if ops.spec_of(n) and ops.spec_of(n).name.startswith(("conv", "linear"))]
    return node


def fused_weight_and_bias(gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
    conv = conv_node(gm)
    return gm.get_parameter(ops.arg(conv, "weight").target), gm.get_parameter(ops.arg(conv, "bias").target)


def declines(record) -> str:
    return " | ".join(reason for _, reason in record.declines)


class Seq(nn.Sequential):
    """A layer stack whose last output is scaled before it leaves the graph (a batch-norm output
    that is a graph output is tested separately)."""

    def forward(self, x):
        return super().forward(x) * 2.0


# --------------------------------------------------------------------------- folding is exact


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
C = 4


@pytest.mark.parametrize(
    "dims,transposed,bias,groups,affine",
    list(itertools.product((1, 2, 3), (False, True), (True, False), (1, 2, C), (True, False))),
)
def test_fold_matches_eager_for_every_conv_kind(dims, transposed, bias, groups, affine):
    torch.manual_seed(dims * 100 + groups * 10 + transposed * 2 + bias + affine * 5)
    layer = (CONV_T if transposed else CONV)[dims](C, C, 3, stride=1 + transposed, groups=groups, bias=bias)
    model = Seq(layer, randomize(BN[dims](C, affine=affine))).eval()
    x = (torch.randn(2, C, *(5,) * dims),)

    gm, record = run_pass(model, x, verify="none")  # compared below, more tightly than the manager does
    assert record.rewrites == 1 and record.figures["batch_norms_folded"] == 1
    assert count_op(gm, "batch_norm") == 0
    assert_same_outputs(gm, model, x, rtol=1e-5)

    model64, x64 = model.double(), (x[0].double(),)
    gm64, _ = run_pass(model64, x64, verify="none")
    assert count_op(gm64, "batch_norm") == 0
    assert_same_outputs(gm64, model64, x64, rtol=1e-12)


def test_conv_transpose_groups_scale_each_groups_own_output_channels():
    # groups=2, Cin=4, Cout=6: weight (4, 3, k); rows 0-1 feed channels 0-2, rows 2-3 channels 3-5
    torch.manual_seed(1)
    model = Seq(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), randomize(nn.BatchNorm2d(6))).eval()
    x = (torch.randn(1, 4, 5, 5),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1
    weight, _ = fused_weight_and_bias(gm)
    assert weight.shape == model[0].weight.shape
    assert_same_outputs(gm, model, x)


def test_linear_then_batchnorm1d_on_2d_input_folds():
    torch.manual_seed(2)
    model = Seq(nn.Linear(5, 4), randomize(nn.BatchNorm1d(4))).eval()
    x = (torch.randn(8, 5),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1 and count_op(gm, "batch_norm") == 0
    assert_same_outputs(gm, model, x)


def test_stacked_batch_norms_both_fold_in_one_run():
    torch.manual_seed(23)
    model = Seq(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), randomize(nn.BatchNorm2d(4))).eval()
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 2 and count_op(gm, "batch_norm") == 0
    assert conv_node(gm).meta["folded_from"] == ["0", "1", "2"]
    assert_same_outputs(gm, model, x)


def test_mixed_dtypes_fold_in_float64_and_take_the_conv_dtype():
    torch.manual_seed(3)
    model = Seq(nn.Conv2d(4, 4, 3).to(torch.bfloat16), randomize(nn.BatchNorm2d(4))).eval()  # BN stays fp32
    x = (torch.randn(1, 4, 6, 6, dtype=torch.bfloat16),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1
    weight, bias = fused_weight_and_bias(gm)
    assert weight.dtype == bias.dtype == torch.bfloat16
    reference = Seq(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval().double()
    reference.load_state_dict(model.state_dict())
    want = reference(x[0].double())
    assert rel_error(gm(*x), want) <= 2 * rel_error(model(*x), want) + 1e-3


# --------------------------------------------------------------------------- declines


def assert_declined(model, inputs, reason: str, **options):
    gm, record = run_pass(model, inputs, **options)
    assert record.rewrites == 0, record
    assert reason in declines(record), declines(record)
    assert count_op(gm, "batch_norm") == 1
    assert_same_outputs(gm, model, inputs)
    return gm, record


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class BNLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x))


class SubclassedConv(nn.Conv2d):
    pass


def test_conv_output_with_other_users_is_declined():
    torch.manual_seed(4)
    assert_declined(TwoOutputs().eval(), (torch.randn(1, 3, 6, 6),), "also read by")


def test_batch_norm_output_that_is_a_graph_output_folds():
    torch.manual_seed(5)
    model, x = BNLast().eval(), (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1 and count_op(gm, "batch_norm") == 0
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert output.args[0] is conv_node(gm)  # the fused conv's output is the graph output now
    assert_same_outputs(gm, model, x)


def test_linear_then_batchnorm1d_on_3d_input_is_declined_even_when_sizes_agree():
    # (N, C=4, L=4): BN normalizes dim 1, linear acts on the last dim; folding would be wrong
    torch.manual_seed(6)
    model = Seq(nn.Linear(4, 4), randomize(nn.BatchNorm1d(4))).eval()
    assert_declined(model, (torch.randn(2, 4, 4),), "linear output is 3-D")


def test_unbatched_conv_then_batch_norm_is_declined():
    # unbatched conv2d output (C, H, W): BatchNorm1d reads it as (N=C, C=H, L=W)
    torch.manual_seed(7)
    model = Seq(nn.Conv2d(4, 4, 1), randomize(nn.BatchNorm1d(4))).eval()
    assert_declined(model, (torch.randn(4, 4, 5),), "unbatched")


def test_batch_norm_in_training_mode_is_declined():
    torch.manual_seed(8)
    model = Seq(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))).eval()
    model[1].train()
    assert_declined(model, (torch.randn(2, 3, 6, 6),), "training mode")


def test_batch_norm_without_running_stats_is_declined():
    torch.manual_seed(9)
    model = Seq(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4, track_running_stats=False))).eval()
    assert_declined(model, (torch.randn(2, 3, 6, 6),), "running statistics")


def test_batch_norm_after_a_nonlinearity_is_declined():
    torch.manual_seed(10)
    model = Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), randomize(nn.BatchNorm2d(4))).eval()
    assert_declined(model, (torch.randn(1, 3, 6, 6),), "not a canonical conv", fuse_activations=False)


def test_opaque_conv_modules_are_not_matched():
    # capture keeps parametrized layers as opaque call_module nodes
    torch.manual_seed(11)
    model = Seq(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), randomize(nn.BatchNorm2d(4))).eval()
    gm, _ = assert_declined(model, (torch.randn(1, 3, 6, 6),), "not a canonical conv")
    assert any(n.op == "call_module" for n in gm.graph.nodes)


def test_a_subclassed_conv_whose_forward_traces_is_inlined_and_fused():
    torch.manual_seed(11)
    model = Seq(SubclassedConv(3, 4, 3), randomize(nn.BatchNorm2d(4))).eval()
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1 and not any(n.op == "call_module" for n in gm.graph.nodes)
    assert torch.allclose(gm(*x), model(*x), atol=1e-5)


def test_zero_variance_with_zero_eps_is_declined_as_non_finite():
    torch.manual_seed(12)
    model = Seq(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4, eps=0.0))).eval()
    with torch.no_grad():
        model[1].running_var[1] = 0.0
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 0 and "non-finite fold" in declines(record)
    assert count_op(gm, "batch_norm") == 1
    torch.testing.assert_close(gm(*x), model(*x), equal_nan=True)


class WeightMutatedInForward(nn.Module):
    """The conv weight is scaled in place by forward, directly or through a view. (A frozen
    parameter: fx reads plain buffers as constants at trace time, so their mutation never
    reaches the graph.)"""

    def __init__(self, through_view: bool):
        super().__init__()
        self.through_view = through_view
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3), requires_grad=False)
        self.bn = randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        (self.weight.view(-1) if self.through_view else self.weight).mul_(1.0)
        return self.bn(F.conv2d(x, self.weight)) * 2.0


@pytest.mark.parametrize("through_view", [False, True])
def test_weight_modified_in_place_by_the_graph_is_declined(through_view):
    torch.manual_seed(13)
    assert_declined(WeightMutatedInForward(through_view).eval(), (torch.randn(1, 3, 6, 6),), "modified in place")


# --------------------------------------------------------------------------- sharing


class SharedConv(nn.Module):
    """One conv module called at two sites; only the first is followed by batch norm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) * 2.0, self.conv(x + 1.0)


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3, bias=False)
        self.b.weight = self.a.weight
        self.bn = randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.a(x)) * 2.0, self.b(x)


class SharedConvTwoBNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1, self.bn2 = randomize(nn.BatchNorm2d(4)), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn1(self.conv(x)) * 2.0, self.bn2(self.conv(x - 1.0)) * 2.0


@pytest.mark.parametrize("model_type,folds", [(SharedConv, 1), (TiedWeights, 1), (SharedConvTwoBNs, 2)])
def test_shared_weights_get_fused_copies_and_other_sites_keep_the_original(model_type, folds):
    torch.manual_seed(14)
    model = model_type().eval()
    originals = {n: (t, t.clone()) for n, t in model.named_parameters()}
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == folds and count_op(gm, "batch_norm") == 0
    assert_same_outputs(gm, model, x)
    for name, (tensor, copy) in originals.items():
        assert torch.equal(tensor, copy), f"{name} was modified"


# --------------------------------------------------------------------------- tensor properties


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_is_correctly_rounded_from_float64(dtype):
    # small running variances inflate the weights: folding in the low dtype loses most
    torch.manual_seed(15)
    model = Seq(nn.Conv2d(4, 8, 3), randomize(nn.BatchNorm2d(8), min_var=1e-3)).eval()
    with torch.no_grad():
        model[1].running_var.mul_(1e-2)
    model = model.to(dtype)
    x = (torch.randn(1, 4, 6, 6, dtype=dtype),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1
    weight, bias = fused_weight_and_bias(gm)
    assert weight.dtype == bias.dtype == dtype

    conv, bn = model[0], model[1]

    def fold(tp):
        scale = bn.weight.to(tp) / torch.sqrt(bn.running_var.to(tp) + bn.eps)
        w = conv.weight.to(tp) * scale.reshape(-1, 1, 1, 1)
        b = (conv.bias.to(tp) - bn.running_mean.to(tp)) * scale + bn.bias.to(tp)
        return w, b

    exact_w, exact_b = fold(torch.float64)
    via_fp32_w, via_fp32_b = (t.to(dtype) for t in fold(torch.float32))
    for ours, via_fp32, exact in ((weight, via_fp32_w, exact_w), (bias, via_fp32_b, exact_b)):
        ours_err = (ours.double() - exact).abs()
        assert torch.all(ours_err <= (via_fp32.double() - exact).abs())
        # correctly rounded: within half a unit in the last place of the result
        assert torch.all(ours_err <= exact.abs() * torch.finfo(dtype).eps / 2 + torch.finfo(dtype).tiny)


@pytest.mark.parametrize("transposed", [False, True])
def test_channels_last_weight_stays_channels_last(transposed):
    torch.manual_seed(16)
    layer = nn.ConvTranspose2d(4, 4, 3, groups=2) if transposed else nn.Conv2d(4, 4, 3)
    model = Seq(layer, randomize(nn.BatchNorm2d(4))).eval().to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = (torch.randn(1, 4, 6, 6).to(memory_format=torch.channels_last),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1
    weight, _ = fused_weight_and_bias(gm)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_fused_weight_and_created_bias_keep_requires_grad(requires_grad):
    torch.manual_seed(17)
    model = Seq(nn.Conv2d(3, 4, 3, bias=False), randomize(nn.BatchNorm2d(4))).eval()
    model.requires_grad_(requires_grad)
    gm, record = run_pass(model, (torch.randn(1, 3, 6, 6),))
    assert record.rewrites == 1
    weight, bias = fused_weight_and_bias(gm)
    assert isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter)
    assert weight.requires_grad is requires_grad and bias.requires_grad is requires_grad


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) * 2.0


def test_fused_tensors_are_new_attributes_named_after_the_conv():
    torch.manual_seed(18)
    model = ConvBN().eval()
    gm, _ = run_pass(model, (torch.randn(1, 3, 6, 6),))
    conv = conv_node(gm)
    assert ops.arg(conv, "weight").target == "conv_weight_folded"
    assert ops.arg(conv, "bias").target == "conv_bias_folded"
    assert torch.equal(gm.conv.weight, model.conv.weight)  # the original is left for DCE, unchanged
    # the conv now computes what the batch norm did, so it carries the batch norm's provenance
    assert conv.meta["provenance"] == "bn" and conv.meta["folded_from"] == ["conv", "bn"]


class FunctionalForms(nn.Module):
    """The pattern written with functional calls and a method alias (``.relu()``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), randomize(nn.BatchNorm2d(4))
        self.fc, self.bn1 = nn.Linear(4, 4), randomize(nn.BatchNorm1d(4))

    def forward(self, x):
        bn = self.bn
        y = F.batch_norm(F.conv2d(x, self.conv.weight), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         False, 0.1, bn.eps).relu()
        z = self.bn1(F.linear(y.mean((2, 3)), self.fc.weight, self.fc.bias))
        return F.relu6(y) * 2.0, z * 2.0


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_functional_and_aten_level_forms_fold(mode):
    torch.manual_seed(19)
    model, x = FunctionalForms().eval(), (torch.randn(2, 3, 6, 6),)
    gm, record = run_pass(capture(model, x, mode=mode), x)
    assert record.figures == {"batch_norms_folded": 2, "fusion_units": 1}
    assert count_op(gm, "batch_norm") == 0
    assert_same_outputs(gm, model, x)


# --------------------------------------------------------------------------- fusion units


def test_conv_relu_without_batch_norm_is_one_fusion_unit():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 1 and record.figures["fusion_units"] == 1
    conv = conv_node(gm)
    (relu,) = conv.users
    assert conv.meta["fusion_unit"]["activation"] == relu.name
    assert conv.meta["fusion_unit"]["kind"] == "relu"
    assert relu.meta["fused_into"] == conv.name
    assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("activation,kind", [(nn.ReLU6(), "relu6"), (nn.Hardtanh(-1.0, 2.0), "hardtanh")])
def test_conv_bn_clamp_becomes_one_fused_unit(activation, kind):
    torch.manual_seed(20)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), activation).eval()
    x = (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 2 and count_op(gm, "batch_norm") == 0
    unit = conv_node(gm).meta["fusion_unit"]
    assert unit["kind"] == kind and (unit["min_val"], unit["max_val"]) == (activation.min_val, activation.max_val)
    assert_same_outputs(gm, model, x)


def test_linear_relu_is_one_fusion_unit():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU()).eval()
    gm, record = run_pass(model, (torch.randn(2, 5),))
    assert record.rewrites == 1 and conv_node(gm).meta["fusion_unit"]["kind"] == "relu"


def test_activations_backends_do_not_fuse_stay_separate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()).eval()
    gm, record = run_pass(model, (torch.randn(1, 3, 6, 6),))
    assert record.rewrites == 0 and "fusion_unit" not in conv_node(gm).meta


class ConvReluAndRaw(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y), y


def test_relu_is_not_fused_when_the_conv_output_has_other_users():
    gm, record = run_pass(ConvReluAndRaw().eval(), (torch.randn(1, 3, 6, 6),))
    assert record.rewrites == 0 and "also read by" in declines(record)
    assert "fusion_unit" not in conv_node(gm).meta


def test_fuse_activations_false_only_folds():
    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), nn.ReLU()).eval()
    gm, record = run_pass(model, (torch.randn(1, 3, 6, 6),), fuse_activations=False)
    assert record.rewrites == 1 and count_op(gm, "batch_norm") == 0
    assert "fusion_unit" not in conv_node(gm).meta


# --------------------------------------------------------------------------- in-place activations


class RecordingInterpreter(fx.Interpreter):
    """Runs a graph and keeps every node's value (the tensor objects themselves)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        self.values[n.name] = value = super().run_node(n)
        return value


UNITS = {
    "conv-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 6, 6), "relu"),
    "conv-bn-relu6": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), randomize(nn.BatchNorm2d(4)), nn.ReLU6()),
                      (1, 3, 6, 6), "hardtanh"),
    "conv_transpose-hardtanh": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Hardtanh(-0.5, 0.5)),
                                (1, 3, 5, 5), "hardtanh"),
    "linear-bn-relu": (lambda: nn.Sequential(nn.Linear(5, 4), randomize(nn.BatchNorm1d(4)), nn.ReLU()), (3, 5), "relu"),
}


@pytest.mark.parametrize("unit", list(UNITS))
def test_fused_activation_runs_in_place_in_the_layer_output(unit):
    make, shape, op = UNITS[unit]
    torch.manual_seed(24)
    model, x = make().eval(), (torch.randn(*shape),)
    gm, record = run_pass(model, x)
    assert record.figures["fusion_units"] == 1
    layer = conv_node(gm)
    (act,) = layer.users
    assert fused_activation_op(act) == op
    assert act.kwargs == ({"inplace": True} if op == "hardtanh" else {})
    assert mutated_values(act) == [layer]  # dead-code elimination and folding see the write
    run = RecordingInterpreter(gm)
    with torch.no_grad():
        out = run.run(*x)
    assert run.values[act.name] is run.values[layer.name]  # no second tensor
    assert rel_error(out, model(*x)) <= 1e-5


class ConvReluAndReader(nn.Module):
    """The conv output is read after the relu by another op: an in-place relu would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) * y


@pytest.mark.parametrize("model_type", [ConvReluAndRaw, ConvReluAndReader])
def test_activation_stays_out_of_place_when_the_conv_output_is_read_elsewhere(model_type):
    torch.manual_seed(25)
    model, x = model_type().eval(), (torch.randn(1, 3, 6, 6),)
    gm, record = run_pass(model, x)
    assert record.rewrites == 0
    (relu,) = [n for n in gm.graph.nodes if ops.is_op(n, "relu")]
    assert relu.target is torch.relu and not relu.kwargs and fused_activation_op(relu) is None
    assert not mutated_values(relu)
    assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("layer,shape", [(nn.Linear(5, 4), (2, 3, 5)), (nn.Conv2d(3, 4, 3), (3, 6, 6))],
                         ids=["linear-on-3d", "unbatched-conv"])
def test_unit_whose_layer_returns_a_view_of_its_result_keeps_an_out_of_place_activation(layer, shape):
    # F.linear with bias on 3-D input and unbatched convs return a view of the kernel's result
    torch.manual_seed(28)
    model, x = nn.Sequential(layer, nn.ReLU()).eval(), (torch.randn(*shape),)
    result = graphopt.PassManager([PASS, PASS], on_failure="raise").run(model, x)
    first, second = result.report.records
    assert first.figures["fusion_units"] == 1 and second.rewrites == 0
    (relu,) = conv_node(result.module).users
    assert relu.target is torch.relu and relu.meta["fused_into"] == conv_node(result.module).name
    assert fused_activation_op(relu) is None and not mutated_values(relu)
    assert_same_outputs(result.module, model, x)


def test_canonicalize_keeps_the_fused_form_and_undoes_a_broken_one():
    torch.manual_seed(26)
    model, x = resnet_like(), (torch.randn(1, 3, 8, 8),)
    gm, fused = run_pass(model, x)
    assert fused.figures["fusion_units"] == 2
    kept = graphopt.PassManager(["canonicalize"], on_failure="raise").run(gm, x)
    assert kept.report.records[0].rewrites == 0
    gm = kept.module
    acts = [n for n in gm.graph.nodes if fused_activation_op(n)]
    assert [fused_activation_op(n) for n in acts] == ["relu", "hardtanh"]

    # without the unit's marks, the in-place relu is an ordinary one nobody can observe
    del acts[0].args[0].meta["fusion_unit"]
    again = graphopt.PassManager(["canonicalize"], on_failure="raise").run(gm, x)
    assert again.report.records[0].rewrites == 1
    relu = next(n for n in again.module.graph.nodes if n.name == acts[0].name)
    assert relu.target is torch.relu and fused_activation_op(relu) is None
    assert_same_outputs(again.module, model, x)


class DeadUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        torch.relu(self.unused(x))
        return torch.relu(self.conv(x))


def test_dead_code_elimination_removes_an_unread_unit_with_its_in_place_write():
    torch.manual_seed(27)
    model, x = DeadUnit().eval(), (torch.randn(1, 3, 6, 6),)
    result = graphopt.PassManager([PASS, "eliminate-dead-code"], on_failure="raise").run(model, x)
    fused, dce = result.report.records
    assert fused.figures["fusion_units"] == 2 and dce.rewrites > 0
    gm = result.module
    assert [ops.op_name(n) for n in gm.graph.nodes if n.op == "call_function"] == ["conv2d", "relu"]
    assert_same_outputs(gm, model, x)


def test_a_user_pass_looking_for_relu_sees_the_fused_in_place_ones(registry):
    """One spelling per op, for pass authors: ``ops.is_op(n, "relu")`` names the in-place
    activation of a fusion unit too, so a custom pass after mobile-fp32 does not skip it."""
    torch.manual_seed(28)
    model, x = resnet_like(), (torch.randn(1, 3, 8, 8),)
    seen = []

    @registry("count-relus-after-fusion")
    def count(gm, ctx):
        seen.extend(n.name for n in gm.graph.nodes if ops.is_op(n, "relu"))
        return 0

    result = graphopt.optimize(model, x, pipeline="mobile-fp32,count-relus-after-fusion")
    fused = [n.name for n in result.module.graph.nodes if fused_activation_op(n) == "relu"]
    assert fused and set(fused) <= set(seen)
    assert all(n.target is torch.relu_ for n in result.module.graph.nodes if n.name in fused)


@pytest.mark.parametrize("name", ["resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block"])
def test_mobile_fp32_is_sound_and_idempotent_on_the_examples(name):
    model, x = graphopt.examples.get_example(name)
    case = Case(model, x, f"model, example_inputs = graphopt.examples.get_example({name!r})")
    result = assert_sound("mobile-fp32", case, idempotent=True)
    units = sum(r.figures.get("fusion_units", 0) for r in result.report.records)
    in_place = [n for n in result.module.graph.nodes if fused_activation_op(n)]
    assert len(in_place) == units and (units > 0) == (name != "transformer_block")


# every conv-bn-relu6 of MobileNetV2; in ResNet-18 the relus after residual adds are not units
@pytest.mark.parametrize("name,units", [("mobilenet_v2", 35), ("resnet18", 9)])
def test_mobile_fp32_on_full_size_examples_fuses_in_place_and_a_second_run_changes_nothing(name, units):
    model, x = graphopt.examples.get_example(name)
    first = graphopt.optimize(model, x, "mobile-fp32")
    assert sum(1 for n in first.module.graph.nodes if fused_activation_op(n)) == units
    second = graphopt.optimize(first.module, x, "mobile-fp32")
    assert [r.name for r in second.report.records if r.changed] == []
    with torch.no_grad():
        assert rel_error(second.module(*x), model(*x)) <= 1e-4


# --------------------------------------------------------------------------- backbones


class StageOutputs(nn.Module):
    """A features_only-style backbone: every stage's output is returned and feeds the next stage;
    the stem's is taken right after its batch norm, the second stage's after its relu, the last
    stage's after its batch norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), randomize(nn.BatchNorm2d(4)))
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                                    randomize(nn.BatchNorm2d(6)), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), randomize(nn.BatchNorm2d(8)))

    def forward(self, x):
        x1 = self.stem(x)
        x2 = self.stage2(F.relu(x1))
        x3 = self.stage3(x2)
        return [x1, x2, x3]


def test_backbone_returning_stage_outputs_folds_every_batch_norm():
    torch.manual_seed(30)
    model, x = StageOutputs().eval(), (torch.randn(2, 3, 16, 16),)
    gm, record = run_pass(model, x)
    assert record.figures["batch_norms_folded"] == 3 and count_op(gm, "batch_norm") == 0
    convs = [n for n in gm.graph.nodes if ops.is_op(n, "conv2d")]
    assert [c.meta["folded_from"] for c in convs] == [["stem.0", "stem.1"], ["stage2.0", "stage2.1"],
                                                      ["stage3.0", "stage3.1"]]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    stem, stage2, stage3 = output.args[0]
    assert stem is convs[0] and stage3 is convs[2]  # outputs taken after batch norm: the fused convs
    assert fused_activation_op(stage2) is not None and stage2.args[0] is convs[1]  # relu in place: only it reads
    # the stem's conv output is returned, so the relu reading it must not write into it
    assert fused_activation_op(next(iter(u for u in convs[0].users if u.op != "output"))) is None
    assert "also read by output" in declines(record)
    got, want = gm(*x), model(*x)
    assert type(got) is list and len(got) == 3
    for g, w in zip(got, want):
        assert rel_error(g, w) <= 1e-5
    result = graphopt.optimize(model, x, "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed
    assert count_op(result.module, "batch_norm") == 0


# --------------------------------------------------------------------------- pass behaviour


def resnet_like() -> nn.Module:
    torch.manual_seed(22)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), randomize(nn.BatchNorm2d(8)), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), randomize(nn.BatchNorm2d(8)), nn.ReLU6(),
        nn.Conv2d(8, 4, 1), randomize(nn.BatchNorm2d(4)), nn.Flatten(),
    ).eval()


def test_second_run_finds_nothing_new():
    model, x = resnet_like(), (torch.randn(1, 3, 8, 8),)
    result = graphopt.PassManager([PASS, PASS], on_failure="raise").run(model, x)
    first, second = result.report.records
    assert first.rewrites == 5  # three folds, two fusion units
    assert second.rewrites == 0
    assert_same_outputs(result.module, model, x)


def test_each_rewrite_asks_the_budget():
    model, x = resnet_like(), (torch.randn(1, 3, 8, 8),)
    gm, record = run_pass(model, x, budget=RewriteBudget(limit=1))
    assert record.rewrites == 1 and count_op(gm, "batch_norm") == 2
    assert_same_outputs(gm, model, x)


# --------------------------------------------------------------------------- generated models


test_sound_on_generated_models = graphopt.testing.property_test(
    PASS,
    min_fired=10,
    ops=["conv1d", "conv2d", "conv_transpose2d", "linear", "batch_norm", "relu", "relu6", "hardtanh", "silu",
         "add", "cat", "mean", "flatten"],
)
