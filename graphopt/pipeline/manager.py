"""The PassManager: runs a pipeline of passes with lint, shape propagation, verification of
each pass's contract, rollback of failing passes, instrumentation hooks and a report.

Rollback is cheap: before a pass the manager takes a *snapshot* (a copy of the graph and of
the module containers, sharing the tensors), unless it holds one of the current state already
(the caller's graph module, or the snapshot before a pass that changed nothing). Passes must
therefore never modify a tensor in place; the manager checks tensor version counters and names
a pass that does.

The records and the report are :mod:`graphopt.pipeline.report`, hooks :mod:`graphopt.pipeline.hooks`,
snapshots and fingerprints :mod:`graphopt.pipeline.snapshot`, bisection :mod:`graphopt.pipeline.bisect`.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.ir import shapes, structure
from graphopt.ir import diff as graph_diff
from graphopt.errors import CalibrationDataError, GraphoptError, OptionError, PassError, PipelineError, VerificationError
from graphopt.errors import TrainingModeError
from graphopt.pipeline.hooks import Hook
from graphopt.pipeline.passes import PassContext, RewriteBudget
from graphopt.pipeline.report import PassRecord, Report
from graphopt.pipeline.snapshot import (
    _copy_graph_module,
    _fingerprint,
    _graph_nodes,
    _read_tensors,
    _Snapshot,
    _tensor_versions,
    _tensors,
    _Unchanged,
)
from graphopt.pipeline.spec import build_pipeline, inference_presets
from graphopt.verify.history import RunHistory

VerifyMode = Literal["each", "final", "none"]


class _LazyVerify:
    """graphopt.verify, imported on first use (keeps `import graphopt` light)."""

    def __getattr__(self, name: str):
        from graphopt import verify as module

        return getattr(module, name)


verify = _LazyVerify()


@dataclass
class Result:
    """What a pipeline run returns."""

    module: fx.GraphModule
    report: Report

    def __iter__(self):  # allows `gm, report = pm.run(...)`
        return iter((self.module, self.report))

    def explore(self, *, port: int = 8080, open_browser: bool = True) -> None:
        """Open each state of the graph in Model Explorer (:func:`graphopt.view.explorer.explore`);
        the run must have kept its graphs (``keep_graphs=True``)."""
        from graphopt.view.explorer import explore

        explore(self.report, port=port, open_browser=open_browser)


# --------------------------------------------------------------------------- manager


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

    ``keep_graphs=True`` keeps a structural view of the graph after every pass that changed it
    (``Report.graphs``, what the HTML report and Model Explorer draw); off by default, since
    building the views costs time on large graphs. ``numeric_history`` (default: on with
    ``verify="each"``) records, after each pass that changed the values, every node's error
    against the original graph (``Report.numeric_history``); it needs ``verify="each"``.
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
        keep_graphs: bool = False,
        numeric_history: bool | None = None,
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
        self.keep_graphs = keep_graphs
        if numeric_history and verify != "each":
            raise PipelineError(f"numeric_history=True needs verify='each' (it measures each pass's result), "
                                f"not verify={verify!r}")
        self.numeric_history = verify == "each" if numeric_history is None else numeric_history

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
        if calibration_data is not None and not isinstance(calibration_data, torch.Tensor):
            calibration_data = structure.StructuredBatches(gm, model, calibration_data)  # batches as the model takes them
        budget = budget or RewriteBudget()
        report = Report(self.pipeline_string, notes=notes, shapes=shapes.describe(gm), checked_at=shapes.sizes_for(gm),
                        graphs_kept=self.keep_graphs)
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
        seen = graph_diff.view(gm) if self.keep_graphs else None
        history = RunHistory([check_inputs[i] for i, label in enumerate(labels) if _in_distribution(label)]) \
            if self.numeric_history else None
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            any_change = False
            for inv in self.invocations:
                gm, current_outs, record, clean, before = self._run_one(
                    inv, gm, clean, inputs, check_inputs, labels, current_outs, calibration_data, budget, iteration
                )
                report.records.append(record)
                if history is not None:
                    errors = history.after(before, gm, record, inv.contract)
                    if errors is not None:
                        report.numeric_history[len(report.records) - 1] = errors
                if self.keep_graphs and (record.changed or record.declines):
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
        if history is not None and history.stopped:
            report.notes.append(history.stopped)

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
            return snapshot.restore(), current_outs, record, None if snapshot.spent_by_restore else snapshot, None
        for h in self.hooks:
            h.after_pass(inv, gm, record)
        return gm, new_outs, record, None if changed else snapshot, snapshot

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
    keep_graphs: bool = False,
    numeric_history: bool | None = None,
) -> Result:
    """Capture (if needed) and optimize ``model`` with ``pipeline``; returns ``Result``.
    ``dynamic_shapes``: the input dims the result stays generic over (see :func:`graphopt.capture`).
    ``keep_graphs``: keep the graph after each pass that changed it, for ``report.save_html`` and
    ``Result.explore``; ``numeric_history``: per-node error against the original graph after
    each pass (default: with ``verify="each"``; see :class:`PassManager`).
    ``progress``: a bar on stderr over capture and the passes (default: when stderr is a terminal)."""
    from graphopt.pipeline import progress as bar

    pm = PassManager(pipeline, verify=verify, on_failure=on_failure, options=options, hooks=hooks,
                     fixed_point=fixed_point, keep_graphs=keep_graphs, numeric_history=numeric_history)
    if not bar.wanted(progress) or fixed_point:  # a fixed point has no known number of steps
        return pm.run(model, example_inputs, calibration_data=calibration_data, dynamic_shapes=dynamic_shapes)
    with bar.PipelineProgress(len(pm.invocations), "optimizing", force=progress is True) as shown:
        pm.hooks.append(shown)
        return pm.run(model, example_inputs, calibration_data=calibration_data, dynamic_shapes=dynamic_shapes)
