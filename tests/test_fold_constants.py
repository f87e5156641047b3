"""fold-constants: constant subgraphs become buffers or literals, and nothing else does.

Positive cases assert the rewrite count, what the graph holds afterwards and equal outputs.
Negative cases (HARD-CASES B) assert that random, mutated, opaque, oversized and dynamic-shape
values are left alone and that the reason is reported.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import graphopt.passes.eliminate_dead_code  # noqa: F401  (registers the pass)
import graphopt.passes.fold_constants  # noqa: F401  (registers the pass)
from graphopt.capture import capture
from graphopt.ir.graph import param_bytes
from graphopt.pipeline.passes import RewriteBudget

PASS = "fold-constants"


# --------------------------------------------------------------------------- helpers


def fold(model: nn.Module | fx.GraphModule, inputs: tuple, *, then_dce: bool = False, verify: str = "each",
         budget: RewriteBudget | None = None, dynamic_shapes="static", **options):
    """Capture ``model`` (static shapes unless asked: these tests fold shapes) and run
    fold-constants (then eliminate-dead-code if asked).

    Returns (graph module, fold-constants record)."""
    pipeline = [PASS, "eliminate-dead-code"] if then_dce else [PASS]
    manager = graphopt.PassManager(pipeline, verify=verify, on_failure="raise",
                                   options={PASS: options} if options else None)
    result = manager.run(model, inputs, budget=budget, dynamic_shapes=dynamic_shapes)
    return result.module, result.report.records[0]


def calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def declined(record) -> str:
    return " | ".join(f"{node}: {reason}" for node, reason in record.declines)


def folded_buffers(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: t for name, t in gm.named_buffers() if name.endswith("_folded") or "_folded_" in name}


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=t.is_floating_point())  # integer tensors cannot require grad


def params(**tensors: torch.Tensor) -> nn.Module:
    """A module holding ``tensors`` as parameters."""
    module = nn.Module()
    for name, t in tensors.items():
        setattr(module, name, as_parameter(t))
    return module


class Model(nn.Module):
    """``forward(self, x)`` given as a function; parameters and submodules given by keyword."""

    def __init__(self, forward, **members):
        super().__init__()
        self._forward = forward
        for name, value in members.items():
            setattr(self, name, value if isinstance(value, nn.Module) else as_parameter(value))

    def forward(self, x):
        return self._forward(self, x)


def affine_model() -> Model:
    torch.manual_seed(0)
    return Model(lambda m, x: F.linear(x, m.w.t()) * (m.scale * 2 + m.b),
                 w=torch.randn(4, 4), scale=torch.randn(4), b=torch.randn(4)).eval()


# --------------------------------------------------------------------------- positive cases


class TestConstantSubgraphsAreFolded:
    def test_transpose_and_affine_of_parameters_become_two_buffers(self):
        model = affine_model()
        x = torch.randn(3, 4)
        gm, record = fold(model, (x,))
        assert record.rewrites == 2
        assert sorted(folded_buffers(gm)) == ["scale_b_folded", "w_folded"]
        assert [n.name for n in calls(gm)] == ["linear", "mul_1"]
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

    def test_buffer_named_after_the_parameter_it_comes_from(self):
        block = params(scale=torch.randn(5))
        model = Model(lambda m, x: x * (m.blocks[0].scale * 2), blocks=nn.ModuleList([block])).eval()
        gm, record = fold(model, (torch.randn(2, 5),))
        assert record.rewrites == 1
        assert list(folded_buffers(gm)) == ["blocks_0_scale_folded"]

    def test_folded_values_are_buffers_that_do_not_require_grad(self):
        gm, _ = fold(affine_model(), (torch.randn(3, 4),))
        parameter_names = {name for name, _ in gm.named_parameters()}
        for name, tensor in folded_buffers(gm).items():
            assert name not in parameter_names
            assert not tensor.requires_grad

    @pytest.mark.parametrize("dtype", [torch.int64, torch.float16])
    def test_dtype_is_kept(self, dtype):
        model = Model(lambda m, x: (x.to(dtype) + m.c * 3).float(), c=torch.arange(6).to(dtype)).eval()
        gm, record = fold(model, (torch.ones(6),))
        assert record.rewrites == 1
        (buffer,) = folded_buffers(gm).values()
        assert buffer.dtype == dtype
        torch.testing.assert_close(gm(torch.ones(6)), model(torch.ones(6)), rtol=0, atol=0)

    def test_factory_of_literals_is_folded(self):
        graph = fx.Graph()  # symbolic tracing would run torch.arange itself; export keeps it
        x = graph.placeholder("x")
        arange = graph.call_function(torch.arange, (4,))
        graph.output(graph.call_function(operator.add, (x, graph.call_method("float", (arange,)))))
        gm, record = fold(fx.GraphModule(nn.Module(), graph), (torch.randn(4),))
        assert record.rewrites == 1 and not any(n.target is torch.arange for n in gm.graph.nodes)
        torch.testing.assert_close(gm(torch.zeros(4)), torch.arange(4.0))

    def test_second_run_folds_nothing(self):
        gm, _ = fold(affine_model(), (torch.randn(3, 4),))
        code = gm.code
        again, record = fold(gm, (torch.randn(3, 4),))
        assert record.rewrites == 0 and record.status == "unchanged"
        assert again.code == code

    def test_rewrite_budget_limits_the_folds(self):
        model = affine_model()
        x = torch.randn(3, 4)
        gm, record = fold(model, (x,), budget=RewriteBudget(limit=1))
        assert record.rewrites == 1 and len(folded_buffers(gm)) == 1
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class TestModelSizeAndStateDict:
    def test_fold_then_dead_code_keeps_the_byte_count(self):
        model = affine_model()
        gm, record = fold(model, (torch.randn(3, 4),), then_dce=True)
        # w (64 B) becomes w.t() (64 B); scale and b (32 B) become one 16 B buffer
        assert param_bytes(gm) == param_bytes(model) - 16
        assert record.figures["bytes_before"] == param_bytes(model)

    def test_state_dict_holds_folded_buffers_after_dead_code(self):
        gm, record = fold(affine_model(), (torch.randn(3, 4),), then_dce=True)
        assert sorted(gm.state_dict()) == ["scale_b_folded", "w_folded"]
        assert record.figures["folded_buffers"] == {"w_folded": ["w"], "scale_b_folded": ["scale", "b"]}
        assert any("no longer read" in note and "scale" in note for note in record.notes)

    def test_large_parameter_read_elsewhere_is_not_stored_twice(self):
        model = Model(lambda m, x: x @ m.w + x @ m.w.t(), w=torch.randn(160, 160)).eval()  # 100 KiB
        gm, record = fold(model, (torch.randn(2, 160),), then_dce=True)
        assert record.rewrites == 0
        assert "budget" in declined(record)
        assert param_bytes(gm) == param_bytes(model)

    def test_folding_reads_the_parameters_as_they_are_now(self):
        model = affine_model()
        x = torch.randn(3, 4)
        before, _ = fold(model, (x,))
        with torch.no_grad():
            model.scale.mul_(10)
        after, _ = fold(model, (x,))
        torch.testing.assert_close(after(x), model(x), rtol=0, atol=0)
        assert not torch.equal(before(x), model(x))  # the first result is a snapshot (documented)


class TestShapeArithmetic:
    def test_shape_arithmetic_becomes_python_ints(self):
        model = Model(lambda m, x: x.reshape(x.shape[0] * x.shape[1] * 2 // 2, x.size(2)))
        x = torch.randn(2, 3, 5)
        gm, record = fold(model, (x,))
        (reshape,) = [n for n in gm.graph.nodes if n.target == "reshape"]
        assert reshape.args[1:] == (6, 5)
        assert all(type(a) is int for a in reshape.args[1:])
        assert record.rewrites == 2
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

    def test_rank_and_dtype_queries_fold(self):
        model = Model(lambda m, x: x.flatten(x.dim() - 2).to(x.dtype))
        gm, record = fold(model, (torch.randn(2, 3, 4),))
        assert record.rewrites >= 1
        assert not any(n.target == "dim" for n in gm.graph.nodes)

    def test_dynamic_batch_keeps_the_batch_dim_symbolic(self):
        model = Model(lambda m, x: torch.relu(x).reshape(x.size(0), x.size(1) * x.size(2)))
        gm, record = fold(model, (torch.randn(2, 3, 4),), dynamic_shapes="batch")
        (reshape,) = [n for n in gm.graph.nodes if n.target == "reshape"]
        assert isinstance(reshape.args[1], fx.Node) and reshape.args[2] == 12
        assert [n.target for n in calls(gm)] == [torch.relu, "size", "reshape"]
        assert "dim 0 of x is dynamic" in declined(record)
        other_batch = torch.randn(5, 3, 4)
        torch.testing.assert_close(gm(other_batch), model(other_batch), rtol=0, atol=0)

    def test_dynamic_batch_keeps_shape_entries_of_the_batch_dim(self):
        model = Model(lambda m, x: x.reshape(x.shape[0], x.shape[1] * x.shape[2]))
        gm, record = fold(model, (torch.randn(2, 3, 4),), dynamic_shapes="batch")
        assert [n.target for n in calls(gm)] == [getattr, operator.getitem, "reshape"]
        torch.testing.assert_close(gm(torch.randn(5, 3, 4)).shape, torch.Size([5, 12]))

    def test_dynamic_dim_propagates_through_canonical_ops(self):
        model = Model(lambda m, x: torch.relu(x).reshape(torch.relu(x).shape[0], -1))
        gm, record = fold(model, (torch.randn(2, 3),), dynamic_shapes="batch")
        assert record.rewrites == 0
        torch.testing.assert_close(gm(torch.randn(7, 3)).shape, torch.Size([7, 3]))

    def test_shape_returned_by_the_graph_stays_a_torch_size(self):
        model = Model(lambda m, x: (x.view(x.size()) + 1, x.shape, x.size()[1:]))
        x = torch.randn(2, 3)
        gm, record = fold(model, (x,))
        (view,) = [n for n in gm.graph.nodes if n.target == "view"]
        assert view.args[1] == (2, 3)  # as a shape argument a tuple is as good as a torch.Size
        assert [type(o) for o in gm(x)[1:]] == [torch.Size, torch.Size]
        assert "plain tuple" in declined(record)

    def test_shape_of_a_tensor_reshaped_in_place_is_not_taken_from_metadata(self):
        def forward(m, x):
            y = x.clone()
            y.unsqueeze_(0)  # the recorded metadata of y (clone) still says (2, 3)
            return y.reshape(y.size(0), -1)

        model = Model(forward)
        x = torch.randn(2, 3)
        gm, record = fold(model, (x,))
        assert record.rewrites == 0
        assert "written in place" in declined(record)
        assert gm(x).shape == model(x).shape == (1, 6)

    def test_fold_shapes_false_keeps_every_shape_query(self):
        model = Model(lambda m, x: x.reshape(x.shape[0] * x.shape[1]))
        gm, record = fold(model, (torch.randn(2, 3),), fold_shapes=False)
        assert record.rewrites == 0


# --------------------------------------------------------------------------- negative cases


class TestRandomValuesAreNotFolded:
    @pytest.mark.parametrize(
        "forward",
        [
            lambda m, x: x + F.dropout(m.w, 0.5, training=True) * 2,
            lambda m, x: x + torch.dropout(m.w, 0.5, True) * 2,
            lambda m, x: x + m.drop(m.w) * 2,
            lambda m, x: x + torch.bernoulli(m.w * 0.5) * 2,
            lambda m, x: x + (m.w * 0.5).bernoulli() * 2,
        ],
        ids=["F.dropout", "torch.dropout", "nn.Dropout in training", "torch.bernoulli", "method bernoulli"],
    )
    def test_each_call_draws_a_new_sample_as_in_eager(self, forward):
        model = Model(forward, w=torch.ones(64), drop=nn.Dropout(0.5))
        x = torch.zeros(64)
        gm, record = fold(model, (x,), verify="none")
        assert "random" in declined(record)
        assert not torch.equal(gm(x), gm(x))
        assert not torch.equal(model(x), model(x))

    def test_constant_input_of_a_random_op_still_folds(self):
        model = Model(lambda m, x: x + torch.bernoulli(m.w * 0.5), w=torch.ones(64))
        gm, record = fold(model, (torch.zeros(64),), verify="none")
        assert record.rewrites == 1  # m.w * 0.5
        assert any(n.target is torch.bernoulli for n in gm.graph.nodes)


class TestMutatedValuesAreNotFolded:
    @pytest.mark.parametrize(
        "forward",
        [
            lambda m, x: (m.count.add_(1), x + m.count * 1)[1],
            lambda m, x: (m.count.view(1).add_(1), x + m.count * 1)[1],
        ],
        ids=["add_ on the buffer", "add_ on a view of the buffer"],
    )
    def test_three_calls_count_one_two_three_as_in_eager(self, forward):
        model = Model(forward)
        model.register_buffer("count", torch.zeros(1))
        x = torch.zeros(1)
        eager = [model(x).item() for _ in range(3)]
        model.count.zero_()
        gm, record = fold(model, (x,), verify="none")
        gm.get_buffer("count").zero_()  # capture and shape propagation ran the graph
        assert [gm(x).item() for _ in range(3)] == eager == [1.0, 2.0, 3.0]
        assert record.rewrites == 0
        assert "written in place" in declined(record)

    def test_tied_attribute_written_under_another_name(self):
        shared = torch.zeros(1)
        root = nn.Module()
        root.register_buffer("a", shared)
        root.register_buffer("b", shared)
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.call_method("add_", (graph.get_attr("a"), 1))
        b_times_one = graph.call_function(operator.mul, (graph.get_attr("b"), 1))
        graph.output(graph.call_function(operator.add, (x, b_times_one)))
        gm = fx.GraphModule(root, graph)
        folded, record = fold(gm, (torch.zeros(1),), verify="none")
        assert record.rewrites == 0
        assert [folded(torch.zeros(1)).item() for _ in range(2)] == [1.0, 2.0]

    def test_running_stats_updated_by_training_batch_norm_are_not_constant(self):
        root = nn.Module()
        root.register_buffer("mean", torch.zeros(3))
        root.register_buffer("var", torch.ones(3))
        graph = fx.Graph()
        x = graph.placeholder("x")
        mean, var = graph.get_attr("mean"), graph.get_attr("var")
        normalized = graph.call_function(F.batch_norm, (x, mean, var, None, None, True, 0.5, 1e-5))
        graph.output((normalized, graph.call_function(operator.mul, (mean, 2))))
        gm, record = fold(fx.GraphModule(root, graph), (torch.randn(4, 3) + 1,), verify="none")
        assert record.rewrites == 0
        first, second = gm(torch.ones(4, 3))[1], gm(torch.ones(4, 3))[1]
        assert not torch.equal(first, second)

    def test_value_seen_by_an_opaque_module_is_not_folded(self):
        class Scale(nn.Module):  # unknown to graphopt: may write what it is given
            def forward(self, t):
                return t * 3

        model = Model(lambda m, x: m.opaque(m.w) + x + m.w * 2, w=torch.ones(3), opaque=Scale())
        manager = graphopt.PassManager([PASS], on_failure="raise")
        result = manager.run(capture(model, (torch.zeros(3),), leaf_modules=(Scale,)), (torch.zeros(3),))
        assert result.report.records[0].rewrites == 0
        assert any(n.op == "call_module" for n in result.module.graph.nodes)


class TestOtherValuesAreNotFolded:
    def test_expand_to_two_thousand_squared_is_over_budget(self):
        model = Model(lambda m, x: x + m.w.expand(2000, 2000), w=torch.ones(1, 1))
        x = torch.zeros(1, 2000)
        gm, record = fold(model, (x,), verify="none")
        assert record.rewrites == 0
        assert "over the budget of 65536 bytes" in declined(record)
        assert param_bytes(gm) == 4
        torch.testing.assert_close(gm(x), model(x))

    def test_max_bytes_raises_the_budget(self):
        model = Model(lambda m, x: x + m.w.expand(300, 300), w=torch.ones(1, 1))
        gm, record = fold(model, (torch.zeros(1, 300),), max_bytes=300 * 300 * 4)
        assert record.rewrites == 1

    def test_quantize_dequantize_pair_is_kept(self):
        model = Model(lambda m, x: x + torch.dequantize(torch.quantize_per_tensor(m.w, 0.1, 0, torch.qint8)),
                      w=torch.randn(4))
        gm, record = fold(model, (torch.zeros(4),))
        assert record.rewrites == 0
        assert any(n.target is torch.dequantize for n in gm.graph.nodes)

    def test_graph_inputs_are_not_constants(self):
        gm, record = fold(Model(lambda m, x: x * x + 1), (torch.randn(3),))
        assert record.rewrites == 0 and record.status == "unchanged"
