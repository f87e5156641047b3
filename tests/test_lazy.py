"""Captured and optimized modules generate their code on first use; until then graphopt runs
their graphs node by node, and that computes exactly what the generated code computes."""
from __future__ import annotations

import copy
import inspect
import io
import operator
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir import graph as G
from graphopt import verify
from graphopt.errors import InputError, ModelRunError
from graphopt.app.examples import get_example
from graphopt.ir.lazy import has_code, materialize

SMALL = ["resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block"]


def _fresh(inputs):
    return tuple(t.clone() for t in inputs)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_capture_generates_no_code_until_the_module_is_first_called(mode: str) -> None:
    model, inputs = get_example("resnet_cnn")
    gm = graphopt.capture(model, inputs, mode=mode)
    assert isinstance(gm, fx.GraphModule)
    assert not has_code(gm)
    out = gm(*inputs)
    assert has_code(gm)
    assert torch.equal(out, model(*inputs))
    gm.graph.eliminate_dead_code()
    gm.recompile()  # marks stale again, generates nothing
    assert not has_code(gm)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("pipeline", ["canonicalize", "mobile-fp32"])
def test_running_the_graph_computes_exactly_what_its_generated_code_computes(name: str, pipeline: str) -> None:
    model, inputs = get_example(name)
    gm = graphopt.optimize(model, inputs, pipeline, verify="final").module
    assert not has_code(gm)  # the whole pipeline, verification included, ran without code
    by_node = G.call(gm, _fresh(inputs))
    assert not has_code(gm)
    by_code = materialize(gm)(*_fresh(inputs))
    assert torch.equal(by_node, by_code)


def test_stale_module_prints_pickles_copies_and_scripts() -> None:
    model, inputs = get_example("mobilenet_cnn")
    want = model(*inputs)
    fresh = lambda: graphopt.capture(model, inputs)  # noqa: E731
    assert "def forward(self, x" in fresh().code
    assert "torch.conv2d" in str(fresh())
    assert torch.equal(copy.deepcopy(fresh())(*inputs), want)
    assert torch.equal(pickle.loads(pickle.dumps(fresh()))(*inputs), want)
    buffer = io.BytesIO()
    torch.save(fresh(), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(*inputs), want)
    assert torch.allclose(torch.jit.script(fresh())(*inputs), want, atol=1e-6)


class _Picky(nn.Module):
    def forward(self, x):
        return _refuse_negative(x) + 1


def _refuse_negative(x):
    if bool((x < 0).any()):
        raise ValueError("negative input")
    return x


torch.fx.wrap("_refuse_negative")


def test_a_failing_node_raises_its_own_error_naming_the_node() -> None:
    gm = graphopt.capture(_Picky(), (torch.ones(3),))
    assert not has_code(gm)
    with pytest.raises(ValueError, match="negative input") as info:
        G.call(gm, (-torch.ones(3),))
    assert any("_refuse_negative" in note for note in getattr(info.value, "__notes__", ["_refuse_negative"]))
    with pytest.raises(ModelRunError, match="negative input"):
        verify.run(gm, (-torch.ones(3),))


def test_input_count_is_checked_against_the_graph_of_a_stale_module() -> None:
    model, inputs = get_example("mlp")
    gm = graphopt.capture(model, inputs)
    with pytest.raises(InputError, match="takes 1 input"):
        verify.compare(model, gm, (inputs[0], inputs[0]))
    assert not has_code(gm)


def test_hooks_on_a_stale_module_run_as_on_any_call() -> None:
    model, inputs = get_example("mlp")
    gm = graphopt.capture(model, inputs)
    seen = []
    gm.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out * 2)
    out = G.call(gm, inputs)
    assert seen == [out.shape] and torch.equal(out, model(*inputs) * 2)
    assert torch.equal(gm(*inputs), out) and len(seen) == 2  # first real call: once, not twice


def test_default_arguments_and_the_signature_of_the_forward_are_kept() -> None:
    class WithDefault(nn.Module):
        def forward(self, x, scale: float = 3.0):
            return operator.mul(x, scale)

    gm = graphopt.capture(WithDefault(), (torch.ones(2),))
    stale = inspect.signature(gm.forward)
    assert list(stale.parameters) == ["x", "scale"] and stale.parameters["scale"].default == 3.0
    assert torch.equal(G.call(gm, (torch.ones(2),)), torch.full((2,), 3.0))
    assert torch.equal(materialize(gm)(torch.ones(2)), torch.full((2,), 3.0))
    code = inspect.signature(gm.forward)  # the generated forward's own
    assert list(code.parameters) == ["x", "scale"] and code.parameters["scale"].default == 3.0
