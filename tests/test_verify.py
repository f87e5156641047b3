"""Tests of graphopt.verify: tolerance rule, non-finite values, inputs, running, localization."""
from __future__ import annotations

import copy
import inspect
import json
import math
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt import verify
from graphopt.errors import InputError, ModelRunError, OptionError
from graphopt.ir.graph import copy_provenance, source_line


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


class Chain(nn.Module):
    """x -> linear -> *2 -> relu -> +1 -> sigmoid: a graph with a middle to break."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)
        z = y * 2.0
        r = torch.relu(z)
        s = r + 1.0
        return torch.sigmoid(s)


# Source snippet of each Chain node, to record the user's line the way capture does.
CHAIN_SOURCE = {"linear": "functional.linear", "mul": "y * 2.0", "relu": "torch.relu(z)",
                "add": "r + 1.0", "sigmoid": "torch.sigmoid(s)"}


def line_of(source: str) -> str:
    """``file:line`` of the line of Chain.forward containing ``source``."""
    lines, first = inspect.getsourcelines(Chain.forward)
    offset = next(i for i, text in enumerate(lines) if source in text)
    return f"{inspect.getsourcefile(Chain)}:{first + offset}"


def traced_chain() -> fx.GraphModule:
    """Chain traced, with provenance and stack trace set as capture sets them."""
    gm = fx.symbolic_trace(Chain())
    for node in gm.graph.nodes:
        node.meta["provenance"] = f"chain.{node.name}"
        if node.name in CHAIN_SOURCE:
            file, line = line_of(CHAIN_SOURCE[node.name]).rsplit(":", 1)
            node.meta["stack_trace"] = f'File "{file}", line {line}, in forward\n    ...'
    return gm


def replace_node(gm: fx.GraphModule, name: str, target) -> str:
    """Replace node ``name`` by a call of ``target``, keeping provenance; returns the new name."""
    old = next(n for n in gm.graph.nodes if n.name == name)
    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(target, old.args)
    copy_provenance(new, old)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    gm.recompile()
    return new.name


X = (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)


class TestTolerance:
    def test_defaults_per_dtype_are_documented_values(self):
        assert verify.Tolerance.for_dtype(torch.float64) == verify.Tolerance(rtol=1e-10, atol=1e-12)
        assert verify.Tolerance.for_dtype(torch.float32) == verify.Tolerance(rtol=1e-4, atol=1e-6)
        assert verify.Tolerance.for_dtype(torch.float16) == verify.Tolerance(rtol=1e-2, atol=1e-3)
        assert verify.Tolerance.for_dtype(torch.bfloat16) == verify.Tolerance(rtol=5e-2, atol=1e-2)
        assert verify.Tolerance.for_dtype(torch.complex64) == verify.Tolerance.for_dtype(torch.float32)

    def test_integer_and_bool_are_exact(self):
        assert verify.Tolerance.for_dtype(torch.int64) == verify.Tolerance(rtol=0.0, atol=0.0)
        assert verify.Tolerance.for_dtype(torch.bool) == verify.Tolerance(rtol=0.0, atol=0.0)

    def test_invalid_values_are_refused(self):
        with pytest.raises(OptionError, match="rtol"):
            verify.Tolerance(rtol=-1.0, atol=0.0)
        with pytest.raises(OptionError, match="atol"):
            verify.Tolerance(rtol=0.0, atol=float("nan"))

    def test_float8_has_no_default(self):
        with pytest.raises(OptionError, match="pass tolerance"):
            verify.Tolerance.for_dtype(torch.float8_e4m3fn)

    def test_infinite_tolerance_accepts_anything_finite_even_on_zero_outputs(self):
        tol = verify.Tolerance(rtol=math.inf, atol=math.inf)
        verdict = verify.compare_outputs([[torch.zeros(3)]], [[torch.ones(3) * 1e9]], tol)
        assert verdict.ok


class TestScaleAwareTolerance:
    def test_large_outputs_with_small_relative_error_pass(self):
        ref = torch.linspace(-1e6, 1e6, 101)
        out = ref.double() * (1 + 2e-7)  # abs error 0.2, far above atol, but 2e-7 of the scale
        verdict = verify.compare_outputs([[ref]], [[out]])
        assert verdict.ok
        assert verdict.max_abs == pytest.approx(0.2, rel=1e-2)
        assert verdict.max_rel == pytest.approx(2e-7, rel=1e-2)

    def test_large_outputs_with_relative_error_above_rtol_fail(self):
        ref = torch.linspace(-1e6, 1e6, 101)
        verdict = verify.compare_outputs([[ref]], [[ref * (1 + 1e-3)]])
        assert not verdict.ok
        assert "beyond tolerance" in verdict.reason
        assert verdict.outputs[0].max_rel == pytest.approx(1e-3, rel=1e-2)

    def test_all_zero_output_is_judged_by_atol(self):
        zeros = torch.zeros(10)
        assert verify.compare_outputs([[zeros]], [[zeros + 5e-7]]).ok
        verdict = verify.compare_outputs([[zeros]], [[zeros + 5e-6]])
        assert not verdict.ok
        assert verdict.max_rel == math.inf
        assert verdict.outputs[0].sqnr_db == -math.inf

    def test_float64_reference_uses_float64_default(self):
        ref = torch.randn(50, dtype=torch.float64)
        assert not verify.compare_outputs([[ref]], [[ref + 1e-7]]).ok
        assert verify.compare_outputs([[ref]], [[ref.float()]]).ok is False  # fp32 rounding ~1e-8 >> 1e-10
        assert verify.compare_outputs([[ref]], [[ref.float()]], verify.Tolerance(rtol=1e-6, atol=0)).ok

    def test_integer_outputs_must_match_exactly(self):
        ref = torch.tensor([1, 2, 3])
        assert verify.compare_outputs([[ref]], [[ref.clone()]]).ok
        verdict = verify.compare_outputs([[ref]], [[torch.tensor([1, 2, 4])]])
        assert not verdict.ok and verdict.max_abs == 1.0


class TestNonFinite:
    def test_nan_in_same_positions_is_equal(self):
        ref = torch.tensor([1.0, float("nan"), 3.0])
        verdict = verify.compare_outputs([[ref]], [[ref.clone()]])
        assert verdict.ok
        assert verdict.outputs[0].nan_mismatch is False

    def test_nan_where_reference_is_finite_is_a_nan_mismatch(self):
        ref = torch.tensor([1.0, 2.0, 3.0])
        verdict = verify.compare_outputs([[ref]], [[torch.tensor([1.0, float("nan"), 3.0])]])
        assert not verdict.ok
        assert verdict.outputs[0].nan_mismatch
        assert "NaN at 1 position(s) where the reference is not NaN" in verdict.reason
        assert verdict.max_abs == math.inf and verdict.min_sqnr_db == -math.inf

    def test_finite_where_reference_is_nan_is_a_nan_mismatch(self):
        ref = torch.tensor([float("nan"), 2.0])
        verdict = verify.compare_outputs([[ref]], [[torch.tensor([0.0, 2.0])]])
        assert not verdict.ok and verdict.outputs[0].nan_mismatch
        assert "no NaN at 1 position(s) where the reference is NaN" in verdict.reason

    def test_inf_with_same_sign_and_position_is_equal(self):
        ref = torch.tensor([float("inf"), -float("inf"), 1.0])
        verdict = verify.compare_outputs([[ref]], [[ref.clone()]])
        assert verdict.ok
        assert verdict.outputs[0].max_abs == 0.0  # inf does not leak into the scale

    def test_inf_with_other_sign_is_an_inf_mismatch(self):
        ref = torch.tensor([float("inf"), 1.0])
        verdict = verify.compare_outputs([[ref]], [[torch.tensor([-float("inf"), 1.0])]])
        assert not verdict.ok
        assert verdict.outputs[0].inf_mismatch and not verdict.outputs[0].nan_mismatch
        assert "inf at 1 position(s)" in verdict.reason

    def test_inf_against_a_large_finite_value_is_a_mismatch(self):
        ref = torch.tensor([float("inf"), 1.0])
        verdict = verify.compare_outputs([[ref]], [[torch.tensor([3e38, 1.0])]], verify.Tolerance(math.inf, math.inf))
        assert not verdict.ok and verdict.outputs[0].inf_mismatch

    def test_sqnr_db_ignores_matching_non_finite_and_fails_on_others(self):
        ref = torch.tensor([float("nan"), float("inf"), 10.0])
        assert verify.sqnr_db(ref, ref.clone()) == math.inf
        assert verify.sqnr_db(ref, torch.tensor([float("nan"), float("inf"), 11.0])) == pytest.approx(20.0)
        assert verify.sqnr_db(ref, torch.tensor([1.0, float("inf"), 10.0])) == -math.inf


class TestSqnr:
    def test_known_value(self):
        ref = torch.ones(100)
        assert verify.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)

    def test_equal_is_infinite_and_accepts_numpy(self):
        ref = np.arange(5, dtype=np.float32)
        assert verify.sqnr_db(ref, ref.copy()) == math.inf

    def test_shape_mismatch_is_an_input_error(self):
        with pytest.raises(InputError, match="shapes differ"):
            verify.sqnr_db(torch.ones(2), torch.ones(3))


class TestStructuralMismatch:
    def test_shape_mismatch_is_reported(self):
        verdict = verify.compare_outputs([[torch.ones(1, 10)]], [[torch.ones(1, 5)]])
        assert not verdict.ok
        assert verdict.outputs[0].shape_ok is False
        assert "shape (1, 5) where the reference has (1, 10)" in verdict.reason

    def test_dtype_kind_mismatch_is_reported(self):
        verdict = verify.compare_outputs([[torch.ones(3)]], [[torch.ones(3, dtype=torch.int32)]])
        assert not verdict.ok
        assert "torch.int32 (integer) where the reference has torch.float32 (floating)" in verdict.reason

    def test_same_kind_other_precision_is_compared_on_the_reference_scale(self):
        ref = torch.randn(20)
        assert verify.compare_outputs([[ref]], [[ref.double()]]).ok

    def test_output_count_mismatch_is_reported(self):
        verdict = verify.compare_outputs([[torch.ones(2), torch.ones(2)]], [[torch.ones(2)]])
        assert not verdict.ok
        assert "the reference returned 2 output(s), the candidate 1" in verdict.reason

    def test_mismatched_input_lists_are_an_input_error(self):
        with pytest.raises(InputError, match="one list of outputs per input"):
            verify.compare_outputs([[torch.ones(1)], [torch.ones(1)]], [[torch.ones(1)]])

    def test_reason_names_the_first_failing_input_and_counts_the_rest(self):
        ref = [[torch.ones(2)], [torch.ones(2)], [torch.ones(2)]]
        out = [[torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)]]
        verdict = verify.compare_outputs(ref, out, input_labels=["example", "a", "b"])
        assert verdict.failed_input == 1
        assert verdict.reason.startswith("output 0 on input 1 (a) differs beyond tolerance")
        assert "and 1 more" in verdict.reason


class TestCompare:
    def test_equal_modules_are_ok(self):
        model = small_mlp()
        verdict = verify.compare(model, copy.deepcopy(model), X)
        assert verdict.ok and verdict.reason is None
        assert verdict.inputs_checked == 5
        assert verdict.max_abs == 0.0 and verdict.min_sqnr_db == math.inf
        assert str(verdict).startswith("ok: 5 input(s) x 1 output(s)")
        json.dumps(verdict.to_dict(), allow_nan=False)

    def test_perturbed_weight_is_detected_with_figures(self):
        model = small_mlp()
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            perturbed[2].weight[0, 0] += 0.05
        verdict = verify.compare(model, perturbed, X)
        assert not verdict.ok
        figures = verdict.outputs[0]
        assert not figures.ok and figures.shape_ok and figures.dtype == "torch.float32"
        assert 0 < figures.max_abs < 10 and 0 < figures.max_rel < 1
        assert 0 < figures.sqnr_db < 80
        assert verdict.failed_input == 0
        assert "output 0 on input 0 (example) differs beyond tolerance" in verdict.reason
        data = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
        assert data["ok"] is False and data["outputs"][0]["max_abs"] == figures.max_abs
        assert str(verdict).startswith("MISMATCH: output 0")

    def test_graph_modules_scripted_modules_and_callables_compare(self):
        model = small_mlp()
        traced = fx.symbolic_trace(model)
        assert verify.compare(model, traced, X).ok
        assert verify.compare(traced, torch.jit.script(model), X, synthesize=1).ok
        assert verify.compare(model, lambda x: (model(x) * 1.0,), X, synthesize=1).ok

    def test_numpy_returning_callable_is_compared(self):
        model = small_mlp()
        assert verify.compare(model, lambda x: model(x).numpy(), X).ok
        verdict = verify.compare(model, lambda x: model(x).numpy() + np.float32(0.01), X)
        assert not verdict.ok and verdict.max_abs == pytest.approx(0.01, rel=1e-3)

    def test_onnx_runtime_session_is_compared(self):
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        verdict = verify.compare(torch.relu, lambda x: session.run(None, {"x": x.numpy()}), X)
        assert verdict.ok and verdict.inputs_checked == 5

    def test_raising_candidate_gives_a_failed_verdict_not_an_exception(self):
        def broken(x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        verdict = verify.compare(small_mlp(), broken, X)
        assert not verdict.ok
        assert "the candidate failed on input 0 (example)" in verdict.reason
        assert "mat1 and mat2 shapes cannot be multiplied" in verdict.reason

    def test_candidate_failing_only_on_a_synthesized_input_is_named(self):
        model = small_mlp()

        def fails_on_large(x):
            if x.abs().max() > 50:
                raise ValueError("overflow")
            return model(x)

        verdict = verify.compare(model, fails_on_large, X)
        assert not verdict.ok and verdict.failed_input == 2
        assert "input 2 (synthesized #1 (large)): " in verdict.reason and "overflow" in verdict.reason

    def test_raising_reference_gives_a_failed_verdict(self):
        verdict = verify.compare(lambda x: x[10], small_mlp(), X, synthesize=0)
        assert not verdict.ok and "the reference failed on input 0" in verdict.reason

    def test_wrong_number_of_inputs_is_an_input_error(self):
        with pytest.raises(InputError, match="takes 2 input"):
            verify.compare(lambda x, y: x + y, lambda x, y: x + y, X)
        with pytest.raises(InputError, match="candidate"):
            verify.compare(lambda x: x, lambda x, y: x, X)
        with pytest.raises(InputError, match="reference"):
            verify.compare(torch.jit.script(small_mlp()), small_mlp(), (X[0], X[0]))


class TestRun:
    def test_nested_outputs_are_flattened_in_order(self):
        a, b, c = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
        outs = verify.run(lambda x: {"first": (a, [b]), "none": None, "last": c, "n": 3}, X)
        assert [o.shape for o in outs] == [(1,), (2,), (3,), ()]
        assert outs[3].item() == 3

    def test_models_writing_into_their_inputs_do_not_affect_each_other(self):
        def in_place(x):
            return x.add_(1)

        example = X[0].clone()
        assert verify.compare(in_place, lambda x: x + 1, (example,)).ok
        assert torch.equal(example, X[0])

    def test_runs_without_grad(self):
        (out,) = verify.run(small_mlp(), X)
        assert not out.requires_grad

    def test_unsupported_output_type_is_a_run_error(self):
        with pytest.raises(ModelRunError, match=r"output\[1\] is a str"):
            verify.run(lambda x: (x, "label"), X)

    def test_raising_model_is_a_run_error_with_the_message(self):
        with pytest.raises(ModelRunError, match="ValueError: bad input") as info:
            verify.run(lambda x: (_ for _ in ()).throw(ValueError("bad input")), X)
        assert isinstance(info.value.__cause__, ValueError)


class TestSynthesizeInputs:
    def test_same_seed_same_inputs_other_seed_other_inputs(self):
        first = verify.synthesize_inputs(X, count=4, seed=3)
        again = verify.synthesize_inputs(X, count=4, seed=3)
        other = verify.synthesize_inputs(X, count=4, seed=4)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
        assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other) if a[0].abs().sum() > 0)

    def test_inputs_do_not_depend_on_count(self):
        short = verify.synthesize_inputs(X, count=2)
        long = verify.synthesize_inputs(X, count=6)
        assert len(long) == 6
        assert all(torch.equal(a[0], b[0]) for a, b in zip(short, long))

    def test_shapes_dtypes_and_memory_format_are_kept(self):
        example = (
            torch.randn(1, 3, 4, 4).to(memory_format=torch.channels_last),
            torch.randn(2, 3, dtype=torch.float16),
            torch.randn(2, dtype=torch.bfloat16),
            torch.randn(2, dtype=torch.float64),
        )
        for inputs in verify.synthesize_inputs(example, count=5):
            for new, old in zip(inputs, example):
                assert new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
            assert inputs[0].is_contiguous(memory_format=torch.channels_last)
            assert all(torch.isfinite(t).all() for t in inputs)

    def test_distributions_follow_the_documented_order(self):
        example = (torch.rand(64, 64) * 4 + 2,)  # values in [2, 6)
        uniform, large, small, edge, normal = (t[0] for t in verify.synthesize_inputs(example, count=5))
        assert verify.DISTRIBUTIONS == ("uniform", "large", "small", "edge", "normal")
        assert uniform.min() >= example[0].min() and uniform.max() <= example[0].max()
        assert abs(uniform.mean() - example[0].mean()) < 0.05 and abs(uniform.std() / example[0].std() - 1) < 0.05
        assert 80 < large.std() < 120
        assert 0.8e-3 < small.std() < 1.2e-3
        assert set(edge.unique().tolist()) == {-1.0, 0.0, 1.0}
        assert 0.9 < normal.std() < 1.1

    def test_uniform_keeps_a_normal_examples_spread(self):
        """A randn example's [min, max] is about +-4.5 sigma: drawing over all of it would be a
        saturation test (it failed int8 ResNet-18's budget), not in-distribution data."""
        example = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)),)
        (uniform,) = verify.synthesize_inputs(example, count=1)[0]
        assert 0.95 < uniform.std() < 1.05 and uniform.abs().max() < 1.75

    def test_large_values_stay_in_float16_range(self):
        (large,) = verify.synthesize_inputs((torch.zeros(1000, dtype=torch.float16),), count=2)[1]
        assert torch.isfinite(large).all() and 8 < large.float().std() < 12

    def test_integer_inputs_stay_in_the_example_range_and_bools_are_kept(self):
        tokens = torch.tensor([[3, 7, 5, 9]])
        mask = torch.tensor([[True, False, True, True]])
        for ids, m, scale in verify.synthesize_inputs((tokens, mask, 2.5), count=5):
            assert ids.dtype == torch.int64 and 3 <= ids.min() and ids.max() <= 9
            assert torch.equal(m, mask) and scale == 2.5
        edge_ids = verify.synthesize_inputs((torch.arange(3, 100),), count=4)[3][0]
        assert set(edge_ids.unique().tolist()) <= {3, 99}

    def test_verification_inputs_start_with_the_example(self):
        inputs = verify.verification_inputs(X[0], synthesize=3)
        assert len(inputs) == 4 and inputs[0][0] is X[0]
        assert verify.input_labels(3) == ["example", "synthesized #0 (uniform)", "synthesized #1 (large)"]

    def test_invalid_count_is_an_input_error(self):
        with pytest.raises(InputError, match="count"):
            verify.synthesize_inputs(X, count=-1)


