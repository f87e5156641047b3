"""Built-in example models: deterministic, non-trivial BN state, captured exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from graphopt.ir import ops
from graphopt.ir.canonical import canonicalize
from graphopt.capture import capture
from graphopt.errors import ModelLoadError
from graphopt.app.examples import EXAMPLES, get_example

SMALL = ["resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block"]
FULL_SIZE = {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872}  # torchvision's parameter counts


def test_registry_lists_every_example_with_a_description() -> None:
    assert set(EXAMPLES) == set(SMALL) | set(FULL_SIZE)
    for name, entry in EXAMPLES.items():
        assert entry.description and "\n" not in entry.description, name


def test_unknown_name_raises_model_load_error_with_suggestions() -> None:
    with pytest.raises(ModelLoadError, match="did you mean resnet_cnn") as info:
        get_example("resnet_cn")
    assert "mobilenet_v2" in str(info.value)  # lists what is available


@pytest.mark.parametrize("name", SMALL)
def test_small_examples_are_deterministic_in_eval_mode_with_random_bn_state(name: str) -> None:
    rng = torch.get_rng_state()
    model, inputs = get_example(name)
    again, inputs_again = get_example(name)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_again))
    assert not any(m.training for m in model.modules())
    other, _ = get_example(name, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("name", SMALL)
def test_small_examples_capture_to_a_fully_inlined_graph_that_computes_the_same(name: str, mode: str) -> None:
    model, inputs = get_example(name)
    gm = capture(model, inputs, mode=mode)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert torch.equal(gm(*inputs), model(*inputs))
    assert canonicalize(gm) == 0


def _ops_used(name: str) -> set[str | None]:
    model, inputs = get_example(name)
    return {ops.op_name(n) for n in capture(model, inputs).graph.nodes}


def test_examples_exercise_the_ops_they_are_meant_to() -> None:
    assert {"conv2d", "batch_norm", "relu", "add", "adaptive_avg_pool2d", "linear"} <= _ops_used("resnet_cnn")
    assert {"conv2d", "batch_norm", "hardtanh", "add"} <= _ops_used("mobilenet_cnn")
    assert {"layer_norm", "linear", "matmul", "softmax", "gelu", "add"} <= _ops_used("transformer_block")
    model, inputs = get_example("mobilenet_cnn")
    gm = capture(model, inputs)
    depthwise = [n for n in gm.graph.nodes if ops.is_op(n, "conv2d") and ops.arg(n, "groups") > 1]
    assert depthwise and all(ops.arg(n, "groups") == n.args[1].meta["tensor_meta"].shape[0] for n in depthwise)
    relu6 = [n for n in gm.graph.nodes if ops.is_op(n, "hardtanh")]
    assert relu6 and all(n.args[1:] == (0.0, 6.0) for n in relu6)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_examples_match_torchvision_and_capture_exactly(name: str) -> None:
    model, (image,) = get_example(name)
    assert tuple(image.shape) == (1, 3, 224, 224)
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE[name]
    keys = set(model.state_dict())
    expected = {"resnet18": {"conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_var",
                             "layer2.0.downsample.0.weight", "fc.bias"},
                "mobilenet_v2": {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.2.running_mean",
                                 "features.18.1.weight", "classifier.1.weight"}}[name]
    assert expected <= keys
    small = torch.randn(1, 3, 64, 64)  # the architectures pool adaptively; keeps the test fast
    gm = capture(model, (small,))
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert torch.equal(gm(small), model(small))
