"""One lowering run, :func:`lower`: capture if needed, check the backend's requirements and the
inputs, stage the file, export and reload it in the runtime, and verify it on several input sets
(against the graph and, if given, the original model) before the file takes its place."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import GraphoptError, InputError, LoweringError, ModelRunError, exception_summary
from graphopt.fileio import atomic_write
from graphopt.ir import graph as G
from graphopt.ir import lazy, shapes, structure
from graphopt.lowering.artifact import Artifact
from graphopt.lowering.backend import Backend, _instantiate, get_backend
from graphopt.lowering.probe import _failure
from graphopt.lowering.support import collect_warnings, output_dtype
from graphopt.quantization.kernels import measured_for_unknown_gains

if TYPE_CHECKING:
    from graphopt.verify import Tolerance, Verdict


def lower(
    module: torch.nn.Module,
    example_inputs: Any,
    backend: str = "onnx",
    path: str | Path | None = None,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    reference: Callable[..., Any] | None = None,
    reference_tolerance: Tolerance | None = None,
    dynamic_shapes: Any = "batch",
    progress: bool | None = None,
    **options: Any,
) -> Artifact:
    """Lower ``module`` with ``backend`` to ``path``, reload it in the backend's runtime and
    check it against ``module`` on ``example_inputs`` and synthesized inputs.

    ``module`` is a canonical ``fx.GraphModule`` (used as is) or any ``nn.Module`` (captured
    first with :func:`graphopt.capture`). It runs in eval mode while it is lowered; its
    training flags are restored afterwards. ``path`` without a suffix gets the backend's
    (``.onnx``, ``.ptl``). ``options`` are the backend's (``Backend.options()``).

    A runtime whose outputs differ from the graph's beyond ``tolerance`` (default: the
    backend's :meth:`Backend.default_tolerance`, e.g. a few quantization steps of the output
    for an int8 graph, else the per-dtype one of :meth:`graphopt.verify.Tolerance.for_dtype`;
    pass a looser one where the runtime legitimately computes differently) is a failed lowering:
    :class:`LoweringError` with the verdict, and ``path`` is left as it was. ``verify=False``
    skips the comparison (``artifact.verdict`` is then None) but still loads the file once in
    the runtime.

    Dynamic dims: the graph's (declared at capture, see :mod:`graphopt.ir.shapes`; a graph module
    that has none recorded gets ``dynamic_shapes``, checked) stay dynamic in the file where the
    backend can keep them, and the artifact is also verified with every dynamic dim at its
    second size. A backend that baked the example's shapes in says so in
    ``report["static_shapes"]``. ``reference`` (the original model, say) is run on the same
    input sets and the artifact compared with it too, within ``reference_tolerance`` (default:
    twice the lowering's tolerance for a float graph, the runtime's error and the pipeline's
    added; for an int8 graph only shapes are held, its
    distance from the float model being the quantizer's to report): the verdicts are in
    ``report["against_reference"]``. Pass ``Tolerance(math.inf, math.inf)`` for a pruned graph.

    Raises :class:`UnknownBackendError` (with close names), :class:`InputError` when the
    inputs do not fit the module, and :class:`LoweringError` for bad options, an unwritable
    path, nodes the backend cannot take (each named with its source line) and wrong results.

    ``progress``: a bar on stderr over capture, export, load and verify (default: when stderr
    is a terminal; ``False`` silences it, ``True`` forces it).
    """
    from graphopt.pipeline import progress as bar

    total = 2 + bool(verify) + (not isinstance(module, fx.GraphModule))
    with bar.stages(f"lowering to {backend}", total, progress) as step:
        return _lower(module, example_inputs, backend, path, verify, tolerance, reference, reference_tolerance,
                      dynamic_shapes, step, options)


def _lower(module, example_inputs, backend, path, verify, tolerance, reference, reference_tolerance,
           dynamic_shapes, step, options) -> Artifact:
    started = time.perf_counter()
    backend_cls = get_backend(backend)
    missing = backend_cls.unavailable()
    if missing is not None:
        raise LoweringError(f"{backend}: cannot run on this machine: {missing}")
    lowering = _instantiate(backend_cls, options)
    if path is None:
        raise LoweringError(f"lower(..., backend={backend!r}) needs path=, e.g. path='model{backend_cls.suffix}'")
    target = Path(path)
    if target.is_dir():
        raise LoweringError(
            f"{backend}: cannot write {target}: it is a directory; give a file path such as "
            f"{target / ('model' + backend_cls.suffix)}"
        )
    if not target.suffix:
        target = target.with_name(target.name + backend_cls.suffix)
    inputs = G.as_input_tuple(example_inputs, module)
    if not isinstance(module, fx.GraphModule):
        step("capture")
    gm = module if isinstance(module, fx.GraphModule) else _capture(module, inputs, dynamic_shapes)
    layout = structure.layout_of(gm.graph)
    if layout is not None:  # the graph takes the containers' tensors flat; so does the file
        inputs = layout.flat(inputs, {})
        if reference is not None:
            reference = _structured_reference(reference, layout)
    if not shapes.is_declared(gm):
        gm = _declared_copy(gm, inputs, dynamic_shapes)
    _check_requirements(backend_cls, gm)

    report: dict[str, Any] = {
        "backend": backend, "path": str(target), "options": {**backend_cls.options(), **options},
        "warnings": [], "timings_s": {},
    }
    from graphopt.capture import capture_notes

    if capture_notes(gm):  # what capture chose for the user (use_cache=False, ...)
        report["notes"] = capture_notes(gm)
    if backend_cls.suffix and target.suffix != backend_cls.suffix:
        report["warnings"].append(f"path {target} does not end in {backend_cls.suffix}, the usual suffix for {backend}")

    with _eval_mode(gm):
        output_spec = _check_inputs(gm, inputs)
        with _staged_output(target, backend) as staged:
            try:
                with collect_warnings(report["warnings"]):
                    step("export")
                    with _timed(report, "export"):
                        lowering.export(gm, inputs, staged, report)
                    step("load")
                    with _timed(report, "load"):
                        runner = lowering.load(staged, report)
            except LoweringError as exc:  # the backend's own account of the failure
                raise _failure(lowering, gm, inputs, str(exc).removeprefix(f"{backend}: ")) from exc
            except GraphoptError:
                raise
            except Exception as exc:  # exporters/runtimes raise anything: it becomes a LoweringError
                raise _failure(lowering, gm, inputs, f"writing or loading the file failed: {exception_summary(exc)}") from exc
            size = sum(f.stat().st_size for f in staged.parent.iterdir())
            if verify:
                step("verify")
                if tolerance is None:
                    tolerance, note = measured_for_unknown_gains(gm, lowering.default_tolerance(gm), [inputs])
                    if note:
                        report.setdefault("notes", []).append(note)
                verdict = _verify(lowering, gm, runner, inputs, tolerance, report, reference, reference_tolerance)
            else:
                verdict = None

    report["wall_time_s"] = round(time.perf_counter() - started, 3)
    return Artifact(target, backend, size, verdict, report, runner, output_spec, layout)


def _structured_reference(reference: Callable[..., Any], layout: structure.InputLayout) -> Callable[..., Any]:
    """``reference`` (the model, taking containers) called with the graph's flat inputs."""

    def flat_reference(*tensors: Any) -> Any:
        return reference(*layout.arguments(tensors))

    flat_reference.__qualname__ = getattr(reference, "__qualname__", type(reference).__name__)
    return flat_reference


def _check_requirements(backend_cls: type[Backend], gm: fx.GraphModule) -> None:
    for need in backend_cls.requires:
        reason = need.pending(gm)
        if reason:
            raise LoweringError(
                f"{backend_cls.name}: the graph needs pass {need.pass_name!r} before this backend: {reason}"
                + (f" ({need.why})" if need.why else "")
                + f". Add it to the pipeline, e.g. optimize(..., pipeline='...,{need.pass_name}')."
            )


def _capture(module: torch.nn.Module, inputs: tuple[Any, ...], dynamic_shapes: Any) -> fx.GraphModule:
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"lower() takes an nn.Module or fx.GraphModule, not {type(module).__name__}")
    from graphopt.capture import capture

    return capture(module, inputs, dynamic_shapes=dynamic_shapes)


