"""graphopt.ir.purity: which nodes are impure, random, or write values in place.

Every in-place spelling torch.fx's own dead-code elimination gets wrong on symbolic-trace graphs
(HARD-CASES C1) must be reported impure with the written value; out-of-place twins stay pure.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.ir import ops, specs
from graphopt.ir.purity import is_impure, is_random, may_alias_input, mutated_values


class _KeepModules(fx.Tracer):
    """Keeps the named submodules as ``call_module`` nodes, whatever their type."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.names or super().is_leaf_module(m, qualname)


def traced(forward, **modules: nn.Module) -> fx.GraphModule:
    """Trace ``forward(self, x)`` on a module holding ``w`` (4x4) and ``modules``, which stay
    ``call_module`` nodes."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(4, 4), requires_grad=False)
            for name, module in modules.items():
                setattr(self, name, module)

        def forward(self, x):
            return forward(self, x)

    root = Model()
    return fx.GraphModule(root, _KeepModules(modules).trace(root))


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def single_op_graph(target, args_of, kwargs=None) -> tuple[fx.GraphModule, fx.Node, fx.Node]:
    """A graph ``y = target(*args_of(x), **kwargs)`` on placeholder ``x``; returns (gm, x, y)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(target, args_of(x), kwargs or {})
    graph.output(x)
    return fx.GraphModule(nn.Module(), graph), x, y


class TestInPlaceOpsAreImpure:
    @pytest.mark.parametrize(
        "forward, op_name, written",
        [
            (lambda self, x: x.add_(1), "add_", "x"),
            (lambda self, x: torch.relu_(x), "relu_", "x"),
            (lambda self, x: F.relu(x, inplace=True), "relu", "x"),
            (lambda self, x: F.hardtanh(x, 0.0, 6.0, True), "hardtanh", "x"),
            (lambda self, x: torch.add(x, 1, out=x), "add", "x"),
            (lambda self, x: x.copy_(self.w), "copy_", "x"),
            (lambda self, x: self.w.t().mul_(2), "mul_", "t"),
        ],
        ids=["method add_", "torch.relu_", "F.relu inplace kwarg", "F.hardtanh inplace positional",
             "out= kwarg", "copy_", "method on a view"],
    )
    def test_reported_with_the_value_written(self, forward, op_name, written):
        gm = traced(forward)
        op = node(gm, op_name)
        assert is_impure(op) is not None
        assert [v.name for v in mutated_values(op)] == [written]
        assert may_alias_input(op)  # an in-place op returns the tensor it wrote

    def test_setitem_writes_its_target(self):
        gm, x, y = single_op_graph(operator.setitem, lambda x: (x, 0, 1.0))
        assert is_impure(y) is not None
        assert mutated_values(y) == [x]

    def test_init_function_writes_its_tensor(self):
        gm, x, y = single_op_graph(nn.init.zeros_, lambda x: (x,))
        assert is_impure(y) is not None and mutated_values(y) == [x]

    def test_augmented_assignment_function_writes_its_target(self):
        gm, x, y = single_op_graph(operator.iadd, lambda x: (x, 1))
        assert "in place" in is_impure(y)
        assert mutated_values(y) == [x]

    def test_aten_op_with_mutable_schema_is_impure(self):
        gm, x, y = single_op_graph(torch.ops.aten.add_.Tensor, lambda x: (x, x))
        assert "mutable schema" in is_impure(y)
        assert mutated_values(y) == [x]

    def test_inplace_module_writes_its_input(self):
        gm = traced(lambda self, x: self.act(x * 2), act=nn.ReLU(inplace=True))
        act = node(gm, "act")
        assert "inplace=True" in is_impure(act)
        assert [v.name for v in mutated_values(act)] == ["mul"]


