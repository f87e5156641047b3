"""graphopt.pipeline.rewrite: pattern, check returning a reason, rewrite; declines, budget, provenance."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ir import ops
from graphopt.pipeline import rewrite
from graphopt.errors import NotCanonicalError, PassDefinitionError


class ConvRelus(nn.Module):
    """conv -> relu (a fusion unit after mobile-fp32), conv -> relu6 -> relu, and a conv whose
    output is read twice (not a chain)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = F.relu(F.relu6(self.b(y)))
        w = self.c(z)
        return F.relu(w) + w


def _model():
    torch.manual_seed(0)
    return ConvRelus().eval(), (torch.randn(2, 3, 8, 8),)


def test_a_chain_rule_sees_every_spelling_the_fused_in_place_relu_included(registry):
    model, x = _model()
    seen = []

    @registry("see-conv-relu")
    def see(gm, ctx):
        return rewrite.apply(gm, ctx, rewrite.Rule(("conv2d", "relu"), lambda m: None,
                                                   check=lambda m: seen.append(m.root.target) or "looking only"))

    result = graphopt.optimize(model, x, pipeline="mobile-fp32,see-conv-relu")
    assert torch.relu_ in seen  # the fusion unit's in-place activation
    record = result.report.records[-1]
    assert any("conv2d+relu: looking only" in reason for _, reason in record.declines)
    # conv c's output is read by relu and add: the chain is declined with the other reader named
    assert any("is also read by add" in reason for _, reason in record.declines)


def test_a_rewrite_replaces_the_root_erases_the_chain_and_keeps_provenance(registry):
    model, x = _model()

    @registry("relu-of-relu6-to-relu6")
    def drop(gm, ctx):
        return rewrite.apply(gm, ctx, rewrite.Rule(
            ("hardtanh", "relu"), lambda m: m["hardtanh"],
            check=lambda m: None if m.arg("hardtanh", "min_val") >= 0 else "negative lower bound"))

    @registry("relu-to-clamp")
    def to_clamp(gm, ctx):
        return rewrite.apply(gm, ctx, rewrite.Rule("relu", lambda m: m.graph.call_function(torch.clamp, (m.input, 0.0))))

    result = graphopt.optimize(model, x, pipeline="canonicalize,relu-of-relu6-to-relu6,relu-to-clamp")
    first, second = result.report.records[1:]
    assert first.rewrites == 1 and second.rewrites == 2
    gm = result.module
    assert not any(ops.is_op(n, "relu") for n in gm.graph.nodes)
    clamps = [n for n in gm.graph.nodes if n.target is torch.clamp]
    assert len(clamps) == 2 and all(n.meta.get("provenance") for n in clamps)
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), model(*x))


def test_the_rewrite_budget_lets_bisect_find_the_first_wrong_rewrite(registry):
    model, x = _model()

    @registry("wrong-relu-removal")
    def wrong(gm, ctx):  # drops every relu: wrong where the input can be negative
        return rewrite.apply(gm, ctx, rewrite.Rule("relu", lambda m: m.input))

    found = graphopt.bisect(model, x, "canonicalize,wrong-relu-removal")
    assert found.first_bad is not None and found.pass_name == "wrong-relu-removal"
    assert found.description.startswith("relu at ")


def test_rules_are_checked_when_made():
    with pytest.raises(PassDefinitionError, match="unknown op"):
        rewrite.Rule(("conv2d", "rleu"), lambda m: None)
    with pytest.raises(PassDefinitionError, match="give op names"):
        rewrite.Rule([], lambda m: None)


def test_a_predicate_pattern_matches_what_names_cannot(registry):
    graph = fx.Graph()
    a = graph.placeholder("a")
    graph.output(graph.call_function(torch.mul, (a, 1.0)))
    gm = fx.GraphModule(nn.Module(), graph)
    ctx = graphopt.PassContext("t", {}, (torch.randn(3),))
    count = rewrite.apply(gm, ctx, rewrite.Rule(lambda n: n.target is torch.mul and n.args[1] == 1.0,
                                                lambda m: m.root.args[0], name="mul-one"))
    assert count == 1 and [n.op for n in gm.graph.nodes] == ["placeholder", "output"]
    assert ctx.rewrites_granted == 1


def test_a_budget_that_runs_out_midway_leaves_a_recompiled_module():
    model, x = _model()
    gm = graphopt.capture(model, x)
    ctx = graphopt.PassContext("t", {}, x, budget=graphopt.pipeline.passes.RewriteBudget(1))
    count = rewrite.apply(gm, ctx, rewrite.Rule("relu", lambda m: m.graph.call_function(torch.clamp, (m.input, 0.0))))
    assert count == 1 and ctx.rewrites_granted == 1
    assert sum(1 for n in gm.graph.nodes if n.target is torch.clamp) == 1
    assert "torch.clamp" in gm.code  # the generated code is the rewritten graph's
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), model(*x))


def test_asking_a_match_for_an_op_it_lacks_is_a_graphopt_error():
    model, x = _model()
    gm = graphopt.capture(model, x)
    relu = next(n for n in gm.graph.nodes if ops.is_op(n, "relu"))
    match = rewrite.Match(gm, (relu,))
    with pytest.raises(NotCanonicalError, match=r"no 'conv2d' in this match"):
        match["conv2d"]
