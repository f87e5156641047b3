"""The PassManager: runs a pipeline of passes with lint, shape propagation, verification of
each pass's contract, rollback of failing passes, instrumentation hooks and a report.

Rollback is cheap: before a pass the manager takes a *snapshot* (a copy of the graph and of
the module containers, sharing the tensors), unless it holds one of the current state already
(the caller's graph module, or the snapshot before a pass that changed nothing). Passes must
therefore never modify a tensor in place; the manager checks tensor version counters and names
a pass that does.
"""
from __future__ import annotations

import copy
import difflib
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.ir import diff as graph_diff, lazy, shapes, structure
from graphopt.errors import CalibrationDataError, GraphoptError, OptionError, PassError, PipelineError, VerificationError
from graphopt.errors import TrainingModeError
from graphopt.fileio import jsonable
from graphopt.pipeline.passes import Invocation, PassContext, RewriteBudget, build_pipeline, inference_presets

VerifyMode = Literal["each", "final", "none"]


class _LazyVerify:
    """graphopt.verify, imported on first use (keeps `import graphopt` light)."""

    def __getattr__(self, name: str):
        from graphopt import verify as module

        return getattr(module, name)


verify = _LazyVerify()


# --------------------------------------------------------------------------- records


@dataclass
class PassRecord:
    """What one pass did: status, timing, sizes, rewrites, error figures."""

    name: str
    status: str  # "changed" | "unchanged" | "rolled-back" | "failed"
    seconds: float
    nodes_before: int
    nodes_after: int
    rewrites: int
    param_bytes_before: int
    param_bytes_after: int
    changed: bool
    contract: str
    options: dict[str, Any] = field(default_factory=dict)
    max_abs_error: float | None = None
    min_sqnr_db: float | None = None
    #: "ok" (checked against its contract), "no budget" (lossy without a numeric budget: outputs
    #: changed, measured where verified, never judged) or None (not checked, or failed: see status)
    check: str | None = None
    error: str | None = None
    declines: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    #: parameters and buffers the module holds (read by the graph or not) before and after
    tensors_before: int = 0
    tensors_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["declines"] = [{"node": n, "reason": r} for n, r in self.declines]
        d["options"] = {k: jsonable(v) for k, v in self.options.items()}
        d["figures"] = {k: jsonable(v) for k, v in self.figures.items()}
        for k in ("max_abs_error", "min_sqnr_db"):
            d[k] = jsonable(d[k])
        return d