def _declared_copy(gm: fx.GraphModule, inputs: tuple[Any, ...], spec: Any) -> fx.GraphModule:
    """A graph module over a copy of ``gm``'s graph (the caller's stays as it is) with
    ``spec``'s dynamic dims recorded, checked by running it at the second sizes."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    copied = lazy.graph_module(gm, graph, class_name=type(gm).__name__)

    def run(args: tuple[Any, ...]) -> Any:
        with torch.no_grad(), G.preserved_state(copied):
            return G.call(copied, args)

    shapes.declare_checked(copied, inputs, spec, run)
    return copied


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode inside the block and restore every submodule's flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _check_inputs(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> pytree.TreeSpec:
    """Run the graph once on the inputs (InputError if it cannot); the structure of its outputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # a placeholder's args hold its default
    if not len(required) <= len(inputs) <= len(placeholders):
        raise InputError(
            f"the graph takes {len(required)} input(s) ({', '.join(n.name for n in placeholders)}) but "
            f"{len(inputs)} example input(s) were given; pass one per forward argument, in order"
        )
    try:
        with torch.no_grad():
            outputs = gm(*inputs)
    except Exception as exc:
        raise InputError(
            f"the graph raised on the example inputs ({G.describe_values(inputs)}): {exception_summary(exc)}; "
            "pass inputs of the shapes and dtypes the model was captured with"
        ) from exc
    return pytree.tree_flatten(outputs)[1]