class TestOutOfPlaceTwinsArePure:
    @pytest.mark.parametrize(
        "forward, op_name",
        [
            (lambda self, x: x.add(1), "add"),
            (lambda self, x: torch.relu(x), "relu"),
            (lambda self, x: F.relu(x, inplace=False), "relu"),
            (lambda self, x: torch.add(x, 1), "add"),
            (lambda self, x: x.clone(), "clone"),
            (lambda self, x: x.size(0), "size"),
            (lambda self, x: self.w.t(), "t"),
        ],
    )
    def test_pure_and_writes_nothing(self, forward, op_name):
        op = node(traced(forward), op_name)
        assert is_impure(op) is None
        assert mutated_values(op) == []

    def test_aten_functional_op_is_pure(self):
        gm, x, y = single_op_graph(torch.ops.aten.add.Tensor, lambda x: (x, x))
        assert is_impure(y) is None

    @pytest.mark.parametrize("name", sorted(n for n, s in ops.SPECS.items() if s.pure))
    def test_every_pure_canonical_op_is_pure(self, name):
        spec = ops.SPECS[name]
        graph = fx.Graph()
        args = tuple(graph.placeholder(p) if d is specs._NO_DEFAULT else d for p, d in spec.params)
        op = graph.call_function(spec.target, args)
        graph.output(op)
        assert is_impure(op, fx.GraphModule(nn.Module(), graph)) is None


class TestRandomness:
    @pytest.mark.parametrize(
        "forward, op_name",
        [
            (lambda self, x: torch.bernoulli(self.w), "bernoulli"),
            (lambda self, x: self.w.bernoulli(), "bernoulli"),
            (lambda self, x: self.w.normal_(), "normal_"),
            (lambda self, x: self.w.uniform_(), "uniform_"),
            (lambda self, x: torch.rand_like(x), "rand_like"),
            (lambda self, x: torch.multinomial(self.w, 1), "multinomial"),
            (lambda self, x: torch.poisson(self.w), "poisson"),
            (lambda self, x: F.dropout(self.w, training=True), "dropout"),
            (lambda self, x: F.dropout(self.w, 0.5, True), "dropout"),
            (lambda self, x: torch.dropout(self.w, 0.5, True), "dropout"),
            (lambda self, x: F.feature_alpha_dropout(self.w, 0.5, training=True), "feature_alpha_dropout"),
            (lambda self, x: F.rrelu(x, training=True), "rrelu"),
        ],
    )
    def test_random_ops_are_random_and_impure(self, forward, op_name):
        op = node(traced(forward), op_name)
        assert is_random(op)
        assert "random" in is_impure(op)

    @pytest.mark.parametrize(
        "forward, op_name",
        [
            (lambda self, x: F.dropout(self.w, training=False), "dropout"),
            (lambda self, x: torch.dropout(self.w, 0.5, False), "dropout"),
            (lambda self, x: F.alpha_dropout(self.w, 0.5), "alpha_dropout"),
            (lambda self, x: F.rrelu(x), "rrelu"),
        ],
    )
    def test_dropout_without_training_is_deterministic(self, forward, op_name):
        op = node(traced(forward), op_name)
        assert not is_random(op)
        assert is_impure(op) is None

    def test_canonical_dropout_reads_training_flag_by_position(self):
        for training in (True, False):
            gm, x, y = single_op_graph(F.dropout, lambda x: (x, 0.5, training, False))
            assert is_random(y) is training

    def test_training_flag_computed_in_the_graph_counts_as_random(self):
        gm, x, y = single_op_graph(F.dropout, lambda x: (x, 0.5, x, False))
        assert is_random(y)

    def test_aten_seeded_op_is_random(self):
        gm, x, y = single_op_graph(torch.ops.aten.bernoulli.default, lambda x: (x,))
        assert is_random(y) and is_impure(y) is not None

    def test_dropout_module_is_random_only_in_training(self):
        gm = traced(lambda self, x: self.drop(x), drop=nn.Dropout(0.5))
        drop = node(gm, "drop")
        assert is_random(drop) and "random" in is_impure(drop)
        gm.drop.eval()
        assert not is_random(drop) and is_impure(drop) is None


