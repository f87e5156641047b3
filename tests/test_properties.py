"""Property tests: every built-in pass and preset on generated models (graphopt.testing).

The hypothesis profile comes from GRAPHOPT_HYPOTHESIS_PROFILE (``ci`` by default, ``campaign``
for thousands of cases: ``make test-campaign``). Each test also fails when too few generated
models were valid or the pass never fired (the vacuity guard).
"""
from __future__ import annotations

import os

from hypothesis import event, given, settings

import graphopt
from graphopt.testing import PropertyStats, property_test
from graphopt.testing.strategies import OTHER_BATCH_SIZES, inputs_at_batch, models


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

#: kinds that read sizes at run time (x.view(x.size(0), -1), a token expand-ed to x.shape[0], ...):
#: mixed into the op lists below so every pass is checked for keeping the batch dynamic
#: (assert_sound compares with the model at batch 1, 3 and 5)
_SHAPE_READS = ["shape_view", "expand_token", "new_tensor", "position", "shape_split", "batch_pairs"]

# conv chains make the layout change pay; views, flattens and permutes of NHWC tensors need guards
test_channels_last = property_test(
    "channels-last", min_fired=1, max_depth=6,
    ops=["conv2d", "batch_norm", "relu", "add", "cat", "max_pool", "adaptive_avg_pool", "flatten", "reshape",
         "permute", "mean", "linear", *_SHAPE_READS],
)

# conv/linear chains without batch norm between them (equalization through relu or nothing;
# relu6 pairs are declined, and the kit draws them too)
test_equalize_cross_layer = property_test("equalize-cross-layer", min_fired=3,
                                          ops=["conv2d", "conv1d", "linear", "relu", "relu6", "add", "flatten"])
# layer norms read by linear layers (drawn from these two kinds alone, and deep: a norm over the
# last dim feeding a linear layer is rare); other_readers=rescale so norms with other readers fire too
test_smooth_activations = property_test("smooth-activations{other_readers=rescale}", min_fired=3,
                                        ops=["layer_norm", "linear"], max_depth=8)


def test_every_registered_builtin_pass_has_a_property_test():
    tested = {name.removeprefix("test_").replace("_", "-") for name in globals() if name.startswith("test_")}
    builtin = {n for n, p in graphopt.available_passes().items() if p.fn.__module__.startswith("graphopt.passes")}
    assert builtin <= tested, f"passes without a property test: {sorted(builtin - tested)}"


# pruning needs a channel that no graph output pins: conv chains give it one
# (shape reads end most chains: mixed in, they halve how often prune-channels alone fires, so
# they go to the preset, where channel shuffles and tokens read the channel count a cut changes)
test_prune_channels = property_test("prune-channels", min_fired=1, ops=["conv2d", "batch_norm", "relu", "add"],
                                    max_depth=6)
test_mobile_pruned = property_test("mobile-pruned", min_fired=1,
                                   ops=["conv2d", "batch_norm", "relu", "add", *_SHAPE_READS], max_depth=6)
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


# The recovery preset on the same models: the exact passes never roll back, quantize keeps or
# declines for its budget as above, and bias correction either keeps held-out SQNR at least as
# good (its record says so) or takes itself back with the reason; never a rollback by the manager.
_accurate_stats = {"valid": 0, "corrected": 0}


@_fewer(15)
@given(case=models(ops=_INT8_OPS, max_depth=5))
def _accurate_property(case):
    import warnings

    import torch

    from graphopt import verify

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = graphopt.PassManager("mobile-int8-accurate").run(case.module, case.example_inputs)
    _accurate_stats["valid"] += 1
    records = {r.name: r for r in result.report.records}
    where = f"\n{case.code}\nreport:\n{result.report}"
    for name in ("equalize-cross-layer", "smooth-activations", "correct-quantization-bias"):
        assert records[name].status in ("changed", "unchanged"), f"{name}: {records[name].error}{where}"
    if records["quantize"].status == "rolled-back":
        assert "dB" in records["quantize"].error
        return
    correction = records["correct-quantization-bias"]
    if correction.rewrites:
        _accurate_stats["corrected"] += 1
        held = correction.figures["held_out_sqnr_db"]
        assert all(a >= b for a, b in zip(held["after"], held["before"])), f"{held}{where}"
    else:
        assert all("taken back" in reason for _, reason in correction.declines), where
    outs, refs = verify.run(result.module, case.example_inputs), verify.run(case.module, case.example_inputs)
    assert [o.shape for o in outs] == [r.shape for r in refs]
    assert all(torch.isfinite(o).all() for o in outs)


