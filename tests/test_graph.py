"""graphopt.ir.graph: the fast shape recorder must write exactly what torch.fx's ShapeProp writes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

import graphopt
from graphopt.ir import graph as G
from graphopt.app.examples import get_example


@pytest.mark.parametrize("name", ["resnet_cnn", "mobilenet_cnn", "mlp", "transformer_block"])
def test_propagate_shapes_matches_shapeprop(name):
    model, inputs = get_example(name)
    gm = graphopt.capture(model, inputs)
    ours = copy.deepcopy(gm)
    G.propagate_shapes(ours, inputs)
    theirs = copy.deepcopy(gm)
    with torch.no_grad():  # propagate_shapes records inference-time metadata
        ShapeProp(theirs).propagate(*inputs)
    for a, b in zip(ours.graph.nodes, theirs.graph.nodes):
        assert a.meta.get("tensor_meta") == b.meta.get("tensor_meta"), a.name


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 3, 4, 5),
    lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    lambda: torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
    lambda: torch.randn(4, 6).t(),
    lambda: torch.randn(3, 1, 1, 1),
    lambda: torch.randn(8)[::2],
    lambda: torch.zeros(0, 3),
    lambda: torch.ones(2, 2, dtype=torch.int64),
])
def test_tensor_metadata_matches_shapeprop(make):
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    t = make()
    assert G.tensor_metadata(t) == _extract_tensor_metadata(t)