@dataclass
class Report:
    """Per-pass records plus the final verdict; ``str()`` is a table, ``to_dict()`` is JSON-able."""

    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    final_verdict: Any = None
    seconds: float = 0.0
    #: lossy passes without a numeric budget that changed the graph (their loss is not judged)
    unbudgeted: list[str] = field(default_factory=list)
    #: remarks about the whole run (a model in training mode, ...), shown before the passes' own
    notes: list[str] = field(default_factory=list)
    #: the graph's inputs with their dynamic dims by name, and dims kept static with why
    #: (:func:`graphopt.ir.shapes.describe`); ``checked_at``: the second sizes verification used
    shapes: list[str] = field(default_factory=list)
    checked_at: dict[str, int] = field(default_factory=dict)
    #: the graph before and after each pass that changed it or declined somewhere, by index into
    #: ``records`` (:class:`graphopt.ir.diff.GraphView`); consecutive passes share a view
    graphs: dict[int, tuple[Any, Any]] = field(default_factory=dict, repr=False)
    #: the lowest SQNR floor among the budgeted lossy passes that changed the graph: the final
    #: check holds the whole run to it (a run cannot be within every pass's budget and below it)
    sqnr_floor_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "shapes": list(self.shapes),
            "checked_at": dict(self.checked_at),
            "records": [r.to_dict() for r in self.records],
            "final_check": self.final_check,
            "unbudgeted_lossy_passes": list(self.unbudgeted),
            "final_verdict": self.final_verdict.to_dict() if self.final_verdict is not None else None,
        }

    @property
    def final_check(self) -> str | None:
        """"ok", "over budget" (a lossy run whose output SQNR against the captured model is below
        the lowest floor of its budgeted lossy passes), "no budget" (within shapes, but a lossy
        pass without a budget changed the outputs: nothing judges how much), "mismatch", or None
        when not checked."""
        if self.final_verdict is None:
            return None
        if not self.final_verdict.ok:
            return "mismatch"
        if self.sqnr_floor_db is not None and self.final_verdict.min_sqnr_db < self.sqnr_floor_db:
            return "over budget"
        return "no budget" if self.unbudgeted else "ok"

    def final_check_text(self) -> str:
        v = self.final_verdict
        if self.final_check == "over budget":
            return (f"OVER BUDGET: output SQNR {_fmt_db(v.min_sqnr_db)} dB against the captured model, below the "
                    f"{self.sqnr_floor_db:g} dB the lossy passes' budgets allow (max_abs {v.max_abs:.3g}; "
                    f"{v.inputs_checked} input(s) x {len(v.outputs)} output(s))")
        if self.final_check != "no budget":
            return str(v)
        return (f"no budget: output SQNR {_fmt_db(v.min_sqnr_db)} dB (max_abs {v.max_abs:.3g}, max_rel {v.max_rel:.3g}; "
                f"{v.inputs_checked} input(s) x {len(v.outputs)} output(s)); lossy pass(es) without a numeric budget "
                f"changed the outputs ({', '.join(self.unbudgeted)}), so only shapes and non-finite values are judged")

    @property
    def failed(self) -> list[PassRecord]:
        return [r for r in self.records if r.status in ("rolled-back", "failed")]

    def table(self):
        from rich.table import Table

        t = Table(title=f"graphopt pipeline: {self.pipeline}", title_justify="left", caption_justify="left",
                  caption="rewrites: edits the pass made; nodes: graph nodes but inputs and output (constants "
                          "included); tensors: parameters and buffers held; param bytes: those the graph reads")
        for col in self.COLUMNS:
            t.add_column(col, justify="left" if col in ("pass", "status") else "right")
        colours = {"changed": "[green]", "rolled back": "[red]", "failed": "[red]", "changed, no budget": "[yellow]"}
        for row in self.rows():
            t.add_row(row[0], colours.get(row[1], "") + row[1], *row[2:])
        return t

    #: the columns of :meth:`rows`, as the table and the HTML report show them
    COLUMNS = ("pass", "status", "rewrites", "nodes", "tensors", "param bytes", "max abs err", "SQNR dB", "ms")

    def rows(self) -> list[list[str]]:
        """The table's cells, one row per record (plain text; the HTML report shows the same)."""
        out = []
        for r in self.records:
            status = {"rolled-back": "rolled back"}.get(r.status, r.status)
            if r.check == "no budget":
                status = "changed, no budget"
            out.append([
                r.name, status, str(r.rewrites), f"{r.nodes_before} -> {r.nodes_after}",
                f"{r.tensors_before} -> {r.tensors_after}",
                f"{_fmt_bytes(r.param_bytes_before)} -> {_fmt_bytes(r.param_bytes_after)}",
                "-" if r.max_abs_error is None else _fmt_err(r.max_abs_error),
                "-" if r.min_sqnr_db is None else _fmt_db(r.min_sqnr_db),
                f"{r.seconds * 1e3:.1f}",
            ])
        return out

    def save_html(self, path: Any) -> Any:
        """Write this report as one self-contained HTML page (:mod:`graphopt.view.html`);
        returns the path. Needs Graphviz's ``dot`` (ReportError when it is missing)."""
        from graphopt.view.html import write_html

        return write_html(self, path)

    def details(self) -> list[str]:
        lines = list(self.notes)
        if self.shapes:
            where = f"; every check also at {', '.join(f'{k}={v}' for k, v in self.checked_at.items())}" \
                if self.checked_at else "; static shapes: other sizes are refused"
            lines.insert(0, f"inputs: {' | '.join(self.shapes)}{where}")
        for r in self.records:
            if r.error:
                lines.append(f"{r.name}: {r.error}")
                if r.max_abs_error is not None:  # the table's figure: the worst input, not the first failing one
                    lines.append(f"{r.name}: max abs error {_fmt_err(r.max_abs_error)} over all inputs checked")
            if r.check == "no budget":
                measured = (f"output SQNR {_fmt_db(r.min_sqnr_db)} dB against the graph before it"
                            if r.min_sqnr_db is not None else "output SQNR not measured (verify='each' measures it)")
                lines.append(f"{r.name}: no budget: {measured}; its {r.contract} contract accepts any loss")
            for node, reason in r.declines:
                lines.append(f"{r.name}: declined at {node}: {reason}")
            for note in r.notes:
                lines.append(f"{r.name}: {note}")
        if self.final_verdict is not None:
            lines.append(f"final check against the captured model: {self.final_check_text()}")
        return lines

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=open("/dev/null", "w"), color_system=None)
        console.print(self.table())
        for line in self.details():
            console.print(line, markup=False, highlight=False)
        return console.export_text()


def _fmt_err(value: float) -> str:
    return f"{value:.2e}"


def _fmt_db(value: float) -> str:
    return "inf" if value == float("inf") else "-inf" if value == float("-inf") else f"{value:.1f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class Result:
    """What a pipeline run returns."""

    module: fx.GraphModule
    report: Report

    def __iter__(self):  # allows `gm, report = pm.run(...)`
        return iter((self.module, self.report))

    def explore(self, *, port: int = 8080, open_browser: bool = True) -> None:
        """Open each state of the graph in Model Explorer (:func:`graphopt.view.explorer.explore`)."""
        from graphopt.view.explorer import explore

        explore(self.report, port=port, open_browser=open_browser)


