"""Pass options and calibration data are checked before anything runs on them.

Declared rules (``Annotated[T, Range(...)]``, ``OneOf``, ``Check``) and types are checked when a
pipeline is built; name patterns are checked against the graph at the start of their pass;
calibration batches are checked before the graph runs on them. Each failure is an OptionError /
InputError saying what is wrong, and the pass manager raises it instead of rolling back.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import graphopt.passes.prune_channels  # noqa: F401  (registers the pass)
import graphopt.passes.quantize  # noqa: F401
from graphopt import Check, OneOf, Range, check_patterns
from graphopt.errors import CalibrationDataError, InputError, OptionError, QuantizationError
from graphopt.quantization import calibration as calib


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


class Net(nn.Module):
    """conv1-bn1-relu, conv2-bn2-relu, pool, fc: layers named conv1, conv2, fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(2, 3, 8, 8)


def data(n: int = 4, shape=(2, 3, 8, 8)) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def run(pipeline: str, *, calibration_data=None, on_failure: str = "rollback", options=None):
    manager = graphopt.PassManager(pipeline, verify="none", on_failure=on_failure, synthesize=0, options=options)
    return manager.run(Net().eval(), (X,), calibration_data=calibration_data)


# --------------------------------------------------------------------------- declared rules


class TestDeclaredRules:
    def test_annotated_rules_are_checked_when_the_pipeline_is_built(self, registry):
        ran = []

        @registry("t-thin")
        def thin(gm, ctx, *, ratio: Annotated[float, Range(ge=0, lt=1, why="fraction removed")] = 0.5,
                 mode: Annotated[str, OneOf(("fast", "exact"))] = "fast",
                 even: Annotated[int, Check(lambda v: v % 2 == 0, "an even number")] = 2,
                 cap: Annotated[int | None, Range(ge=0)] = None) -> int:
            ran.append(1)
            return 0

        with pytest.raises(OptionError, match=r"pass 't-thin': option ratio must be in \[0, 1\) "
                                              r"\(fraction removed\), got 1\.5"):
            graphopt.PassManager("t-thin{ratio=1.5}")
        with pytest.raises(OptionError, match=r"option mode must be one of fast, exact, got 'exakt'; "
                                              r"did you mean 'exact'\?"):
            graphopt.PassManager("t-thin", options={"t-thin": {"mode": "exakt"}})
        with pytest.raises(OptionError, match=r"option even must be an even number, got 3"):
            graphopt.PassManager("t-thin{even=3}")
        with pytest.raises(OptionError, match=r"option cap must be >= 0, got -1"):
            graphopt.PassManager("t-thin{cap=-1}")
        assert not ran
        manager = graphopt.PassManager("t-thin{ratio=0,mode=exact,even=4,cap=none}")
        assert manager.invocations[0].options == {"ratio": 0.0, "mode": "exact", "even": 4, "cap": None}
        option = graphopt.get_pass("t-thin").options["ratio"]
        assert option.type is float and option.checks == (Range(ge=0, lt=1, why="fraction removed"),)

    def test_class_passes_declare_rules_on_their_fields(self, registry):
        @registry("t-class-rules")
        @dataclasses.dataclass
        class Rules:
            """Nothing."""

            count: Annotated[int, Range(ge=0), "how many"] = 1

            def run(self, gm, ctx):
                return 0

        assert graphopt.get_pass("t-class-rules").options["count"].doc == "how many"
        with pytest.raises(OptionError, match=r"pass 't-class-rules': option count must be >= 0, got -2"):
            graphopt.PassManager("t-class-rules{count=-2}")

    @pytest.mark.parametrize("rule, text", [
        (Range(ge=0, lt=1), "in [0, 1)"), (Range(gt=0, le=100), "in (0, 100]"), (Range(ge=1), ">= 1"),
        (Range(lt=0.5), "< 0.5"), (OneOf(["a", "b"]), "one of a, b"),
    ])
    def test_rules_describe_what_is_allowed(self, rule, text):
        assert rule.allowed() == text

    def test_range_refuses_nan_and_conflicting_bounds(self):
        assert not Range(ge=0).accepts(float("nan"))
        with pytest.raises(TypeError, match="at most one lower bound"):
            Range(ge=0, gt=0)

    def test_one_of_reads_a_registry_when_checking(self):
        names = ["x"]
        rule = OneOf(lambda: names)
        assert not rule.accepts("y")
        names.append("y")
        assert rule.accepts("y")


# --------------------------------------------------------------------------- types from Python