class TestModules:
    def test_batch_norm_in_training_mode_updates_its_statistics(self):
        gm = traced(lambda self, x: self.bn(x) + self.bn.running_mean, bn=nn.BatchNorm1d(4))
        bn = node(gm, "bn")
        assert "running statistics" in is_impure(bn)
        assert [v.target for v in mutated_values(bn)] == ["bn.running_mean"]
        gm.bn.eval()
        assert is_impure(bn) is None and mutated_values(bn) == []

    def test_batch_norm_without_running_stats_is_pure_in_training(self):
        gm = traced(lambda self, x: self.bn(x), bn=nn.BatchNorm1d(4, track_running_stats=False))
        assert is_impure(node(gm, "bn")) is None

    def test_functional_batch_norm_in_training_writes_running_stats(self):
        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, None, None, True, 0.1, 1e-5)

        class Stats(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("mean", torch.zeros(4))
                self.register_buffer("var", torch.ones(4))

            def forward(self, x):
                return forward(self, x)

        gm = fx.symbolic_trace(Stats())
        (bn,) = [n for n in gm.graph.nodes if n.target is F.batch_norm]
        assert "running statistics" in is_impure(bn)
        assert [v.target for v in mutated_values(bn)] == ["mean", "var"]

    def test_unknown_module_is_impure_and_may_write_what_it_sees(self):
        class Custom(nn.Module):
            def forward(self, x):
                return x * 2

        gm = traced(lambda self, x: self.custom(self.w), custom=Custom())
        custom = node(gm, "custom")
        assert "not known to be pure" in is_impure(custom)
        assert [v.name for v in mutated_values(custom)] == ["w"]
        assert is_random(custom)

    def test_subclass_of_a_pure_module_is_not_trusted(self):
        class LoggingLinear(nn.Linear):
            def forward(self, x):
                print("called")
                return super().forward(x)

        gm = traced(lambda self, x: self.lin(x), lin=LoggingLinear(4, 4))
        assert is_impure(node(gm, "lin")) is not None

    def test_module_declaring_itself_impure(self):
        relu = nn.ReLU()
        relu._is_impure = True
        gm = traced(lambda self, x: self.act(x), act=relu)
        assert "_is_impure" in is_impure(node(gm, "act"))

    def test_graph_module_submodule_is_impure_when_it_contains_an_impure_node(self):
        inner_mutating = fx.symbolic_trace(lambda x: x.add_(1))
        inner_pure = fx.symbolic_trace(lambda x: x + 1)
        gm = traced(lambda self, x: self.a(x) + self.b(x), a=inner_mutating, b=inner_pure)
        assert "add_" in is_impure(node(gm, "a"))
        assert is_impure(node(gm, "b")) is None

    def test_pure_sequential_is_pure(self):
        gm = traced(lambda self, x: self.seq(x), seq=nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        assert is_impure(node(gm, "seq")) is None
        gm.seq[1].inplace = True
        assert is_impure(node(gm, "seq")) is not None


class TestSideEffects:
    def test_assert_is_kept(self):
        gm, x, y = single_op_graph(torch._assert, lambda x: (True, "message"))
        assert "side effects" in is_impure(y)

    def test_print_is_kept(self):
        gm, x, y = single_op_graph(print, lambda x: (x,))
        assert "side effects" in is_impure(y)

    def test_function_from_outside_torch_is_not_trusted(self):
        def helper(x):
            return x + 1

        gm, x, y = single_op_graph(helper, lambda x: (x,))
        assert "not from torch" in is_impure(y)

    def test_placeholders_and_output_are_roots(self):
        gm = traced(lambda self, x: x + 1)
        assert is_impure(node(gm, "x")) == "graph input"
        assert is_impure(node(gm, "output")) == "graph output"
        assert is_impure(node(gm, "add")) is None


class TestAliasing:
    @pytest.mark.parametrize(
        "forward, op_name, aliases",
        [
            (lambda self, x: self.w.t(), "t", True),
            (lambda self, x: x.view(16), "view", True),
            (lambda self, x: x.contiguous(), "contiguous", True),
            (lambda self, x: x[0], "getitem", True),
            (lambda self, x: x + 1, "add", False),
            (lambda self, x: torch.relu(x), "relu", False),
            (lambda self, x: x @ self.w, "matmul", False),
        ],
    )
    def test_views_may_alias_and_arithmetic_does_not(self, forward, op_name, aliases):
        assert may_alias_input(node(traced(forward), op_name)) is aliases
