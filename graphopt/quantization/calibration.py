"""Calibration: run the float graph on representative inputs and let observers watch values;
:class:`Calibrator` turns what they saw into a plan's parameters.

Data comes from the user (``calibration_data``: an iterable of input tuples, or of single
tensors for one-input models). Without it, the example inputs plus synthesized inputs of the
in-distribution kinds (``uniform`` over the example's range and ``normal``) are used, with a
warning: ranges from made-up data are rarely the ranges of real data. The kinds that
verification uses to probe edge cases (x100, x1e-3, {-1, 0, 1}) would set absurd ranges and
are not used.
"""
from __future__ import annotations

import itertools
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value
from graphopt.errors import CalibrationDataError, QuantizationError
from graphopt.quantization.configs import BackendConfig
from graphopt.quantization import range_choice
from graphopt.quantization.observers import HistogramObserver, Observer
from graphopt.quantization.placement import Plan, weight_axis
from graphopt.quantization.qparams import TensorQParams, affine_qparams, guard_bias_scales, symmetric_per_channel_scales

#: synthesized kinds that look like data (see graphopt.verify.DISTRIBUTIONS)
_IN_DISTRIBUTION = ("uniform", "normal")


@dataclass
class CalibrationData:
    """Batches used to choose ranges, and batches held out to measure the error."""

    batches: list[tuple[Any, ...]]
    held_out: list[tuple[Any, ...]]
    synthesized: bool
    description: str


def _as_batch(item: Any, arity: int, index: int) -> tuple[Any, ...]:
    batch = G.as_input_tuple(item) if isinstance(item, (torch.Tensor, list, tuple)) else None
    if batch is None or len(batch) != arity:
        got = "a " + type(item).__name__ if batch is None else f"{len(batch)} value(s)"
        raise CalibrationDataError(
            f"calibration batch #{index} holds {got} but the model takes {arity} input(s); "
            "calibration_data must yield input tuples, or dicts of keyword inputs as the example inputs "
            "were given (drop labels: e.g. (x,) for x, y in loader)"
        )
    return batch


def _dims(shape: Any) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_batches(example_inputs: tuple[Any, ...], batches: list[tuple[Any, ...]], *,
                  held_out_from: int | None = None, dynamic: Sequence[frozenset[int]] | None = None) -> None:
    """Raise CalibrationDataError naming the first batch that holds NaN/inf, or whose tensors
    differ from the example inputs in dtype or in shape at a dim that is not dynamic
    (``dynamic``: the dynamic dims of each input, as the graph declares them,
    :func:`graphopt.ir.shapes.dynamic_dims_of_inputs`; default: dim 0).

    Checked before anything runs on the data, so a bad batch is reported as such and not as a
    torch error from inside the graph. ``held_out_from``: index of the first held-out batch
    (named so in the message)."""
    for i, batch in enumerate(batches):
        check_batch(example_inputs, batch, i, held_out=held_out_from is not None and i >= held_out_from,
                    dynamic=dynamic)


def check_batch(example_inputs: tuple[Any, ...], item: Any, index: int, *, held_out: bool = False,
                dynamic: Sequence[frozenset[int]] | None = None) -> tuple[Any, ...]:
    """One batch of calibration data as an input tuple, checked as :func:`check_batches` does
    (and for its arity); for passes that stream the data themselves."""
    batch = _as_batch(item, len(example_inputs), index)
    label = f"calibration batch #{index}" + (" (held out)" if held_out else "")
    for k, (x, ref) in enumerate(zip(batch, example_inputs)):
        where = f"{label}, input {k}"
        if isinstance(ref, torch.Tensor):
            if not isinstance(x, torch.Tensor):
                raise CalibrationDataError(
                    f"{where}: a {type(x).__name__} where the example input is a tensor "
                    f"({_dims(ref.shape)} {str(ref.dtype)[6:]}); yield tensors like the example inputs"
                )
            if x.dtype != ref.dtype:
                raise CalibrationDataError(
                    f"{where}: dtype {str(x.dtype)[6:]} where the example input is {str(ref.dtype)[6:]}; "
                    f"convert the batch (e.g. x.to({ref.dtype}))"
                )
            free = dynamic[k] if dynamic is not None and k < len(dynamic) else frozenset({0})
            if x.dim() != ref.dim() or any(a != b for d, (a, b) in enumerate(zip(x.shape, ref.shape)) if d not in free):
                allowed = (f"dim{'s' if len(free) > 1 else ''} {', '.join(map(str, sorted(free)))}, declared dynamic,"
                           if free else "no dim")
                raise CalibrationDataError(
                    f"{where}: shape {_dims(x.shape)} does not fit the example input's {_dims(ref.shape)} "
                    f"(only {allowed} may differ; see dynamic_shapes=)"
                )
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) \
                and not bool(torch.isfinite(x).all()):
            raise CalibrationDataError(
                f"{where}: {int((~torch.isfinite(x)).sum())} non-finite value(s) (NaN/inf); "
                "remove or clean that batch"
            )
    return batch


