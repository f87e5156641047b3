"""Per-layer int8 sensitivity: how much each layer alone costs at the model's outputs.

For every weighted layer (conv, linear) that ``quantize`` would put in int8, three measurements
on held-out batches, everything else in float:

- *weights*: only its weights quantized (per channel, as the pass quantizes them);
- *activations*: only its activation input quantized, with the calibrated parameters;
- *both*: its weights and its input.

Each is the SQNR (dB) of the model's outputs against the float graph, the worst output when
there are several. The lower, the more that layer hurts; comparing *weights* with
*activations* says why (a weight with one huge column, an input with an outlier channel). The
output quantization of a layer is the input quantization of its readers, so it is measured
there.

Cost: one float run per held-out batch records every value; each measurement then re-runs
only what lies downstream of the layer, reading everything else from the recording.

:func:`analyze` runs it on a model as ``mobile-int8`` would see it. ``quantize{per_layer_report=true}``
records the same figures, and ``quantize{min_sqnr=DB}`` ranks layers by them to choose which stay
float (:mod:`graphopt.quantization.mixed_precision`).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphopt.errors import ReportError
from graphopt.fileio import atomic_write, jsonable
from graphopt.ir import ops
from graphopt.ir.graph import provenance
from graphopt.quantization.placement import Plan, Unit, weight_axis
from graphopt.quantization.qdq import fake_quantize_dynamic
from graphopt.quantization.qparams import TensorQParams, fake_quantize, fake_quantize_per_channel

#: what each measurement quantizes: (weights, activation input)
_VARIANTS = {"weight": (True, False), "activation": (False, True), "both": (True, True)}


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's output SQNRs (dB) with only its weights, only its input, or both in int8."""

    name: str  #: the compute node
    module: str  #: provenance: the module path it came from
    op: str
    weight_sqnr_db: float
    activation_sqnr_db: float
    sqnr_db: float  #: weights and input both quantized

    @property
    def cause(self) -> str:
        """"weights" or "activations": which of the two alone loses more."""
        return "weights" if self.weight_sqnr_db < self.activation_sqnr_db else "activations"

    def to_dict(self) -> dict[str, Any]:
        return {**{k: jsonable(v) for k, v in asdict(self).items()}, "cause": self.cause}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSensitivity":
        return cls(str(d["name"]), str(d["module"]), str(d["op"]), float(d["weight_sqnr_db"]),
                   float(d["activation_sqnr_db"]), float(d["sqnr_db"]))


def worst_first(layers: Iterable[LayerSensitivity]) -> list[LayerSensitivity]:
    """Layers by sensitivity: lowest SQNR with both quantized first, then the lower of the two."""
    return sorted(layers, key=lambda s: (s.sqnr_db, min(s.weight_sqnr_db, s.activation_sqnr_db), s.name))


def layer_sensitivity(gm: fx.GraphModule, plan: Plan, qparams: dict[fx.Node, TensorQParams],
                      weight_scales: dict[fx.Node, torch.Tensor],
                      batches: list[tuple[Any, ...]]) -> list[LayerSensitivity]:
    """The sensitivity of every weighted unit of ``plan`` with weight scales, in graph order,
    measured on the float graph ``gm`` over ``batches`` (see the module docstring)."""
    from graphopt.verify import sqnr_from_powers

    units = [u for u in plan.units if u.kind == "weighted" and u.node in weight_scales]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cones = {u.node: _downstream(u.node) for u in units}
    runner = fx.Interpreter(gm)
    # (layer, variant) -> output index -> [signal power, noise power]
    sums: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    with torch.no_grad():
        for batch in batches:
            recorder = fx.Interpreter(gm, garbage_collect_values=False)
            reference = _float_leaves(recorder.run(*batch))
            recorded = recorder.env
            for unit in units:
                cone = cones[unit.node]
                outside = {n: v for n, v in recorded.items() if n not in cone}
                for variant, (weight, activation) in _VARIANTS.items():
                    env = dict(outside)
                    env[unit.node] = _perturbed(runner, unit, recorded, plan, qparams, weight_scales[unit.node],
                                                weight=weight, activation=activation)
                    for i, (r, o) in enumerate(zip(reference, _float_leaves(runner.run(*batch, initial_env=env)))):
                        r, o = r.double(), o.double()
                        acc = sums[unit.node.name, variant][i]
                        acc[0] += float((r * r).sum())
                        acc[1] += float(((r - o) ** 2).sum())

    def db(name: str, variant: str) -> float:
        per_output = sums[name, variant]
        return min((sqnr_from_powers(*per_output[i]) for i in per_output), default=math.inf)

    return [LayerSensitivity(u.node.name, provenance(u.node), u.op, db(u.node.name, "weight"),
                             db(u.node.name, "activation"), db(u.node.name, "both"))
            for u in sorted(units, key=lambda u: order[u.node])]