@contextlib.contextmanager
def _staged_output(target: Path, backend: str) -> Iterator[Path]:
    """:func:`atomic_write` whose own file-system failures become a :class:`LoweringError`."""
    try:
        with atomic_write(target) as staged:
            yield staged
    except OSError as exc:
        raise LoweringError(
            f"{backend}: cannot write {target}: {exc.strerror or exc}. Choose a path in an existing "
            "directory you may write to."
        ) from exc


@contextlib.contextmanager
def _timed(report: dict[str, Any], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        report["timings_s"][step] = round(time.perf_counter() - start, 3)


def _input_sets(lowering: Backend, gm: fx.GraphModule, inputs: tuple[Any, ...],
                report: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """The backend's input sets, then the example with every dynamic dim at its second size
    (unless the backend baked the example's shapes in: ``report["static_shapes"]``)."""
    sets = list(lowering.verification_inputs(inputs))
    sizes = shapes.sizes_for(gm)
    resized = shapes.resized_inputs(gm, inputs, sizes)
    if resized is not None and "static_shapes" not in report:
        sets.append((f"inputs at {', '.join(f'{k}={v}' for k, v in sizes.items())}", resized))
    report["dynamic_dims"] = shapes.describe(gm)
    return sets


def _verify(
    lowering: Backend, gm: fx.GraphModule, runner: Callable[..., Any], inputs: tuple[Any, ...],
    tolerance: Tolerance | None, report: dict[str, Any], reference: Callable[..., Any] | None = None,
    reference_tolerance: Tolerance | None = None,
) -> Verdict:
    """Compare the runtime with the graph (and with ``reference``) on every input set; the
    first verdict."""
    from graphopt import verify

    verdicts = {}
    with _timed(report, "verify"):
        for label, check_inputs in _input_sets(lowering, gm, inputs, report):
            try:
                verify.run(gm, check_inputs)
            except ModelRunError as exc:
                raise LoweringError(
                    f"{lowering.name}: the graph itself fails on the {label}, so the options "
                    f"{report['options']} cannot be honoured: {exc}"
                ) from exc
            verdict = verify.compare(gm, runner, check_inputs, tolerance=tolerance, localize=False)
            verdicts[label] = verdict
            report.setdefault("verification", {})[label] = verdict.to_dict()
            if not verdict.ok:
                raise _failure(
                    lowering, gm, inputs,
                    f"{lowering.runtime} gives different results from the graph on the {label}: {verdict}",
                )
            if reference is not None:
                if reference_tolerance is None:
                    # an int8 graph: its distance from the float model is the quantizer's to report
                    from graphopt.quantization.qdq import has_qdq

                    reference_tolerance = verify.Tolerance(math.inf, math.inf) if has_qdq(gm) else \
                        _two_steps(tolerance or verify.Tolerance.for_dtype(output_dtype(gm)))
                _against_reference(lowering, gm, reference, runner, label, check_inputs, reference_tolerance, report)
    return next(iter(verdicts.values()))


def _two_steps(tolerance: Tolerance) -> Tolerance:
    """The file against the model is two checked steps: the runtime against the graph (within
    ``tolerance``) and the graph against the model (the pipeline's check, within the same), so
    the errors may add. One tolerance for both refused timm's regnety_004 in the lite
    interpreter at 1.3e-4 of its largest output on a x100 input (78 dB)."""
    return type(tolerance)(rtol=2 * tolerance.rtol, atol=2 * tolerance.atol)


def _against_reference(lowering: Backend, gm: fx.GraphModule, reference: Callable[..., Any],
                       runner: Callable[..., Any], label: str, check_inputs: tuple[Any, ...],
                       tolerance: Tolerance | None, report: dict[str, Any]) -> None:
    """Compare the runtime with the original model on one input set (see :func:`lower`)."""
    from graphopt import verify

    with _eval_mode(reference) if isinstance(reference, torch.nn.Module) else contextlib.nullcontext():
        verdict = verify.compare(reference, runner, check_inputs, tolerance=tolerance, localize=False)
    report.setdefault("against_reference", {})[label] = verdict.to_dict()
    if not verdict.ok:
        raise _failure(lowering, gm, check_inputs,
                       f"{lowering.runtime} gives different results from the original model on the {label}: {verdict}")
