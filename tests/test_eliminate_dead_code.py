"""eliminate-dead-code: removes what nothing reads, never what has an effect (HARD-CASES C)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt


def trace(model):
    # buffers become graph values, so mutations of them are recorded rather than run at trace time
    tracer = fx.Tracer()
    tracer.proxy_buffer_attributes = True
    return fx.GraphModule(model, tracer.trace(model))


def run_dce(model, *inputs):
    gm = trace(model)
    result = graphopt.PassManager("eliminate-dead-code", on_failure="raise").run(gm, inputs)
    return gm, result.module, result.report.records[0]


def calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


class UnusedPure(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 400)  # 6.4 KB of weights nothing reads

    def forward(self, x):
        dead = torch.sigmoid(x) * 3
        _ = self.unused.weight.t()
        return self.used(x)


def test_removes_unused_pure_nodes_and_unread_parameters():
    x = torch.randn(2, 4)
    gm, out, rec = run_dce(UnusedPure(), x)
    names = [str(n.target) for n in calls(out)]
    assert "sigmoid" not in " ".join(names) and "t" not in names
    assert not hasattr(out, "unused") or not list(out.unused.parameters())
    assert rec.figures["bytes_removed"] == 400 * 4 * 4  # the traced graph module holds only the weight it read
    assert rec.param_bytes_after == rec.param_bytes_before - rec.figures["bytes_removed"]
    assert torch.equal(out(x), gm(x))


def test_is_idempotent():
    x = torch.randn(2, 4)
    _, once, _ = run_dce(UnusedPure(), x)
    again = graphopt.PassManager("eliminate-dead-code").run(once, (x,)).report.records[0]
    assert again.rewrites == 0 and not again.changed


def test_keeps_placeholders_and_outputs():
    class Ignores(nn.Module):
        def forward(self, x, unused):
            return x + 1, x

    x = torch.randn(3)
    _, out, _ = run_dce(Ignores(), x, torch.randn(3))
    assert [n.name for n in out.graph.nodes if n.op == "placeholder"] == ["x", "unused"]
    a, b = out(x, torch.randn(3))
    assert torch.equal(a, x + 1) and torch.equal(b, x)


class InPlaceMethod(nn.Module):
    def forward(self, x):
        y = x * 2
        y.add_(1)  # result unused: the mutation is the effect
        return y


class InPlaceFunction(nn.Module):
    def forward(self, x):
        y = x * 2
        torch.relu_(y)
        return y


class InPlaceKwarg(nn.Module):
    def forward(self, x):
        y = x * 2
        F.relu(y, inplace=True)
        return y


class OutKwarg(nn.Module):
    def forward(self, x):
        y = torch.zeros_like(x)
        torch.add(x, 1, out=y)
        return y


class Copy(nn.Module):
    def forward(self, x):
        y = torch.zeros_like(x)
        y.copy_(x)
        return y


class BufferUpdate(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


@pytest.mark.parametrize("model", [InPlaceMethod, InPlaceFunction, InPlaceKwarg, OutKwarg, Copy, BufferUpdate])
def test_never_removes_mutations_whose_result_is_unused(model):
    x = torch.randn(4, 3)
    eager = model()
    gm, out, rec = run_dce(model(), x)
    assert len(calls(out)) == len(calls(gm)), rec
    for _ in range(3):  # repeated calls still agree (buffer updates accumulate alike)
        assert torch.equal(out(x), eager(x))


class DeadWrite(nn.Module):
    """The write goes into a temporary that nothing reads afterwards: unobservable."""

    def forward(self, x):
        t = torch.relu(x * 2)
        t.add_(1.0)
        return x - 1


class WriteIntoView(nn.Module):
    """``v`` is a view of ``y``, which is returned: the write shows through it."""

    def forward(self, x):
        y = x * 2
        v = y.view(-1)
        v.add_(1.0)
        return y


class WriteIntoInput(nn.Module):
    def forward(self, x):
        x.mul_(2.0)
        return x + 0


def test_removes_writes_into_temporaries_nothing_reads():
    x = torch.randn(4, 3)
    gm, out, rec = run_dce(DeadWrite(), x)
    assert [str(n.target) for n in out.graph.nodes if n.op in ("call_function", "call_method")] == ["<built-in function sub>"]
    assert rec.rewrites == 3  # mul, relu, add_
    assert torch.equal(out(x), x - 1)


@pytest.mark.parametrize("model", [WriteIntoView, WriteIntoInput])
def test_keeps_writes_that_show_through_a_view_or_an_input(model):
    x = torch.randn(4, 3)
    gm, out, _ = run_dce(model(), x.clone())
    assert len(calls(out)) == len(calls(gm))
    a, b = x.clone(), x.clone()
    assert torch.equal(out(a), model()(b)) and torch.equal(a, b)


def test_dead_write_makes_mobile_fp32_reach_its_fixed_point_in_one_run():
    """Found by a property test: a write into a value whose other readers die later in the same
    run survived the first run and was removed by the second."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            v1 = self.conv(x)
            v2 = torch.relu(v1)
            v2.add_(1.0)
            self.pool(v2)
            return v1.flatten(1)

    x = torch.randn(2, 4, 6, 6)
    first = graphopt.optimize(Model().eval(), x, pipeline="mobile-fp32")
    second = graphopt.optimize(first.module, x, pipeline="mobile-fp32")
    assert not any(r.changed for r in second.report.records), second.report
    assert [n.op for n in first.module.graph.nodes].count("call_method") + \
        [n.op for n in first.module.graph.nodes].count("call_function") == 2  # conv2d, flatten