# --------------------------------------------------------------------------- hooks


class Hook:
    """Instrumentation: subclass and override what you need."""

    def before_pass(self, inv: Invocation, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after_pass(self, inv: Invocation, gm: fx.GraphModule, record: PassRecord) -> None: ...

    def on_failure(self, inv: Invocation, gm: fx.GraphModule, record: PassRecord, error: BaseException) -> None: ...


class PrintGraph(Hook):
    """Print the graph (or a unified diff of its code) after each pass that changed it."""

    def __init__(self, diff: bool = True, only_changed: bool = True, file=None):
        self.diff, self.only_changed, self.file = diff, only_changed, file
        self._before = ""

    def before_pass(self, inv, gm, ctx):
        self._before = gm.code

    def after_pass(self, inv, gm, record):
        if self.only_changed and not record.changed:
            return
        print(f"--- after {inv} ({record.status}) ---", file=self.file)
        if self.diff:
            lines = difflib.unified_diff(self._before.splitlines(), gm.code.splitlines(), "before", "after", lineterm="")
            print("\n".join(lines), file=self.file)
        else:
            print(gm.code, file=self.file)


class Timing(Hook):
    """Collect wall time per pass name across runs (``.totals``)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def after_pass(self, inv, gm, record):
        self.totals[inv.name] = self.totals.get(inv.name, 0.0) + record.seconds


# --------------------------------------------------------------------------- manager


class _Snapshot:
    """The state of a graph module before a pass: a copy of its graph and of its module tree's
    containers, sharing the tensors. Building the runnable module waits until a rollback or a
    divergence search needs it; after :meth:`restore` the snapshot is spent (the manager
    mutates what it returned)."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = copy.deepcopy(gm.graph)
        keep = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        self.root = _shallow_tree(gm, "", keep)
        self.class_name = gm.__class__.__name__
        self.training = gm.training
        self.meta = dict(getattr(gm, "meta", {}))
        self._module: fx.GraphModule | None = None

    def module(self) -> fx.GraphModule:
        """The state as a module, to run (not to mutate)."""
        if self._module is None:
            # the copied tree becomes the module's own (GraphModule(root, graph) would walk and
            # rebuild it once per attribute the graph reads)
            empty = fx.Graph(tracer_cls=self.graph._tracer_cls, tracer_extras=self.graph._tracer_extras)
            gm = lazy.graph_module(torch.nn.Module(), empty, self.class_name)
            state = gm.__dict__
            for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                state[key] = self.root.__dict__[key]
            for key, value in self.root.__dict__.items():
                if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants)
                    state[key] = value
            gm.graph = self.graph
            gm.meta = self.meta
            gm.train(self.training)
            self._module = gm
        return self._module

    restore = module  # the manager takes the module itself; the snapshot is not used again
    spent_by_restore = True


class _Unchanged:
    """The state of the working module while it still equals the caller's graph module, which
    the manager never mutates: until a pass changes something, rollback copies that module
    again and no snapshot is taken."""

    spent_by_restore = False

    def __init__(self, gm: fx.GraphModule):
        self._gm = gm

    def module(self) -> fx.GraphModule:
        return self._gm

    def restore(self) -> fx.GraphModule:
        return _copy_graph_module(self._gm)


def _shallow_tree(module: torch.nn.Module, prefix: str, keep: set[str]) -> torch.nn.Module:
    """Plain containers mirroring ``module``'s tree and sharing its tensors; modules the graph
    calls (opaque ``call_module`` targets) are kept as they are."""
    if prefix in keep:
        return module
    new = torch.nn.Module()
    new.training = module.training
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():
        if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants)
            new.__dict__[key] = value
    for name, child in module._modules.items():
        new._modules[name] = None if child is None else _shallow_tree(child, f"{prefix}.{name}" if prefix else name, keep)
    return new


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph module with its own graph and containers over the same tensors: passes
    never write tensors in place, so the caller's module stays as it was."""
    return _Snapshot(gm).module()


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by qualified name, each tensor once (under its first name),
    from one walk of the module tree: a pass step needs them for versions, its fingerprint and
    byte counts, and walking a tree of thousands of containers once per use was a fifth of a
    large pipeline's time."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in gm.named_modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out[f"{prefix}.{name}" if prefix else name] = t
    return out