def _downstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that reads it, directly or not."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _perturbed(runner: fx.Interpreter, unit: Unit, values: dict[fx.Node, Any], plan: Plan,
               qparams: dict[fx.Node, TensorQParams], scales: torch.Tensor, *, weight: bool,
               activation: bool) -> Any:
    """The output of ``unit.node`` with its weight and/or its activation input fake-quantized."""
    node, x, w = unit.node, unit.inputs[0], ops.arg(unit.node, "weight")
    act, wq = plan.config.activation, plan.config.weight

    def value(a: fx.Node) -> Any:
        v = values[a]
        if activation and a is x:
            v = (fake_quantize_dynamic(v, act.qmin, act.qmax, act.dtype, plan.config.activation_scale_min)
                 if plan.dynamic else fake_quantize(v, qparams[x]))
        if weight and a is w:
            v = fake_quantize_per_channel(v, scales, weight_axis(node), wq.qmin, wq.qmax)
        return v

    args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    return getattr(runner, node.op)(node.target, args, kwargs)


# ------------------------------------------------------------------------- the analysis of a model


@dataclass
class SensitivityReport:
    """What :func:`analyze` found: ``layers`` ranked worst first, and how it measured them."""

    layers: list[LayerSensitivity]
    config: str
    calibration: str
    data: str  #: calibration and held-out batches used
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "calibration": self.calibration, "data": self.data,
                "notes": list(self.notes), "layers": [s.to_dict() for s in self.layers]}

    def to_json(self) -> str:
        """The report as JSON text (infinite SQNRs, from layers quantized without error, as "inf")."""
        return json.dumps(self.to_dict(), indent=2)

    def save_json(self, path: Any) -> Any:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        with atomic_write(path) as staged:
            staged.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityReport":
        return cls([LayerSensitivity.from_dict(s) for s in d["layers"]], str(d["config"]), str(d["calibration"]),
                   str(d["data"]), list(d.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "SensitivityReport":
        return cls.from_dict(json.loads(text))

    def table(self):
        """A rich table, worst layer first."""
        from rich.table import Table

        t = Table(title=f"int8 sensitivity (config {self.config}, calibration {self.calibration})",
                  title_justify="left", caption_justify="left",
                  caption=f"output SQNR in dB with only that layer in int8; lower is worse. {self.data}")
        for col in ("#", "layer", "module", "op", "weights", "activations", "both", "cause"):
            t.add_column(col, justify="right" if col in ("#", "weights", "activations", "both") else "left")
        for i, s in enumerate(self.layers, 1):
            t.add_row(str(i), s.name, s.module, s.op, _db(s.weight_sqnr_db), _db(s.activation_sqnr_db),
                      _db(s.sqnr_db), s.cause)
        return t

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=open("/dev/null", "w"), color_system=None)
        console.print(self.table())
        for note in self.notes:
            console.print(note, markup=False, highlight=False)
        return console.export_text()

    def plot(self, path: Any, *, top: int | None = 30) -> Any:
        """A PNG bar chart of the ``top`` worst layers (all with ``top=None``): three bars each,
        weights, activations and both. Needs matplotlib (``pip install graphopt[charts]``)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ReportError("SensitivityReport.plot needs matplotlib: pip install graphopt[charts] "
                              "(or use .table() / .to_json())") from None
        shown = self.layers[:top] if top is not None else self.layers
        finite = [v for s in shown for v in (s.weight_sqnr_db, s.activation_sqnr_db, s.sqnr_db) if math.isfinite(v)]
        ceiling = max(finite, default=0.0) + 5.0  # where an exact (infinite SQNR) layer's bar ends
        fig = Figure(figsize=(8, 1.5 + 0.35 * max(len(shown), 1)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        height = 0.27
        for k, (label, attr) in enumerate((("weights", "weight_sqnr_db"), ("activations", "activation_sqnr_db"),
                                          ("both", "sqnr_db"))):
            values = [min(getattr(s, attr), ceiling) for s in shown]
            ax.barh([i + (k - 1) * height for i in range(len(shown))], values, height=height, label=label)
        ax.set_yticks(range(len(shown)), [s.module or s.name for s in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("output SQNR (dB) with only this layer in int8; lower is worse")
        ax.set_title(f"int8 sensitivity, worst first (config {self.config})", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        with atomic_write(path) as staged:
            fig.savefig(staged, format="png", dpi=100)
        return path


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.1f}"


def analyze(model: Any, example_inputs: Any, calibration_data: Iterable[Any] | None = None, *,
            config: str = "x86", calibration: str | None = None, percentile: float | None = None,
            bins: int | None = None, max_calibration_batches: int | None = None,
            held_out_batches: int | None = None, dynamic_shapes: Any = "batch") -> SensitivityReport:
    """Rank the layers of ``model`` by how much int8 costs each alone (see the module docstring).

    The model is captured (a copy; the model is not touched) and put through the passes that
    run before ``quantize`` in ``mobile-int8``, so layers are the fused units ``quantize`` sees.
    Placement and calibration are the pass's own; options left None take ``quantize``'s
    defaults and every value is checked as the pass checks it. The last ``held_out_batches`` of
    ``calibration_data`` are held out to measure on, as the pass does; without data, inputs are
    synthesized (with a warning)::

        report = graphopt.quantization.analyze(model, (x,), [(b,) for b in batches])
        print(report)                       # worst first
        report.save_json("sensitivity.json")
    """
    from graphopt.ir import graph as G
    from graphopt.ir import shapes, structure
    from graphopt.pipeline.manager import PassManager
    from graphopt.pipeline.passes import get_pass
    from graphopt.pipeline.spec import build_pipeline
    from graphopt.quantization import calibration as calib
    from graphopt.quantization.calibration import Calibrator
    from graphopt.quantization.configs import get_config
    from graphopt.quantization.placement import plan_quantization

    given = {"config": config, "calibration": calibration, "percentile": percentile, "bins": bins,
             "max_calibration_batches": max_calibration_batches, "held_out_batches": held_out_batches}
    options = get_pass("quantize").resolve_options({k: v for k, v in given.items() if v is not None})
    steps = build_pipeline("mobile-int8")
    before = steps[:next(i for i, inv in enumerate(steps) if inv.name == "quantize")]
    manager = PassManager(before, verify="final", on_failure="raise")
    manager.inference_presets = ["mobile-int8"]  # a model in training mode is refused, as the preset refuses it
    gm = manager.run(model, example_inputs, dynamic_shapes=dynamic_shapes).module

    cfg = get_config(options["config"])
    inputs = structure.graph_inputs(gm, G.as_input_tuple(example_inputs, model))
    if calibration_data is not None and not isinstance(calibration_data, torch.Tensor):
        calibration_data = structure.StructuredBatches(gm, model, calibration_data)
    data = calib.collect(inputs, calibration_data, max_batches=options["max_calibration_batches"],
                         held_out=options["held_out_batches"], dynamic=shapes.dynamic_dims_of_inputs(gm))
    calibrator = Calibrator(gm, cfg, options["calibration"], options["bins"], options["percentile"], data.batches)
    notes: list[str] = []
    plan = plan_quantization(gm, cfg, lambda unit: None, lambda node, why: notes.append(f"{node.name}: {why}"))
    params, scales, missing = calibrator.params(plan)
    if missing:
        def unreached(unit: Unit) -> str | None:
            return "no calibration data reached it" if any(v in missing for v in (unit.output, *unit.inputs)) else None

        plan = plan_quantization(gm, cfg, unreached, lambda node, why: None)
        params, scales, _ = calibrator.params(plan)
        notes.append(f"{len(missing)} value(s) no calibration batch reached stay float, as quantize leaves them")
    layers = layer_sensitivity(gm, plan, params, scales, data.held_out)
    how = options["calibration"] + (f" (percentile {options['percentile']:g})" if options["calibration"] == "histogram" else "")
    return SensitivityReport(worst_first(layers), cfg.name, how, data.description, notes)