class TestTypesFromPython:
    @pytest.mark.parametrize("pass_name, options, message", [
        ("prune-channels", {"ratio": "abc"}, r"prune-channels\{ratio=\.\.\.\}: expected float, got 'abc'"),
        ("prune-channels", {"round_to": [8]}, r"option round_to must be an int, got \[8\] \(list\)"),
        ("prune-channels", {"round_to": 2.5}, r"option round_to must be an int, got 2\.5 \(float\)"),
        ("prune-channels", {"min_channels": True}, r"option min_channels must be an int, got True"),
        ("prune-channels", {"importance": 3}, r"option importance must be one of l1, l2, bn_scale or Callable"),
        ("prune-channels", {"ratios": {"conv1": "x"}}, r"option ratios must be a string or dict\[str, float\]"),
        ("quantize", {"skip": [1]}, r"option skip must be a list of strings, got \[1\]"),
        ("quantize", {"per_layer_report": 1}, r"option per_layer_report must be true or false, got 1 \(int\)"),
        ("quantize", {"bins": None}, r"option bins must be an int, got None"),
        ("fold-constants", {"max_bytes": 10.5}, r"option max_bytes must be an int or None, got 10\.5"),
    ])
    def test_wrong_types_are_option_errors_naming_pass_option_and_value(self, pass_name, options, message):
        with pytest.raises(OptionError, match=message):
            graphopt.PassManager(pass_name, options={pass_name: options})

    def test_values_of_the_right_type_pass(self):
        graphopt.PassManager("prune-channels,quantize", options={
            "prune-channels": {"ratio": 0, "ratios": {"conv*": 0.5}, "importance": lambda group, gm: None,
                               "skip": ("fc",)},
            "quantize": {"skip": ["fc"], "percentile": 100, "bins": 256},
        })


# --------------------------------------------------------------------------- built-in ranges


class TestBuiltinRanges:
    @pytest.mark.parametrize("pipeline, message", [
        ("prune-channels{ratio=1}", r"pass 'prune-channels': option ratio must be in \[0, 1\).*got 1\.0"),
        ("prune-channels{ratio=-0.1}", r"option ratio must be in \[0, 1\).*got -0\.1"),
        ("prune-channels{round_to=0}", r"option round_to must be >= 1, got 0"),
        ("prune-channels{min_channels=0}", r"option min_channels must be >= 1, got 0"),
        ("prune-channels{ratios=conv1=1.5}", r"ratios\[conv1\] must be in \[0, 1\).*got 1\.5"),
        ("prune-channels{ratios=conv1}", r"needs the form pattern=ratio"),
        ("quantize{percentile=0}", r"pass 'quantize': option percentile must be in \(50, 100\].*got 0\.0"),
        ("quantize{percentile=100.5}", r"option percentile must be in \(50, 100\]"),
        ("quantize{bins=0}", r"option bins must be >= 1, got 0"),
        ("quantize{max_calibration_batches=0}", r"option max_calibration_batches must be >= 1, got 0"),
        ("quantize{held_out_batches=-1}", r"option held_out_batches must be >= 0, got -1"),
        ("quantize{keep_float_worst=-1}", r"option keep_float_worst must be >= 0, got -1"),
        ("quantize{config=x68}", r"option config must be one of x86, xnnpack.*got 'x68'; did you mean 'x86'"),
        ("fold-constants{max_bytes=-1}", r"pass 'fold-constants': option max_bytes must be >= 0.*got -1"),
    ])
    def test_out_of_range_values_fail_before_any_pass_runs(self, pipeline, message):
        with pytest.raises(OptionError, match=message):
            graphopt.PassManager(pipeline)

    def test_the_bounds_themselves_are_accepted(self):
        graphopt.PassManager("prune-channels{ratio=0,round_to=1,min_channels=1},"
                             "quantize{percentile=100,bins=1,held_out_batches=0,keep_float_worst=0},"
                             "fold-constants{max_bytes=0}")

    def test_a_config_registered_later_is_accepted(self):
        from graphopt.quantization import configs

        extra = dataclasses.replace(configs.X86, name="t-extra")
        configs.register_config(extra)
        try:
            graphopt.PassManager("quantize{config=t-extra}")
        finally:
            configs._CONFIGS.pop("t-extra", None)


# --------------------------------------------------------------------------- name patterns