def _graph_nodes(gm: fx.GraphModule) -> int:
    """The report's node count: every node but the inputs and the output (constant and
    parameter reads included, so removing one shows)."""
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _read_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the graph reads (through get_attr, or inside a module it calls): the report's
    bytes, which a pass that leaves tensors behind for eliminate-dead-code does not inflate."""
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    out = []
    for name, t in tensors.items():
        parts = name.split(".")
        if any(".".join(parts[:k]) in targets for k in range(1, len(parts) + 1)):
            out.append(t)
    return out


def _tensor_versions(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {name: (id(t), t._version) for name, t in tensors.items()}


#: node.meta entries derived by analysis; anything else a pass writes there (fusion units,
#: quantization parameters, ...) is part of what it changed.
_DERIVED_META = frozenset({"tensor_meta", "type", "stack_trace", "nn_module_stack", "provenance",
                           "val", "example_value", "source_fn_stack", "original_aten", "seq_nr",
                           "from_node", "torch_fn"})


def _leaf_key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value


def _fingerprint(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> tuple:
    """What a pass can change: graph structure, the tensors behind attributes, and the meta
    entries passes write. Cheaper than regenerating code, so unchanged graphs skip recompiling,
    shape propagation and verification."""
    structure = tuple(
        (n.name, n.op, n.target if isinstance(n.target, str) else id(n.target),
         fx.node.map_aggregate(n.args, _leaf_key), fx.node.map_aggregate(n.kwargs, _leaf_key))
        for n in gm.graph.nodes
    )
    meta = frozenset(
        (n.name, k, repr(v)) for n in gm.graph.nodes for k, v in n.meta.items() if k not in _DERIVED_META
    )
    return structure, frozenset((k, id(t)) for k, t in tensors.items()), meta


def _run_all(gm: torch.nn.Module, inputs: list[tuple]) -> list[list[torch.Tensor]]:
    """Outputs on every verification input, leaving buffers as they were."""
    run = G.runner(gm)  # one plan for all the inputs
    with G.preserved_state(gm):
        return [verify.run(run, i) for i in inputs]


def _in_distribution(label: str) -> bool:
    return label == "example" or "(uniform)" in label or "(normal)" in label


def _resized_reason(labels: list[str], before: list, after: list, at_example: Any) -> str | None:
    """Why a lossy pass's outputs at the second sizes of the dynamic dims break its contract.

    A lossy budget is judged at the example's sizes (an SQNR over the one scalar a batch-1 run
    may return says nothing); at the second sizes, whose inputs repeat the example's rows, the
    outputs must keep their shapes and their error may not exceed four times the largest error
    seen at the example's sizes, plus the dtype's float tolerance. A pass that specialized a
    dynamic dim fails here (shapes change, or the values of other rows are wrong)."""
    for i, label in enumerate(labels):
        if not shapes.is_resized_label(label):
            continue
        loose = verify.Tolerance(float("inf"), float("inf"))
        v = verify.compare_outputs([before[i]], [after[i]], loose, input_labels=[label])
        if not v.ok:
            return v.reason
        for figures, seen in zip(v.outputs, at_example.outputs):
            scale = figures.max_abs / figures.max_rel if figures.max_rel > 0 else 0.0
            base = verify.Tolerance.for_dtype(getattr(torch, figures.dtype.removeprefix("torch."), torch.float32)) \
                if figures.dtype.startswith("torch.float") else verify.Tolerance(0.0, 0.0)
            allowed = 4 * seen.max_abs + base.allowed(scale)
            if figures.max_abs > allowed:
                return (f"output {figures.index} on {label}: max abs error {figures.max_abs:.3g}, over 4x the "
                        f"{seen.max_abs:.3g} seen at the example's sizes (the pass may have specialized a dynamic dim)")
    return None


def _declare_dims(gm: fx.GraphModule, inputs: tuple[Any, ...], spec: Any) -> None:
    def run(args: tuple[Any, ...]) -> Any:
        with torch.no_grad(), G.preserved_state(gm):
            return G.call(gm, args)

    shapes.declare_checked(gm, inputs, spec, run)


def _ref_dtype(outs: list[torch.Tensor]) -> torch.dtype:
    for o in outs:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            return o.dtype
    return torch.float32


class PassManager:
    """Run a pipeline of passes over a canonical graph module.

    pipeline: a preset name, a pipeline string (``"fold-constants,quantize{calibration=minmax}"``),
    or a list of names, Pass objects or callables. ``verify``: ``"each"`` checks every pass's
    contract, ``"final"`` only the end result against the captured model, ``"none"`` skips checks.
    ``on_failure``: ``"rollback"`` undoes a failing pass and goes on (named in the report),
    ``"raise"`` raises PassError / VerificationError. ``fixed_point=True`` repeats the pipeline
    until no pass changes the graph (at most ``max_iterations`` times). ``options`` sets pass
    options from Python: ``{"quantize": {"calibration": "histogram"}}``.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        verify: VerifyMode = "each",
        on_failure: Literal["rollback", "raise"] = "rollback",
        fixed_point: bool = False,
        max_iterations: int = 8,
        hooks: Sequence[Hook] = (),
        options: dict[str, dict[str, Any]] | None = None,
        synthesize: int = 2,
        seed: int = 0,
    ):
        if verify not in ("each", "final", "none"):
            raise PipelineError(f"verify must be 'each', 'final' or 'none', not {verify!r}")
        if on_failure not in ("rollback", "raise"):
            raise PipelineError(f"on_failure must be 'rollback' or 'raise', not {on_failure!r}")
        self.invocations = build_pipeline(pipeline, options)
        #: presets of the pipeline meant for inference: a model in training mode is refused
        self.inference_presets = inference_presets(pipeline)
        self.verify_mode = verify
        self.on_failure = on_failure
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.hooks = list(hooks)
        self.synthesize = synthesize
        self.seed = seed

    @property
    def pipeline_string(self) -> str:
        return ",".join(str(inv) for inv in self.invocations)

    def run(
        self,
        model: Any,
        example_inputs: Any,
        *,
        calibration_data: Iterable[Any] | None = None,
        budget: RewriteBudget | None = None,
        dynamic_shapes: Any = "batch",
    ) -> Result:
        """Capture ``model`` if needed (on a copy), run the pipeline, return module + report.

        ``dynamic_shapes`` declares the input dims the result stays generic over, as
        :func:`graphopt.capture` takes it (default: the batch dim); a graph module that
        recorded its dims at capture keeps them. Every check runs at the example's sizes and
        at a second size of each dynamic dim."""
        with G.collector_paused():
            return self._run(model, example_inputs, calibration_data=calibration_data, budget=budget,
                             dynamic_shapes=dynamic_shapes)

    def _run(
        self,
        model: Any,
        example_inputs: Any,
        *,
        calibration_data: Iterable[Any] | None,
        budget: RewriteBudget | None,
        dynamic_shapes: Any = "batch",
    ) -> Result:
        from graphopt.capture import capture, capture_notes, front_end

        inputs = G.as_input_tuple(example_inputs, model)
        clean: _Snapshot | _Unchanged | None = None  # the working module's state, if held already
        if isinstance(model, fx.GraphModule):
            # before anything runs it: a training-mode batch norm updates the caller's statistics
            notes = self._training_mode_notes(model)
            inputs = structure.graph_inputs(model, inputs)
            gm = _copy_graph_module(model)  # never mutate the caller's graph module
            if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
                G.propagate_shapes(gm, inputs)
            else:
                clean = _Unchanged(model)
            if not shapes.is_declared(gm):  # a graph captured elsewhere: declare, check it runs
                _declare_dims(gm, inputs, dynamic_shapes)
                clean = None
        else:
            gm = capture(model, inputs, dynamic_shapes=dynamic_shapes)
            notes = self._training_mode_notes(gm)
            captured = front_end(gm)
            if captured is not None and captured["symbolic_failure"]:
                notes.append(f"captured with {captured['front_end']}: symbolic tracing failed "
                             f"({captured['symbolic_failure']})")
        notes.extend(capture_notes(gm))
        inputs = structure.graph_inputs(gm, inputs)  # containers (dicts, lists, ...) as the graph's flat inputs
        budget = budget or RewriteBudget()
        report = Report(self.pipeline_string, notes=notes, shapes=shapes.describe(gm), checked_at=shapes.sizes_for(gm))
        start = time.perf_counter()
        check_inputs = verify.verification_inputs(inputs, synthesize=self.synthesize, seed=self.seed) \
            if self.verify_mode != "none" else [inputs]
        labels = verify.input_labels(len(check_inputs))
        resized = shapes.resized_inputs(gm, inputs) if self.verify_mode != "none" else None
        if resized is not None:  # every check also at a second size of each dynamic dim
            check_inputs.append(resized)
            labels.append(shapes.label(report.checked_at))
        reference = _run_all(gm, check_inputs) if self.verify_mode != "none" else None
        current_outs = reference

        lossy = False
        seen = graph_diff.view(gm)
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            any_change = False
            for inv in self.invocations:
                gm, current_outs, record, clean = self._run_one(
                    inv, gm, clean, inputs, check_inputs, labels, current_outs, calibration_data, budget, iteration
                )
                report.records.append(record)
                if record.changed or record.declines:
                    now = graph_diff.view(gm) if record.changed else seen
                    report.graphs[len(report.records) - 1] = (seen, now)
                    seen = now
                floor = getattr(inv.contract, "min_sqnr_db", None) if record.changed and inv.contract.lossy else None
                if floor is not None and (report.sqnr_floor_db is None or floor < report.sqnr_floor_db):
                    report.sqnr_floor_db = floor
                any_change |= record.changed
                lossy |= record.changed and inv.contract.lossy
                if record.check == "no budget" and inv.name not in report.unbudgeted:
                    report.unbudgeted.append(inv.name)
            if not any_change:
                break

        if self.verify_mode != "none":
            tol = verify.Tolerance(float("inf"), float("inf")) if lossy else None
            # with per-pass checks, the outputs of the last state checked are the final graph's
            final = current_outs if self.verify_mode == "each" else _run_all(gm, check_inputs)
            idx = [i for i, label in enumerate(labels)
                   if not lossy or _in_distribution(label) or shapes.is_resized_label(label)]
            report.final_verdict = verify.compare_outputs([reference[i] for i in idx], [final[i] for i in idx], tol,
                                                          input_labels=[labels[i] for i in idx])
            if not report.final_verdict.ok and self.on_failure == "raise":
                raise VerificationError(
                    f"the optimized graph no longer matches the captured model: {report.final_verdict}",
                    verdict=report.final_verdict,
                )
        report.seconds = time.perf_counter() - start
        return Result(gm, report)

    def _training_mode_notes(self, gm: fx.GraphModule) -> list[str]:
        """Refuse a training-mode graph for an inference pipeline (TrainingModeError, before any
        pass runs); for other pipelines, one note for the report."""
        parts = training_mode_parts(gm)
        if not parts:
            return []
        shown = "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")
        if self.inference_presets:
            presets = ", ".join(repr(p) for p in self.inference_presets)
            raise TrainingModeError(
                f"the model is in training mode ({shown}), but the pipeline ({presets}) optimizes for inference: "
                "its passes fold batch norms and constants and check every rewrite against outputs that training "
                "mode makes batch-dependent or random. Call model.eval() before graphopt.optimize "
                "(fine-tune after optimizing, e.g. with graphopt.passes.prune_channels.batch_norm_training)",
                parts=parts,
            )
        return [f"the model is in training mode ({shown}): passes that assume inference decline there, and "
                "verification compares outputs that differ from run to run, so rollbacks below may come from that "
                "and not from the pass they name. Call model.eval() first to optimize for inference"]

    # ------------------------------------------------------------------ one pass

    def _run_one(self, inv, gm, clean, inputs, check_inputs, labels, current_outs, calibration_data, budget, iteration):
        """Run one pass on ``gm``; returns the module to go on with, the outputs, the record and
        what ``clean`` (the state the returned module has, when held without a copy) becomes."""
        p = inv.pass_
        contract = inv.contract  # a budget option may set its figure for this invocation
        snapshot = clean if clean is not None else _Snapshot(gm)
        tensors = _tensors(gm)
        versions = _tensor_versions(tensors)
        before_fp = _fingerprint(gm, tensors)
        ctx = PassContext(
            pass_name=p.name, options=dict(inv.options), example_inputs=inputs,
            calibration_data=calibration_data, budget=budget,
        )
        nodes_before, bytes_before = _graph_nodes(gm), G.tensor_bytes(_read_tensors(gm, tensors))
        tensors_before = len(tensors)
        for h in self.hooks:
            h.before_pass(inv, gm, ctx)
        t0 = time.perf_counter()
        error: BaseException | None = None
        verdict = None
        rewrites = 0
        changed = False
        try:
            rewrites = p(gm, ctx)
            tensors = _tensors(gm)
            self._check_no_inplace(p.name, tensors, versions)
            changed = _fingerprint(gm, tensors) != before_fp
            if changed:
                gm.graph.lint()
                gm.recompile()
                G.propagate_shapes(gm, inputs)
        except GraphoptError as exc:
            error = exc
        except Exception as exc:  # a user pass may raise anything: name it, roll back
            error = PassError(
                f"pass {p.name!r} raised {type(exc).__name__}: {exc}\n"
                f"  at {_last_frame(exc)}\n  the graph was rolled back to its state before the pass",
                pass_name=p.name,
            )
            error.__cause__ = exc
        new_outs = current_outs
        if error is None and changed and self.verify_mode == "each":
            new_outs = _run_all(gm, check_inputs)
            tol = contract.tolerance(_ref_dtype(current_outs[0]))
            # a lossy budget (SQNR of int8, say) is only meaningful on inputs like the ones the
            # pass was calibrated for: judge it on the example and in-range synthesized inputs,
            # not on the x100 / x1e-3 / edge-value stress inputs
            idx = [i for i, label in enumerate(labels) if not contract.lossy or _in_distribution(label)]
            verdict = verify.compare_outputs([current_outs[i] for i in idx], [new_outs[i] for i in idx], tol,
                                             input_labels=[labels[i] for i in idx])
            reason = contract.check(verdict)
            if reason is None and contract.lossy:
                reason = _resized_reason(labels, current_outs, new_outs, verdict)
            if reason is not None:
                where = ""
                try:
                    failed = check_inputs[idx[verdict.failed_input or 0]]
                    before = snapshot.module()
                    with G.preserved_state(before), G.preserved_state(gm):  # both share tensors
                        div = verify.localize(before, gm, failed, tol)
                    if div is not None:
                        where = f"; first divergent node: {div}"
                        verdict.divergence = div
                except Exception:  # localization is best effort; the verdict stands
                    pass
                error = VerificationError(
                    f"pass {p.name!r} broke its {contract} contract: {reason}{where}. "
                    "The pass was rolled back; run graphopt.bisect to find the rewrite at fault.",
                    pass_name=p.name, verdict=verdict,
                )
        seconds = time.perf_counter() - t0
        if error is None:
            status = "changed" if changed else "unchanged"
        else:
            # the user's mistake (a bad option, bad calibration data), not the pass's: always raised
            fatal = self.on_failure == "raise" or isinstance(error, (OptionError, CalibrationDataError))
            changed, status = False, "failed" if fatal else "rolled-back"
        record = PassRecord(
            name=p.name, status=status, seconds=seconds, nodes_before=nodes_before,
            nodes_after=_graph_nodes(gm) if error is None else nodes_before,
            rewrites=max(rewrites, ctx.rewrites_granted) if error is None else 0,
            param_bytes_before=bytes_before,
            param_bytes_after=G.tensor_bytes(_read_tensors(gm, tensors)) if error is None else bytes_before,
            changed=changed, contract=str(contract), options=dict(inv.options),
            max_abs_error=verdict.max_abs if verdict is not None else None,
            min_sqnr_db=verdict.min_sqnr_db if verdict is not None else None,
            check=_check_word(error, changed, contract, verdict),
            error=str(error) if error else None, declines=ctx.declines, notes=ctx.notes,
            figures=ctx.figures, iteration=iteration,
            tensors_before=tensors_before, tensors_after=len(tensors) if error is None else tensors_before,
        )
        if error is not None:
            for h in self.hooks:
                h.on_failure(inv, gm, record, error)
            if fatal:
                raise error
            return snapshot.restore(), current_outs, record, None if snapshot.spent_by_restore else snapshot
        for h in self.hooks:
            h.after_pass(inv, gm, record)
        return gm, new_outs, record, None if changed else snapshot

    @staticmethod
    def _check_no_inplace(name: str, tensors: dict[str, torch.Tensor], versions: dict[str, tuple[int, int]]) -> None:
        now = _tensor_versions(tensors)
        for key, (tid, ver) in versions.items():
            if key in now and now[key][0] == tid and now[key][1] != ver:
                raise PassError(
                    f"pass {name!r} modified tensor {key!r} in place; passes must register new tensors "
                    "(graphopt.ir.graph.add_constant/add_parameter) so a failing pass can be rolled back. "
                    "The shared tensor is now changed and cannot be restored: re-capture the model.",
                    pass_name=name,
                )