class TestLocalize:
    def test_finds_the_replaced_middle_node(self):
        reference = traced_chain()
        candidate = copy.deepcopy(reference)
        new_name = replace_node(candidate, "relu", torch.tanh)  # relu(z) -> tanh(z)
        new_node = next(n for n in candidate.graph.nodes if n.name == new_name)

        verdict = verify.compare(reference, candidate, X)
        assert not verdict.ok
        div = verdict.divergence
        assert div is not None and div.node == new_name and div.reference_node == "relu"
        assert div.provenance == "chain.relu" and div.op == "tanh"
        assert div.source_line == source_line(new_node) == line_of("torch.relu(z)")
        assert div.max_abs > 0.01
        assert new_name in str(verdict)

        direct = verify.localize(reference, candidate, X, verify.Tolerance.for_dtype(torch.float32))
        assert direct is not None and direct.node == new_name

    def test_fused_node_carrying_an_intermediate_provenance_is_not_blamed(self):
        reference = traced_chain()
        candidate = copy.deepcopy(reference)
        # "fuse" the *2 into the linear: the linear keeps its provenance but now holds mul's value
        linear = next(n for n in candidate.graph.nodes if n.name == "linear")
        mul = next(n for n in candidate.graph.nodes if n.name == "mul")
        with candidate.graph.inserting_before(linear):
            w2 = candidate.graph.call_function(operator.mul, (linear.args[1], 2.0))
            b2 = candidate.graph.call_function(operator.mul, (linear.args[2], 2.0))
        linear.args = (linear.args[0], w2, b2)
        mul.replace_all_uses_with(linear)
        candidate.graph.erase_node(mul)
        candidate.recompile()
        assert verify.compare(reference, candidate, X).ok

        broken_name = replace_node(candidate, "add", operator.sub)  # r + 1 -> r - 1
        div = verify.localize(reference, candidate, X)
        assert div is not None and div.node == broken_name and div.provenance == "chain.add"

    def test_raising_candidate_node_is_the_divergence(self):
        reference = traced_chain()
        candidate = copy.deepcopy(reference)

        def explode(x, y):
            raise RuntimeError("kernel not implemented")

        name = replace_node(candidate, "add", explode)
        verdict = verify.compare(reference, candidate, X)
        assert not verdict.ok and "kernel not implemented" in verdict.reason
        assert verdict.divergence is not None and verdict.divergence.node == name
        assert "raised RuntimeError: kernel not implemented" in verdict.divergence.message

    def test_unmatchable_graphs_say_so(self):
        reference = traced_chain()
        candidate = fx.symbolic_trace(lambda x: torch.sigmoid(x * 3.0))
        for node in candidate.graph.nodes:
            node.meta["provenance"] = f"other.{node.name}"
        verdict = verify.compare(reference, candidate, X)
        assert not verdict.ok and verdict.divergence is None
        assert "cannot be matched" in verdict.localization_note
        assert "not localized" in verdict.reason
        assert "not localized" in str(verdict)

    def test_localize_requires_graph_modules(self):
        with pytest.raises(InputError, match="GraphModule"):
            verify.localize(Chain(), traced_chain(), X)