class TestNamePatterns:
    @pytest.mark.parametrize("on_failure", ["rollback", "raise"])
    def test_quantize_skip_matching_no_layer_is_raised_not_rolled_back(self, on_failure):
        with pytest.raises(OptionError) as info:
            run("quantize{skip=conv3*}", calibration_data=data(), on_failure=on_failure)
        message = str(info.value)
        assert "pass 'quantize': option skip pattern 'conv3*' matches no layer" in message
        assert "conv1" in message  # names that exist are listed

    @pytest.mark.parametrize("options, pattern", [({"skip": "conv1;cnv2"}, "cnv2"),
                                                  ({"ratios": "conv1=0.5;head.*=0.5"}, "head.*")])
    def test_prune_patterns_matching_no_layer_are_raised_not_rolled_back(self, options, pattern):
        with pytest.raises(OptionError) as info:
            run("prune-channels", options={"prune-channels": options})
        message = str(info.value)
        assert f"pattern {pattern!r} matches no layer" in message and "prune-channels" in message
        assert "conv2" in message

    def test_patterns_that_match_run_as_before(self):
        result = run("quantize{skip=conv1;fc}", calibration_data=data())
        (record,) = result.report.records
        assert record.status == "changed"
        assert any("skipped by pattern 'conv1'" in r for _, r in record.declines)
        result = run("prune-channels{ratio=0.5,skip=fc}")
        assert result.report.records[0].status == "changed"

    def test_check_patterns_is_there_for_users_passes(self):
        check_patterns("mine", "only", ["a.*", "b"], ["a.x", "b", "c"])
        with pytest.raises(OptionError, match=r"pass 'mine': option only pattern 'blocks' matches no layer.*"
                                              r"did you mean one of 'block'"):
            check_patterns("mine", "only", ["blocks"], ["block", "head"])
        with pytest.raises(OptionError, match=r"pattern 'zz\*' matches no layer of the graph; layers are named like: "
                                              r"'a', 'b'"):
            check_patterns("mine", "only", ["zz*"], ["a", "b"])


# --------------------------------------------------------------------------- option errors raised inside a pass


def test_an_option_error_inside_a_pass_is_raised_under_rollback(registry):
    @registry("t-option-inside")
    def inside(gm, ctx, *, target: str = "x"):
        raise OptionError(f"t-option-inside: no node named {target!r}")

    with pytest.raises(OptionError, match="no node named 'x'"):
        graphopt.PassManager("t-option-inside", verify="none").run(Net().eval(), (X,))


# --------------------------------------------------------------------------- calibration data


class TestCalibrationData:
    @pytest.mark.parametrize("index, label", [(1, "calibration batch #1,"), (3, r"calibration batch #3 \(held out\),")])
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_values_in_any_batch_name_it(self, index, label, value):
        batches = data(4)
        batches[index][0][0, 1, 2, 3] = value
        with pytest.raises(InputError, match=label + r" input 0: 1 non-finite value\(s\)"):
            run("quantize", calibration_data=batches)

    def test_non_finite_values_are_refused_in_dynamic_mode_too(self):
        batches = data(2)  # dynamic mode measures on the first held_out_batches batches, all held out
        batches[0][0][0, 0, 0, 0] = float("nan")
        with pytest.raises(CalibrationDataError, match=r"calibration batch #0 \(held out\), input 0"):
            run("quantize{mode=dynamic}", calibration_data=batches)

    def test_wrong_shape_names_the_batch(self):
        batches = data(4)
        batches[2] = (torch.randn(2, 4, 8, 8),)
        with pytest.raises(InputError, match=r"calibration batch #2, input 0: shape 2x4x8x8 does not fit "
                                             r"the example input's 2x3x8x8 \(only dim 0, declared dynamic, may differ"):
            run("quantize", calibration_data=batches)

    def test_wrong_dtype_names_the_batch(self):
        batches = data(4)
        batches[0] = (batches[0][0].double(),)
        with pytest.raises(InputError, match=r"calibration batch #0, input 0: dtype float64 where the example "
                                             r"input is float32"):
            run("quantize", calibration_data=batches)

    def test_a_non_tensor_where_a_tensor_is_expected_names_the_batch(self):
        with pytest.raises(InputError, match=r"calibration batch #1, input 0: a list where the example input is "
                                             r"a tensor"):
            run("quantize", calibration_data=[(X,), ([1.0, 2.0],), (X,)])

    def test_other_batch_sizes_are_fine(self):
        batches = data(3, (5, 3, 8, 8)) + data(1, (1, 3, 8, 8))
        result = run("quantize", calibration_data=batches)
        assert result.report.records[0].status == "changed"

    def test_still_a_quantization_error_for_callers_that_catch_that(self):
        assert issubclass(CalibrationDataError, InputError) and issubclass(CalibrationDataError, QuantizationError)
        batches = data(2)
        batches[0][0][0, 0, 0, 0] = float("nan")
        with pytest.raises(QuantizationError, match="calibration batch #0"):
            run("quantize", calibration_data=batches)

    def test_prune_recalibration_checks_its_batches(self):
        batches = data(3)
        batches[1] = (torch.randn(2, 3, 9, 9),)
        with pytest.raises(InputError, match=r"calibration batch #1, input 0: shape 2x3x9x9"):
            run("prune-channels{ratio=0.5}", calibration_data=batches)

    def test_check_batches_directly(self):
        calib.check_batches((X,), data(3))
        bad = torch.zeros(1, 3, 8, 8)
        bad[0, 0, 0, :2] = float("nan")
        with pytest.raises(CalibrationDataError, match=r"batch #1 \(held out\), input 0: 2 non-finite"):
            calib.check_batches((X,), [(X,), (bad,)], held_out_from=1)
        assert calib.check_batch((X,), X, 0)[0] is X  # a single tensor is a one-input batch
