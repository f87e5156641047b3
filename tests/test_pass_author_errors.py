"""The APIs a pass author touches first speak in GraphoptError subclasses that say what to do,
and stay catchable as the built-in exception they used to be."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir import ops
from graphopt.errors import GraphoptError, NodeRunError, NotCanonicalError, PassDefinitionError
from graphopt.ir.graph import execute


def test_an_option_without_a_default_is_a_pass_definition_error():
    with pytest.raises(PassDefinitionError, match=r"option 'factor' .* needs a default value") as info:
        @graphopt.register_pass("needs-a-default")
        def needs_a_default(gm, ctx, *, factor: int):
            return 0
    assert isinstance(info.value, GraphoptError) and isinstance(info.value, TypeError)
    assert "needs-a-default" not in graphopt.available_passes()


def test_a_class_pass_must_be_a_dataclass_with_run():
    with pytest.raises(PassDefinitionError, match="must be a @dataclass"):
        graphopt.register_pass("not-a-dataclass")(type("NotADataclass", (), {"run": lambda self, gm, ctx: 0}))
    with pytest.raises(PassDefinitionError, match=r"needs a run\(self, gm, ctx\) method"):
        graphopt.register_pass("no-run")(dataclasses.dataclass(type("NoRun", (), {})))


def test_op_helpers_name_the_node_and_the_way_out():
    gm = graphopt.capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    linear = next(n for n in gm.graph.nodes if ops.is_op(n, "linear"))
    with pytest.raises(NotCanonicalError, match="is not a canonical op; check ops.spec_of") as info:
        ops.arg(placeholder, "input")
    assert isinstance(info.value, LookupError)
    with pytest.raises(NotCanonicalError, match=r"linear \(node 'linear'\) has no parameter 'kernel'; its parameters: input, weight, bias"):
        ops.arg(linear, "kernel")
    with pytest.raises(NotCanonicalError, match="has no parameter 'stride'"):
        ops.set_arg(linear, "stride", 2)


def test_a_failing_node_names_itself_and_keeps_its_cause():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.matmul, (x, x)))
    gm = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(NodeRunError, match=r"running node matmul .* failed: RuntimeError") as info:
        execute(gm, (torch.randn(2, 3),))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, GraphoptError)
    assert isinstance(info.value.__cause__, RuntimeError)