def collect(example_inputs: tuple[Any, ...], calibration_data: Iterable[Any] | None, *,
            max_batches: int, held_out: int, dynamic: Sequence[frozenset[int]] | None = None) -> CalibrationData:
    """Take up to ``max_batches + held_out`` batches; the last ``held_out`` are kept for
    measuring error when more than ``held_out`` batches exist (else the example inputs are)."""
    arity = len(example_inputs)
    if calibration_data is None:
        from graphopt import verify

        count = 2 * len(verify.DISTRIBUTIONS)
        synthesized = [b for k, b in enumerate(verify.synthesize_inputs(example_inputs, count=count, seed=17))
                       if verify.DISTRIBUTIONS[k % len(verify.DISTRIBUTIONS)] in _IN_DISTRIBUTION]
        warnings.warn(
            "quantize: no calibration data given, calibrating on the example inputs plus "
            f"{len(synthesized)} synthesized ones; ranges may be poor for real data. Pass "
            "calibration_data=[(x,), ...] (a few hundred representative samples) to optimize()/PassManager.run()",
            stacklevel=2,
        )
        return CalibrationData([example_inputs, *synthesized], [example_inputs], True,
                               f"example inputs + {len(synthesized)} synthesized batches (no calibration data)")
    if isinstance(calibration_data, torch.Tensor):
        raise CalibrationDataError("calibration_data is one tensor; pass an iterable of input tuples, e.g. [(x,)]")
    taken = [_as_batch(item, arity, i) for i, item in enumerate(itertools.islice(calibration_data, max_batches + held_out))]
    if not taken:
        raise CalibrationDataError("calibration_data yielded no batches; pass at least one input tuple")
    check_batches(example_inputs, taken, held_out_from=len(taken) - held_out if len(taken) > held_out > 0 else None,
                  dynamic=dynamic)
    if len(taken) > held_out > 0:
        batches, kept = taken[:-held_out], taken[-held_out:]
        where = f"{len(kept)} held-out batch(es)"
    else:
        batches, kept = taken, [example_inputs]
        where = "the example inputs (too few batches to hold any out)"
    return CalibrationData(batches, kept, False, f"{len(batches)} calibration batch(es); error measured on {where}")


def measurement_data(example_inputs: tuple[Any, ...], calibration_data: Iterable[Any] | None, *,
                     batches: int, dynamic: Sequence[frozenset[int]] | None = None) -> CalibrationData:
    """Batches to measure a dynamically quantized graph's error on: nothing is calibrated, so
    the first ``batches`` batches of ``calibration_data`` are all held out; without data, the
    example inputs (no warning: dynamic quantization needs no calibration data)."""
    if calibration_data is None:
        return CalibrationData([], [example_inputs], False,
                               "no calibration needed; error measured on the example inputs")
    if isinstance(calibration_data, torch.Tensor):
        raise CalibrationDataError("calibration_data is one tensor; pass an iterable of input tuples, e.g. [(x,)]")
    arity = len(example_inputs)
    taken = [_as_batch(item, arity, i) for i, item in enumerate(itertools.islice(calibration_data, max(batches, 1)))]
    if not taken:
        raise CalibrationDataError("calibration_data yielded no batches; pass at least one input tuple, or none at all")
    check_batches(example_inputs, taken, held_out_from=0, dynamic=dynamic)
    return CalibrationData([], taken, False, f"no calibration needed; error measured on {len(taken)} given batch(es)")


class _Watching(fx.Interpreter):
    """Runs the graph and hands the values of watched nodes to their observers."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, Observer], label: str):
        super().__init__(gm)
        self.watch, self.label = watch, label

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        observer = self.watch.get(n)
        if observer is not None and isinstance(value, torch.Tensor):
            observer.observe(value, f"{_describe(n)}, {self.label}")
        return value


def _describe(node: fx.Node) -> str:
    prov = node.meta.get("provenance")
    line = G.source_line(node)
    where = f"value {node.name!r}" + (f" (from {prov})" if prov and prov != node.name else "")
    return where + (f" at {line}" if line else "")


def _progress():
    """A rich progress bar over calibration batches, quiet when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not sys.stderr.isatty())


