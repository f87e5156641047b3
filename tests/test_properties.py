"""Property tests: every built-in pass and preset on generated models (graphopt.testing).

The hypothesis profile comes from GRAPHOPT_HYPOTHESIS_PROFILE (``ci`` by default, ``campaign``
for thousands of cases: ``make test-campaign``). Each test also fails when too few generated
models were valid or the pass never fired (the vacuity guard).
"""
from __future__ import annotations

import os

from hypothesis import given, settings

import graphopt
from graphopt.testing import property_test
from graphopt.testing.strategies import models


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

# conv chains make the layout change pay; views, flattens and permutes of NHWC tensors need guards
test_channels_last = property_test(
    "channels-last", min_fired=1, max_depth=6,
    ops=["conv2d", "batch_norm", "relu", "add", "cat", "max_pool", "adaptive_avg_pool", "flatten", "reshape",
         "permute", "mean", "linear"],
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
# int8 is lossy and has a budget (15 dB SQNR on held-out calibration data) that random models
# with random weights do not always meet: the property is that quantize either meets its budget
# and then holds it end to end, or declines by rolling back with the reason, never that it
# returns a model outside its budget. Both int8 passes run (mobile-int8), and the count of
# cases where quantization went through is the vacuity guard.
_INT8_OPS = ["conv2d", "batch_norm", "relu", "relu6", "add", "linear", "flatten", "adaptive_avg_pool"]
_int8_stats = {"valid": 0, "quantized": 0}


@_fewer(15)
@given(case=models(ops=_INT8_OPS, max_depth=5))
def _int8_property(case):
    import torch

    result = graphopt.PassManager("mobile-int8").run(case.module, case.example_inputs)
    _int8_stats["valid"] += 1
    quantize = next(r for r in result.report.records if r.name == "quantize")
    if quantize.status == "rolled-back":
        assert "dB" in quantize.error, quantize.error  # declined for its budget, and said so
        return
    if quantize.status == "unchanged":  # nothing quantizable in this model
        return
    _int8_stats["quantized"] += 1
    assert quantize.min_sqnr_db >= 15.0
    fold = next(r for r in result.report.records if r.name == "fold-weight-quantization")
    assert fold.status in ("changed", "unchanged") and fold.max_abs_error in (None, 0.0)
    from graphopt import verify

    outs, refs = verify.run(result.module, case.example_inputs), verify.run(case.module, case.example_inputs)
    assert [o.shape for o in outs] == [r.shape for r in refs]
    assert all(torch.isfinite(o).all() for o in outs)


def test_quantize():
    from types import SimpleNamespace

    _int8_stats.update(valid=0, quantized=0)
    _int8_property()
    # "fired": quantization went through within its budget (the rest declined and said why)
    test_quantize.stats = SimpleNamespace(pipeline="mobile-int8", drawn=_int8_stats["valid"],
                                          valid=_int8_stats["valid"], fired=_int8_stats["quantized"])
    assert _int8_stats["valid"] >= 5 and _int8_stats["quantized"] >= 2, _int8_stats


test_fold_weight_quantization = test_quantize  # the same property covers both int8 passes