def test_never_removes_setitem():
    # symbolic tracing cannot record `y[0] = 5.0`; export-mode and hand-built graphs hold it
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_method("clone", (x,))
    g.call_function(operator.setitem, (y, 0, 5.0))
    g.output(y)
    gm = fx.GraphModule(nn.Module(), g)
    out = graphopt.PassManager("eliminate-dead-code").run(gm, (torch.zeros(2, 2),)).module
    assert torch.equal(out(torch.zeros(2, 2)), torch.tensor([[5.0, 5.0], [0.0, 0.0]]))


def test_keeps_unused_random_ops_so_the_random_stream_is_unchanged():
    class Rng(nn.Module):
        def forward(self, x):
            torch.rand(3)  # unused, but consumes random numbers
            return x + torch.randn(3)

    gm, out, _ = run_dce(Rng(), torch.zeros(3))
    torch.manual_seed(0)
    a = gm(torch.zeros(3))
    torch.manual_seed(0)
    b = out(torch.zeros(3))
    assert torch.equal(a, b)


def test_keeps_asserts():
    class Checks(nn.Module):
        def forward(self, x):
            torch._assert(x.sum() > -1e9, "sane")
            return x

    gm, out, _ = run_dce(Checks(), torch.zeros(2))
    assert any(n.target is torch._assert for n in out.graph.nodes)


def test_keeps_opaque_modules_not_known_to_be_pure():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            self.n += 1
            return x

    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.counter = Counter()

        def forward(self, x):
            self.counter(x)  # output unused; the side effect matters
            return x * 2

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Counter) or super().is_leaf_module(m, qualname)

    model = Uses()
    gm = fx.GraphModule(model, Tracer().trace(model))
    out = graphopt.PassManager("eliminate-dead-code").run(gm, (torch.ones(2),)).module
    assert any(n.op == "call_module" for n in out.graph.nodes)
    assert hasattr(out, "counter") and hasattr(out.counter, "n")


def test_training_mode_batch_norm_with_unused_output_is_kept():
    class TrainBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            self.bn(x)  # updates running statistics
            return x

    model = TrainBN().train()
    gm = trace(model)
    out = graphopt.PassManager("eliminate-dead-code", verify="none").run(gm, (torch.randn(4, 3),)).module
    out(torch.randn(4, 3) + 5)
    assert out.bn.running_mean.abs().sum() > 0  # the statistics update still happened


def test_layers_left_without_their_weights_become_plain_containers():
    # fusion replaces the conv's weight; once it is dropped, the Conv2d kept at its path could not
    # run its own forward, and torch.jit.script (which compiles every submodule) failed
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)  # (the bias=False conv keeps a bias=None entry, so it is not emptied)
    out = graphopt.optimize(model, (x,), pipeline="mobile-fp32").module
    assert type(out.get_submodule("0")) is nn.Module and not hasattr(out.get_submodule("0"), "weight")
    assert isinstance(model[0], nn.Conv2d) and hasattr(model[0], "weight")  # the user's model untouched
    scripted = torch.jit.script(out)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
