"""Property tests: every built-in pass and preset on generated models (graphopt.testing).

The hypothesis profile comes from GRAPHOPT_HYPOTHESIS_PROFILE (``ci`` by default, ``campaign``
for thousands of cases: ``make test-campaign``). Each test also fails when too few generated
models were valid or the pass never fired (the vacuity guard).
"""
from __future__ import annotations

import os

from hypothesis import settings

import graphopt
from graphopt.testing import property_test


def _fewer(n: int) -> settings:
    """The current profile with at most ``n`` examples (for slow round trips through runtimes);
    the campaign profile keeps its own count."""
    current = settings()
    if os.environ.get("GRAPHOPT_HYPOTHESIS_PROFILE") == "campaign":
        return current
    return settings(current, max_examples=min(n, current.max_examples))


test_fuse_conv_bn_relu = property_test("fuse-conv-bn-relu", min_fired=5)
test_fold_constants = property_test("fold-constants", min_fired=1)
test_eliminate_dead_code = property_test("eliminate-dead-code", min_fired=1)
# capture already produces the canonical form, so canonicalize rarely has work on a fresh capture
test_canonicalize = property_test("canonicalize", min_fired=0)
test_mobile_fp32 = property_test("mobile-fp32", min_fired=5)
test_mobile_fp32_lowers_to_both_backends = property_test(
    "mobile-fp32", min_fired=2, backends=("onnx", "torchscript-mobile"), dtypes=("model",), settings=_fewer(8),
)


def test_every_registered_builtin_pass_has_a_property_test():
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    builtin = {n for n, p in graphopt.available_passes().items() if p.fn.__module__.startswith("graphopt.passes")}
    assert builtin <= tested, f"passes without a property test: {sorted(builtin - tested)}"


# pruning needs a channel that no graph output pins: conv chains give it one
test_prune_channels = property_test("prune-channels", min_fired=1, ops=["conv2d", "batch_norm", "relu", "add"],
                                    max_depth=6)
test_mobile_pruned = property_test("mobile-pruned", min_fired=1, ops=["conv2d", "batch_norm", "relu", "add"],
                                   max_depth=6)
