"""The ops around convs in int8 graphs (interpolate, pools, hardswish, sigmoid, SiLU, cat and
add with requantization) lowered to ONNX Runtime and the lite interpreter: int8 where the
runtime has a kernel, float between dequantize and quantize (and said so) where it has none,
verified within the tolerance derived from the graph's quantization steps.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import LoweringError
from graphopt.lowering import get_backend
from graphopt.quantization import kernels, lowering_tolerance, qdq
from graphopt.quantization.error_bounds import assumed_ops, output_error_bounds
from graphopt.verify import Tolerance
from test_int8_lowering import mobile_int8, optimized_op_counts, verified_atol

BACKENDS = ["onnx", "torchscript-mobile"]
X = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn)


class Around(nn.Module):
    """conv-bn -> op -> 1x1 conv: the op between two int8 convs."""

    def __init__(self, op):
        super().__init__()
        self.first, self.op, self.last = conv_bn(3, 8), op, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.last(self.op(self.first(x)))


#: name -> (op, ORT op that runs it in int8 or None, float op types ORT reports otherwise,
#: runs on integers in the lite interpreter)
OPS = {
    "hardswish": (F.hardswish, None, {"HardSigmoid", "Mul"}, True),
    "silu": (F.silu, None, {"Sigmoid", "Mul"}, False),
    "sigmoid": (torch.sigmoid, "QLinearSigmoid", set(), True),
    "hardsigmoid": (F.hardsigmoid, None, {"HardSigmoid"}, True),
    "nearest_x2": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), "Resize", set(), True),
    "nearest_x1.5": (lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest"), "Resize", set(), True),
    "bilinear_x2": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), None, {"Resize"}, True),
    "bilinear_size": (lambda x: F.interpolate(x, size=(20, 20), mode="bilinear"), None, {"Resize"}, True),
    "avg_pool_stride_none": (lambda x: F.avg_pool2d(x, 2), "QLinearAveragePool", set(), True),
    "max_pool": (lambda x: F.max_pool2d(x, 3, 2, 1), None, set(), True),
    "adaptive_avg_pool": (lambda x: F.adaptive_avg_pool2d(x, 2), "QLinearAveragePool", set(), True),
    "global_avg_pool": (lambda x: F.adaptive_avg_pool2d(x, 1), "QLinearGlobalAveragePool", set(), True),
}


@pytest.fixture(scope="module")
def int8_around():
    graphs = {}

    def get(name: str) -> fx.GraphModule:
        if name not in graphs:
            torch.manual_seed(0)
            graphs[name] = mobile_int8(Around(OPS[name][0]).eval(), X)
        return graphs[name]

    return get


def steps_off(artifact: graphopt.Artifact, gm: fx.GraphModule) -> float:
    """Largest difference from the int8 graph on the example, in units of the verified atol."""
    with torch.no_grad():
        want = gm(*X)
    got = torch.as_tensor(np.asarray(artifact.run(*X)))
    return float((got - want).abs().max()) / verified_atol(artifact)


class TestOpsAroundConvs:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("name", list(OPS))
    def test_op_lowers_and_matches_the_int8_graph_within_the_derived_tolerance(self, int8_around, name, backend,
                                                                               tmp_path):
        gm = int8_around(name)
        artifact = graphopt.lower(gm, X, backend=backend, path=tmp_path / f"m.{'onnx' if backend == 'onnx' else 'ptl'}")
        assert artifact.verdict.ok
        assert verified_atol(artifact) == pytest.approx(lowering_tolerance(gm).atol)
        assert steps_off(artifact, gm) <= 1.0

    @pytest.mark.parametrize("name", list(OPS))
    def test_onnx_runtime_runs_the_op_in_int8_or_reports_it_float(self, int8_around, name, tmp_path):
        _, int8_op, float_ops, _ = OPS[name]
        artifact = graphopt.lower(int8_around(name), X, backend="onnx", path=tmp_path / "m.onnx")
        ops = optimized_op_counts(artifact.path)
        assert ops["QLinearConv"] == 2 and "Conv" not in ops
        if int8_op is not None:
            assert ops[int8_op] == 1
        reported = artifact.report["float_between_qdq"]
        assert set(reported) == float_ops
        if float_ops:
            assert any("no int8 kernel" in note and all(op in note for op in float_ops)
                       for note in artifact.report["notes"])
            assert ops["DequantizeLinear"] > 1  # the pair around the float op stays
        else:
            assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1  # only at the graph's edges

    @pytest.mark.parametrize("name", list(OPS))
    def test_lite_interpreter_runs_the_op_on_integers_or_reports_it_float(self, int8_around, name, tmp_path):
        on_integers = OPS[name][3]
        artifact = graphopt.lower(int8_around(name), X, backend="torchscript-mobile", path=tmp_path / "m.ptl")
        layers, floats = artifact.report["int8_layers"], artifact.report["float_between_qdq"]
        assert sum("Conv2d" in layer for layer in layers) == 2
        if on_integers:
            assert floats == []
            assert artifact.report["op_counts"].get("aten::dequantize", 0) == 1  # the output only
        else:
            assert len(floats) == 1 and any("no int8 kernel" in note for note in artifact.report["notes"])
        if name == "hardswish":
            assert any(layer.endswith("quantized::hardswish") for layer in layers)


class Branches(nn.Module):
    """Two branches ten times apart in range, joined by cat and by add (requantizing both), then
    added and read by a conv (an add no int8 op reads stays float: see placement)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(3, 8)
        self.after_cat, self.after_add, self.head = nn.Conv2d(16, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.a(x), 10 * self.b(x)
        return self.head(self.after_cat(torch.cat([a, b], 1)) + self.after_add(a + b))


@pytest.fixture(scope="module")
def branches_int8() -> fx.GraphModule:
    torch.manual_seed(0)
    return mobile_int8(Branches().eval(), X)


class TestRequantization:
    def test_inputs_of_cat_and_add_keep_their_own_scales(self, branches_int8):
        gm = branches_int8
        (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
        scales = {qdq.tensor_qparams(t).scale for t in cat.args[0]}
        assert len(scales) == 2 and max(scales) > 5 * min(scales)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_cat_and_add_requantize_in_int8(self, branches_int8, backend, tmp_path):
        gm = branches_int8
        artifact = graphopt.lower(gm, X, backend=backend, path=tmp_path / f"m.{'onnx' if backend == 'onnx' else 'ptl'}")
        assert artifact.verdict.ok and steps_off(artifact, gm) <= 1.0
        if backend == "onnx":
            ops = optimized_op_counts(artifact.path)
            assert ops["QLinearConcat"] == 1 and ops["QLinearAdd"] == 2 and "Concat" not in ops
        else:
            counts = artifact.report["op_counts"]
            assert counts["quantized::cat"] == 1 and counts["quantized::add"] == 2


# ------------------------------------------------------------------ mobilenet-like regressions


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: nn.Module):
        super().__init__()
        self.reduce, self.expand, self.gate = nn.Conv2d(channels, channels // 2, 1), nn.Conv2d(channels // 2, channels, 1), gate

    def forward(self, x):
        return x * self.gate(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, act: type[nn.Module], se: nn.Module | None = None):
        super().__init__()
        self.expand, self.act1 = conv_bn(channels, 2 * channels, 1), act()
        self.depthwise, self.act2 = conv_bn(2 * channels, 2 * channels, 3, groups=2 * channels), act()
        self.se = se or nn.Identity()
        self.project = conv_bn(2 * channels, channels, 1)

    def forward(self, x):
        return x + self.project(self.se(self.act2(self.depthwise(self.act1(self.expand(x))))))


class MobileNetLike(nn.Module):
    """v2: relu6 blocks, linear classifier; v3: hardswish, SE with hardsigmoid, a conv head
    with hardswish after the global pool and a classifier that stays float."""

    def __init__(self, version: int):
        super().__init__()
        act = nn.Hardswish if version == 3 else nn.ReLU6
        self.stem = nn.Sequential(conv_bn(3, 8, stride=2), act())
        self.blocks = nn.Sequential(*[
            InvertedResidual(8, act, SqueezeExcite(16, nn.Hardsigmoid()) if version == 3 else None) for _ in range(3)
        ])
        self.head = nn.Conv2d(8, 32, 1) if version == 3 else nn.Identity()
        self.head_act = nn.Hardswish() if version == 3 else nn.Identity()
        self.classifier = nn.Linear(32 if version == 3 else 8, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.classifier(torch.flatten(self.head_act(self.head(x)), 1))


def mobilenet_int8(version: int) -> fx.GraphModule:
    torch.manual_seed(0)
    model = MobileNetLike(version).eval()
    if version == 2:
        return mobile_int8(model, X)
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(X[0].shape, generator=generator),) for _ in range(3)]
    return graphopt.optimize(model, X, "mobile-int8", calibration_data=calibration,
                             options={"quantize": {"skip": ["classifier"]}}).module


class TestDerivedTolerance:
    def test_a_float_head_after_an_int8_body_gets_the_steps_that_reach_it(self):
        gm = mobilenet_int8(3)
        assert kernels.output_steps(gm) == [None]  # the output is not a dequantize: float32's 1e-6 before
        (bound,) = output_error_bounds(gm)
        assert bound > 0 and assumed_ops(gm) == []
        assert lowering_tolerance(gm).atol == pytest.approx(kernels.PATH_SPREAD * bound)

    @pytest.mark.parametrize("version", [2, 3])
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_mobilenet_like_int8_graphs_lower(self, version, backend, tmp_path):
        gm = mobilenet_int8(version)
        artifact = graphopt.lower(gm, X, backend=backend, path=tmp_path / f"m.{'onnx' if backend == 'onnx' else 'ptl'}")
        assert artifact.verdict.ok
        assert verified_atol(artifact) == pytest.approx(lowering_tolerance(gm).atol)

    def test_deeper_paths_allow_more_than_the_last_steps(self):
        gm = mobilenet_int8(2)
        (step,) = kernels.output_steps(gm)
        assert lowering_tolerance(gm).atol > kernels.LOWERING_STEPS * step

    def test_float_graph_has_no_int8_tolerance(self):
        assert lowering_tolerance(fx.symbolic_trace(MobileNetLike(2).eval())) is None

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_a_wrong_scale_in_the_file_is_refused(self, backend, monkeypatch, tmp_path):
        gm = mobilenet_int8(3)
        wrong = copy.deepcopy(gm)
        # the head conv's int8 weights read with scales 1.5x too large
        head = [n for n in wrong.graph.nodes if qdq.is_weight_dequantize(n)][-1]
        scales = head.args[1]
        setattr(wrong, scales.target, getattr(wrong, scales.target) * 1.5)
        wrong.recompile()
        backend_cls = get_backend(backend)
        export = backend_cls.export
        monkeypatch.setattr(backend_cls, "export", lambda self, g, *rest: export(self, wrong, *rest))
        with pytest.raises(LoweringError, match="gives different results from the graph"):
            graphopt.lower(gm, X, backend=backend, path=tmp_path / f"m.{'onnx' if backend == 'onnx' else 'ptl'}")

    def test_an_explicit_tolerance_still_wins(self, tmp_path):
        gm = mobilenet_int8(3)
        artifact = graphopt.lower(gm, X, backend="onnx", path=tmp_path / "m.onnx", tolerance=Tolerance(0.0, 0.5))
        assert verified_atol(artifact) == 0.5


class TestScriptFailure:
    def test_the_lowering_error_keeps_the_real_cause_of_a_script_failure(self, int8_around, monkeypatch, tmp_path):
        from graphopt.backends import _quantized_torchscript

        # as before pools' stride=None was written as the kernel size: TorchScript refuses None
        monkeypatch.setattr(_quantized_torchscript, "_scriptable", lambda key, args, kwargs, offset=0: (args, kwargs))
        with pytest.raises(LoweringError) as caught:
            graphopt.lower(int8_around("avg_pool_stride_none"), X, backend="torchscript-mobile", path=tmp_path / "m.ptl")
        message = str(caught.value)
        assert "torch.jit.script failed" in message
        assert "Expected a value of type 'List[int]' for argument 'stride' but instead found type 'NoneType'" in message
        assert "at: avg_pool2d" in message
        causes = []
        error: BaseException | None = caught.value
        while error is not None:
            causes.append(error)
            error = error.__cause__
        assert isinstance(causes[-1], RuntimeError) and "Arguments for call are not valid" in str(causes[-1])