def calibrate(gm: fx.GraphModule, watch: dict[fx.Node, Observer], batches: list[tuple[Any, ...]]) -> None:
    """Run ``gm`` on every batch; observers in ``watch`` see their node's value each time."""
    with torch.no_grad(), _progress() as progress:
        task = progress.add_task("calibrating", total=len(batches))
        for i, batch in enumerate(batches):
            for k, x in enumerate(batch):
                if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    raise QuantizationError(
                        f"calibration batch #{i}, input {k}: {int((~torch.isfinite(x)).sum())} non-finite value(s) "
                        "(NaN/inf); remove or clean that batch"
                    )
            _Watching(gm, watch, f"calibration batch #{i}").run(*batch)
            progress.advance(task)


class Calibrator:
    """The parameters of a static plan: observers per group of values sharing parameters, the
    calibration runs that feed them, weight scales with the int32 bias guard.

    The ``quantize`` pass and :func:`graphopt.quantization.analyze` both take their parameters
    from here, so a layer is measured with the parameters the pass would give it. A group's range
    depends only on its members and the batches, so it is kept: planning again with some layers
    left float (``quantize{min_sqnr=...}``) calibrates only the groups that changed.
    """

    def __init__(self, gm: fx.GraphModule, cfg: BackendConfig, method: str, bins: int, percentile: float,
                 batches: list):
        self.gm, self.cfg, self.method, self.bins, self.percentile, self.batches = gm, cfg, method, bins, percentile, batches
        self.raised = 0  # weight channels whose scale the int32 bias guard raised, last plan
        self.choices: dict[str, range_choice.RangeChoice] = {}  # per group root, last plan
        self._choices: dict[frozenset[fx.Node], range_choice.RangeChoice | None] = {}
        self._new_observer()  # validate options early

    def _new_observer(self) -> HistogramObserver:
        act = self.cfg.activation
        return HistogramObserver(self.method, bins=self.bins, percentile=self.percentile, qlevels=act.qmax - act.qmin + 1)

    def params(self, plan: Plan) -> tuple[dict[fx.Node, TensorQParams], dict[fx.Node, torch.Tensor], set[fx.Node]]:
        """Activation parameters per value, weight scales per weighted unit, and the values
        calibration never reached."""
        act = self.cfg.activation
        groups = {root: frozenset(members) for root, members in plan.groups.roots().items()}
        observers: dict[frozenset[fx.Node], HistogramObserver] = {}
        watch: dict[fx.Node, HistogramObserver] = {}
        self.choices = {}
        for root, members in groups.items():
            if plan.groups.fixed_of(root) is None and members not in self._choices:
                observers[members] = self._new_observer()
                watch.update({m: observers[members] for m in members})
        if watch:
            calibrate(self.gm, watch, self.batches)
        self._choices.update({members: range_choice.choose(observer, self.method)
                              for members, observer in observers.items()})

        params: dict[fx.Node, TensorQParams] = {}
        missing: set[fx.Node] = set()
        for root, members in groups.items():
            fixed = plan.groups.fixed_of(root)
            if fixed is not None:
                qp = TensorQParams(fixed.scale, fixed.zero_point, act.qmin, act.qmax, act.dtype)
            else:
                choice = self._choices[members]
                if choice is None:
                    missing.update(members)
                    continue
                self.choices[root.name] = choice
                qp = affine_qparams(*choice.bounds, act.qmin, act.qmax, act.dtype, self.cfg.activation_scale_min)
            params.update({m: qp for m in members})

        scales: dict[fx.Node, torch.Tensor] = {}
        raised: dict[fx.Node, int] = {}
        for unit in plan.units:
            if unit.kind == "weighted" and unit.inputs[0] in params:
                weight = get_attr_value(self.gm, unit.node.args[1])
                s = symmetric_per_channel_scales(weight, weight_axis(unit.node), self.cfg.weight.qmax,
                                                 self.cfg.weight_scale_min)
                bias = ops.arg(unit.node, "bias")
                bias_value = get_attr_value(self.gm, bias) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
                scales[unit.node], raised[unit.node] = guard_bias_scales(s, bias_value, params[unit.inputs[0]].scale)
        self.raised = sum(raised.values())
        return params, scales, missing