def test_correct_quantization_bias():
    from types import SimpleNamespace

    _accurate_stats.update(valid=0, corrected=0)
    _accurate_property()
    test_correct_quantization_bias.stats = SimpleNamespace(
        pipeline="mobile-int8-accurate", drawn=_accurate_stats["valid"], valid=_accurate_stats["valid"],
        fired=_accurate_stats["corrected"])
    assert _accurate_stats["valid"] >= 5 and _accurate_stats["corrected"] >= 2, _accurate_stats

# Every preset on models that read their batch size (x.reshape(x.shape[0], -1), a class token
# expanded to x.shape[0], x.new_ones(x.shape[0], k), torch.arange(x.shape[0]), the batch padded
# to pairs): the batch stays dynamic (report.checked_at) and the optimized module equals the
# model in eager PyTorch at batch 1, 3 and 5, on fresh rows, within the float tolerance where
# every change was exact; where a lossy pass changed the graph (int8, pruning), shapes and finite
# values: their budgets hold at the example's sizes, and a batch-dependent term such as
# torch.arange(x.shape[0]) leaves int8's calibrated range at other batch sizes. The only
# rollback allowed is quantize declining for its SQNR budget: a rolled-back exact pass is a
# rewrite that verification caught, at the example or at the second batch size.
_batch_stats = PropertyStats("every preset at batch 1,3,5")
_BUILT_IN_PRESETS = ("mobile-fp32", "mobile-int8", "mobile-pruned", "mobile-int8-accurate")


@_fewer(20)
@given(case=models(require=("batch_read",)))
def _presets_at_other_batches(case):
    import torch

    from graphopt import verify

    _batch_stats.drawn += 1
    fired = False
    for preset in _BUILT_IN_PRESETS:  # (other tests register presets of their own)
        manager = graphopt.PassManager(preset)
        result = manager.run(case.module, case.example_inputs)
        report = result.report
        where = f"preset {preset!r} on\n{case.code}\nreport:\n{report}"
        assert report.checked_at, f"the batch was made static: {report.shapes}; {where}"
        for record in report.records:
            assert record.status in ("changed", "unchanged") or (
                record.name == "quantize" and record.status == "rolled-back" and "dB" in record.error
            ), f"{record.name} {record.status}: {record.error}; {where}"
        lossy_passes = {inv.name for inv in manager.invocations if inv.contract.lossy}
        lossy = any(r.changed and r.name in lossy_passes for r in report.records)
        fired |= any(r.rewrites for r in report.records)
        gen = torch.Generator().manual_seed(len(case.code))
        for size in OTHER_BATCH_SIZES:
            inputs = inputs_at_batch(case.example_inputs, size) if lossy else tuple(
                torch.randn(size, *x.shape[1:], generator=gen).to(x.dtype) for x in case.example_inputs)
            want, got = verify.run(case.module, inputs), verify.run(result.module, inputs)
            assert [g.shape for g in got] == [w.shape for w in want], f"shapes at batch {size}; {where}"
            assert all(bool(torch.isfinite(g).all()) for g, w in zip(got, want) if torch.isfinite(w).all()), \
                f"non-finite outputs at batch {size}; {where}"
            if not lossy:
                verdict = verify.compare_outputs([want], [got], input_labels=[f"batch {size}"])
                assert verdict.ok, f"{verdict.reason}; {where}"
    _batch_stats.valid += 1
    _batch_stats.fired += fired
    _batch_stats.shape_reading += 1
    _batch_stats.batch_reading += 1
    event(f"example batch {case.example_inputs[0].shape[0]}")


def test_presets_keep_the_batch_dynamic_on_shape_reading_models():
    global _batch_stats
    _batch_stats = test_presets_keep_the_batch_dynamic_on_shape_reading_models.stats = \
        PropertyStats("every preset at batch 1,3,5")
    _presets_at_other_batches()
    # "drawn"/"valid" in the summary are shape-reading models: each one drawn reads its batch size
    assert _batch_stats.valid >= min(5, settings().max_examples) and _batch_stats.fired >= 1, _batch_stats
