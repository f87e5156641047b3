"""Worked example: write a custom pass, then property-test it with graphopt.testing.

The pass, ``drop-redundant-relu``, removes ``relu(x)`` when ``x`` cannot be negative: when it is
the output of a relu, a sigmoid, or a hardtanh/relu6 whose lower bound is >= 0. It declares the
``Exact`` contract and is written with :mod:`graphopt.pipeline.rewrite`, which asks the rewrite budget
before each rewrite and records why it skipped a relu it could not prove redundant.

The property test draws random valid models (convolutions, norms, activations, residual adds,
SE-style gates; module, functional, method and in-place spellings mixed) and checks on each,
in float32 and float64, that the result still matches the original model, lints, keeps
provenance and is unchanged by a second run; it fails as well if the pass fired on fewer than
three of them, so it cannot pass by never looking at a relu.

Run it with pytest (``pytest examples/property_test_custom_pass.py``) or as a script.
"""
from __future__ import annotations

import torch.fx as fx

import graphopt
import graphopt.testing
from graphopt.ir import ops
from graphopt.pipeline import rewrite


def _never_negative(node: fx.Node) -> bool:
    if ops.is_op(node, "relu", "sigmoid"):
        return True
    return ops.is_op(node, "hardtanh") and ops.arg(node, "min_val") >= 0


@graphopt.register_pass("drop-redundant-relu", contract=graphopt.Exact())
def drop_redundant_relu(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    """Remove relu(x) where x is never negative (relu, sigmoid, hardtanh with min >= 0)."""
    return rewrite.apply(gm, ctx, rewrite.Rule(
        "relu",
        rewrite=lambda m: m.input,
        check=lambda m: None if isinstance(m.input, fx.Node) and _never_negative(m.input) else "its input may be negative",
    ))


# The property test: one line. `ops` narrows the generated models to kinds that can contain the
# pattern, so the pass gets many chances to fire; `min_fired` is the vacuity guard.
test_drop_redundant_relu = graphopt.testing.property_test(
    "drop-redundant-relu",
    min_fired=3,
    ops=["conv2d", "batch_norm", "relu", "relu6", "sigmoid", "add"],
)


if __name__ == "__main__":
    graphopt.testing.load_profile()
    test_drop_redundant_relu()
    print("drop-redundant-relu: property test passed")