def _check_word(error: BaseException | None, changed: bool, contract: Any, verdict: Any) -> str | None:
    """``PassRecord.check``: "no budget" for a lossy change nothing bounds (measured or not),
    "ok" for a verified contract, None when unchecked or failed."""
    if error is not None:
        return None
    if changed and contract.lossy and not contract.has_budget:
        return "no budget"
    return "ok" if verdict is not None else None


def training_mode_parts(gm: fx.GraphModule) -> list[str]:
    """Where ``gm`` computes differently than it would in eval mode, one description each:
    batch norms normalizing with batch statistics although they hold running statistics (and
    updating them on every call), active dropout, and modules kept as calls that are in
    training mode and behave differently there. Empty for an inference graph (a model whose
    ``training`` flag is set but changes nothing, such as a plain conv net, is not listed)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    from graphopt.ir import ops

    def behaves_differently(m: torch.nn.Module) -> bool:
        if not m.training:
            return False
        if isinstance(m, _DropoutNd):
            return m.p != 0
        if isinstance(m, (_BatchNorm, _InstanceNorm)):
            return m.track_running_stats or isinstance(m, _BatchNorm) and m.running_mean is not None
        if isinstance(m, (torch.nn.RNNBase, torch.nn.MultiheadAttention)):
            return float(getattr(m, "dropout", 0) or 0) > 0
        return False

    parts: list[str] = []
    for node in gm.graph.nodes:
        where = G.provenance(node)
        if ops.is_op(node, "batch_norm"):
            if ops.arg(node, "training") is not False and ops.arg(node, "running_mean") is not None:
                parts.append(f"batch norm {where!r} normalizes with batch statistics and updates its running ones")
        elif ops.is_op(node, "dropout"):
            if ops.arg(node, "training") is not False and ops.arg(node, "p") != 0:
                parts.append(f"dropout {where!r} zeroes values at random")
        elif node.op == "call_module":
            try:
                module = gm.get_submodule(str(node.target))
            except AttributeError:
                continue
            found = [type(m).__name__ for m in module.modules() if behaves_differently(m)]
            if found:
                parts.append(f"module {str(node.target)!r} ({type(module).__name__}) runs "
                             f"{', '.join(sorted(set(found)))} in training mode")
    return parts


def _last_frame(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return "<unknown>"
    f = tb[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


# --------------------------------------------------------------------------- entry points


def optimize(
    model: Any,
    example_inputs: Any,
    pipeline: Any = "mobile-fp32",
    *,
    verify: VerifyMode = "each",
    on_failure: Literal["rollback", "raise"] = "rollback",
    calibration_data: Iterable[Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    hooks: Sequence[Hook] = (),
    fixed_point: bool = False,
    dynamic_shapes: Any = "batch",
    progress: bool | None = None,
) -> Result:
    """Capture (if needed) and optimize ``model`` with ``pipeline``; returns ``Result``.
    ``dynamic_shapes``: the input dims the result stays generic over (see :func:`graphopt.capture`).
    ``progress``: a bar on stderr over capture and the passes (default: when stderr is a terminal)."""
    from graphopt.pipeline import progress as bar

    pm = PassManager(pipeline, verify=verify, on_failure=on_failure, options=options, hooks=hooks,
                     fixed_point=fixed_point)
    if not bar.wanted(progress) or fixed_point:  # a fixed point has no known number of steps
        return pm.run(model, example_inputs, calibration_data=calibration_data, dynamic_shapes=dynamic_shapes)
    with bar.PipelineProgress(len(pm.invocations), "optimizing", force=progress is True) as shown:
        pm.hooks.append(shown)
        return pm.run(model, example_inputs, calibration_data=calibration_data, dynamic_shapes=dynamic_shapes)


@dataclass
class BisectResult:
    """The first rewrite that breaks equivalence (``None`` fields when nothing breaks)."""

    total_rewrites: int
    first_bad: int | None  # 1-based index over all rewrites of the pipeline
    pass_name: str | None
    rewrite_in_pass: int | None  # 1-based within that pass
    description: str | None
    verdict: Any = None

    def __str__(self) -> str:
        if self.first_bad is None:
            return f"no rewrite breaks equivalence ({self.total_rewrites} rewrites checked)"
        return (f"rewrite {self.first_bad} of {self.total_rewrites} breaks equivalence: pass {self.pass_name!r}, "
                f"its rewrite #{self.rewrite_in_pass}: {self.description or '(no description)'}; {self.verdict}")


def bisect(model: Any, example_inputs: Any, pipeline: Any, *, tolerance: Any = None,
           calibration_data: Iterable[Any] | None = None) -> BisectResult:
    """Find the first rewrite of ``pipeline`` after which the graph stops matching ``model``.

    Like LLVM's opt-bisect: the pipeline is re-run with a global rewrite budget (passes ask
    ``ctx.may_rewrite`` before each rewrite) and the budget is binary-searched.
    """
    from graphopt.capture import capture

    inputs = G.as_input_tuple(example_inputs)
    if calibration_data is not None:
        calibration_data = list(calibration_data)  # every attempt re-runs the pipeline on it
    base = model if isinstance(model, fx.GraphModule) else capture(model, inputs)
    inputs = structure.graph_inputs(base, inputs)
    check_inputs = verify.verification_inputs(inputs, synthesize=2, seed=0)
    reference = _run_all(base, check_inputs)
    tol = tolerance
    pm = PassManager(pipeline, verify="none", on_failure="raise")

    def attempt(limit: int | None):
        budget = RewriteBudget(limit)
        gm = pm.run(base, inputs, calibration_data=calibration_data, budget=budget).module
        verdict = verify.compare_outputs(reference, _run_all(gm, check_inputs), tol)
        return verdict, budget

    verdict, budget = attempt(None)
    total = len(budget.granted)
    if verdict.ok:
        return BisectResult(total, None, None, None, None, verdict)
    zero_verdict, _ = attempt(0)
    if not zero_verdict.ok:
        return BisectResult(total, 0, None, None,
                            "the graph breaks with no rewrite granted: a pass changes it without asking "
                            "ctx.may_rewrite(), so bisection cannot narrow it down", zero_verdict)
    lo, hi = 0, total  # invariant: budget lo is good, budget hi is bad
    bad_verdict = verdict
    while hi - lo > 1:
        mid = (lo + hi) // 2
        v, _ = attempt(mid)
        if v.ok:
            lo = mid
        else:
            hi, bad_verdict = mid, v
    pass_name, description = budget.granted[hi - 1]
    within = sum(1 for n, _ in budget.granted[:hi] if n == pass_name)
    return BisectResult(total, hi, pass_name, within, description, bad_verdict)
