"""Lowering: write a graph to a mobile runtime's file format, reload it there, verify it.

    artifact = graphopt.lower(gm, example_inputs, backend="onnx", path="model.onnx")
    artifact.verdict.ok, artifact.size_bytes, artifact.report["op_counts"], artifact.run(x)

:func:`lower` is the same for every backend: it stages the output file next to ``path``
(:func:`graphopt.fileio.atomic_write`), asks the backend to write it and to load it back in the
backend's own runtime, compares that runtime's outputs with the graph's
(:func:`graphopt.verify.compare`), and only then moves the file into place. A failure at any
step, wrong results included, raises :class:`~graphopt.errors.LoweringError` and leaves ``path``
as it was. The error names every node the backend cannot take, with the user's source line,
found by offering the backend each node alone (:meth:`Backend.probe`).

A backend is a dataclass subclass of :class:`Backend` whose fields are its options, registered
by name::

    @graphopt.register_backend("my-runtime")
    @dataclass
    class MyRuntime(Backend):
        '''One line shown by `graphopt backends`.'''
        suffix = ".bin"
        fast_math: bool = False                       # lower(..., fast_math=True)

        def export(self, gm, example_inputs, path, report): ...   # write the file at ``path``
        def load(self, path, report): ...                         # -> callable(*inputs)

This module never imports a particular backend. The built-ins register themselves when the
package ``graphopt.backends`` is imported; third-party packages declare theirs as Python entry
points in the group ``graphopt.backends``, naming a module that registers its backends or a
Backend class (registered under the entry point's name)::

    [project.entry-points."graphopt.backends"]
    my-runtime = "my_package.backend:MyRuntime"
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import inspect
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir import graph as G
from graphopt.ir import lazy, shapes
from graphopt.registry import Registry
from graphopt.errors import (
    ANSI_ESCAPE,
    GraphoptError,
    InputError,
    LoweringError,
    ModelRunError,
    UnknownBackendError,
    UnsupportedNodesError,
    exception_summary,
)
from graphopt.fileio import atomic_write
from graphopt.ir import structure

if TYPE_CHECKING:
    from graphopt.verify import Tolerance, Verdict

__all__ = [
    "Artifact",
    "Backend",
    "OffendingNode",
    "Requires",
    "available_backends",
    "collect_warnings",
    "other_kernels_tolerance",
    "output_dtype",
    "exception_summary",
    "get_backend",
    "lower",
    "offending_nodes",
    "recording_warnings",
    "register_backend",
    "tracer_warning",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "graphopt.backends"

# ----------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Requires:
    """A pass a backend needs run before it lowers a graph.

    ``pending(gm)`` says why ``gm`` still needs the pass (None: it does not); :func:`lower`
    raises :class:`LoweringError` naming the pass and the reason. A backend states what it
    needs; it does not run passes of its choosing behind the user's pipeline.
    """

    pass_name: str
    pending: Callable[[fx.GraphModule], str | None]
    why: str = ""


class Backend:
    """Base class of lowering backends.

    Subclasses are dataclasses: their fields are the options :func:`lower` accepts as keyword
    arguments (validate values in ``__post_init__`` and raise :class:`LoweringError`). One
    instance serves one call of :func:`lower`, so it may keep state between the calls below.
    The class docstring's first line is what ``graphopt backends`` shows.
    """

    #: registry name, set by :func:`register_backend`
    name: ClassVar[str] = ""
    #: file suffix :func:`lower` appends to a ``path`` that has none
    suffix: ClassVar[str] = ""
    #: passes the graph must have been through (checked by :func:`lower`, see :class:`Requires`)
    requires: ClassVar[tuple[Requires, ...]] = ()
    #: what runs the file, for messages ("ONNX Runtime")
    runtime: ClassVar[str] = "the backend's runtime"
    #: what to tell the user whose graph holds nodes this backend cannot take
    unsupported_advice: ClassVar[str] = (
        "rewrite these nodes with operations the backend supports, or lower with another backend"
    )

    def export(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        """Write ``gm`` to ``path`` (a staged path; side files may be written next to it).

        Record what happened in ``report`` (which exporter, fallbacks and why, op counts). The
        graph module must not be modified. Any exception means the export failed: :func:`lower`
        turns it into a :class:`LoweringError` naming the nodes :meth:`probe` rejects.
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement export()")

    def load(self, path: Path, report: dict[str, Any]) -> Callable[..., Any]:
        """Load ``path`` in the backend's runtime; return a callable taking the example inputs
        positionally and returning tensors or numpy arrays (nested in tuples/lists/dicts)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement load()")

    def verification_inputs(self, example_inputs: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        """``(label, inputs)`` sets the loaded artifact must match the graph on (each one is
        also varied by :func:`graphopt.verify.compare`). Override to check more, e.g. another
        batch size for a file exported with a dynamic batch dimension."""
        return [("example inputs", example_inputs)]

    def default_tolerance(self, gm: fx.GraphModule) -> Tolerance | None:
        """The tolerance :func:`lower` verifies with when the caller gave none; None means the
        per-dtype default. Override where the runtime legitimately computes differently from
        the graph, e.g. a quantized graph run on the runtime's own int8 kernels."""
        return None

    def probe(self, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        """Why this backend cannot take ``module``, a graph of one node of the lowered graph
        fed with that node's example values, or None when it can. The default cannot tell."""
        return None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run on this machine (an optional package missing, with the
        command that installs it), or None when it can. :func:`lower` raises
        :class:`LoweringError` with this reason; ``graphopt demo`` skips the backend and says why."""
        return None

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        } if dataclasses.is_dataclass(cls) else {}


BACKENDS: Registry[type[Backend]] = Registry(
    "backend", builtins="graphopt.backends", group=ENTRY_POINT_GROUP, error=LoweringError,
    unknown_error=UnknownBackendError, listed_by="graphopt backends",
    adopt=lambda name, obj: _adopt_plugin(name, obj),
)


def _adopt_plugin(name: str, obj: object) -> None:
    """An entry point naming a Backend class registers it under the entry point's name, unless
    its module's decorator registered it already."""
    if inspect.isclass(obj) and issubclass(obj, Backend) and obj not in BACKENDS.items_now().values():
        register_backend(name)(obj)


def register_backend(name: str, *, replace: bool = False) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator registering a :class:`Backend` subclass under ``name`` (kebab-case)."""
    BACKENDS.check_name(name)

    def decorate(cls: type[Backend]) -> type[Backend]:
        if not (inspect.isclass(cls) and issubclass(cls, Backend)):
            raise LoweringError(f"@register_backend({name!r}) decorates a subclass of graphopt.Backend, not {cls!r}")
        if dataclasses.is_dataclass(cls):
            required = [f.name for f in dataclasses.fields(cls)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if required:
                raise LoweringError(f"backend {name!r}: every option needs a default value; {required} have none")
        BACKENDS.add(name, cls, replace=replace, same=lambda a, b: a.__qualname__ == b.__qualname__,
                     where=lambda c: f"{c.__module__}.{c.__qualname__}")
        cls.name = name
        return cls

    return decorate


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name`` (no error if there is none)."""
    BACKENDS.remove(name)


def available_backends() -> dict[str, type[Backend]]:
    """Every registered backend class by name: built-ins, plug-ins and user registrations."""
    return BACKENDS.items()


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``; :class:`UnknownBackendError` with suggestions."""
    return BACKENDS.get(name)


def _instantiate(cls: type[Backend], options: dict[str, Any]) -> Backend:
    known = cls.options()
    unknown = [key for key in options if key not in known]
    if unknown:
        key = unknown[0]
        hints = difflib.get_close_matches(key, list(known), n=1)
        raise LoweringError(
            f"backend {cls.name!r} has no option {key!r}"
            + (f"; did you mean {hints[0]!r}?" if hints else "")
            + f" Its options: {', '.join(f'{k}={v!r}' for k, v in known.items()) or 'none'}."
        )
    return cls(**options)

# ------------------------------------------------------------------------------ the artifact


@dataclass
class Artifact:
    """A lowered model on disk, verified in its runtime (``verdict`` is None with verify=False).

    ``report`` is JSON-serializable: ``wall_time_s``, ``timings_s`` per step, ``warnings``
    collected from torch and the exporters (not printed), ``op_counts`` and ``node_count`` of
    the written graph, ``verification`` (one verdict dict per input set) and what the backend
    adds (exporter used and why it fell back, XNNPACK availability, ...).
    """

    path: Path
    backend: str
    size_bytes: int
    verdict: Verdict | None
    report: dict[str, Any]
    _runner: Callable[..., Any] = field(repr=False)
    _output_spec: pytree.TreeSpec = field(repr=False)
    _input_layout: structure.InputLayout | None = field(default=None, repr=False)

    def run(self, *inputs: Any, **named: Any) -> Any:
        """Run the artifact in its runtime (the session that was verified); outputs are tensors
        arranged like the graph's outputs. Inputs are passed as to the graph: containers
        (dicts, lists, dataclasses) as the model takes them, or their tensors flat. The built-in
        backends' runtimes use the thread count torch had when the artifact was lowered
        (``torch.set_num_threads``)."""
        if self._input_layout is not None:
            inputs = self._input_layout.flat(inputs, named)
        elif named:
            raise InputError("this artifact takes its inputs positionally, in forward's order")
        leaves = [torch.from_numpy(np.asarray(v)) if isinstance(v, (np.ndarray, np.generic)) else v
                  for v in pytree.tree_leaves(self._runner(*inputs))]
        if len(leaves) != self._output_spec.num_leaves:
            return leaves
        return pytree.tree_unflatten(leaves, self._output_spec)

    def __str__(self) -> str:
        verification = "not verified (verify=False)" if self.verdict is None else f"verified in its runtime: {self.verdict}"
        summary = self.report.get("summary")
        return (
            f"{self.backend}: {self.path} ({self.size_bytes / 1024:.1f} KiB, {self.report.get('node_count', '?')} ops, "
            f"{self.report.get('wall_time_s', 0.0):.2f} s)"
            + (f"; {summary}" if summary else "")
            + f"\n  {verification}"
        )

# --------------------------------------------------------------------------------- lowering


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
    the lowering's tolerance for a float graph; for an int8 graph only shapes are held, its
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
                    tolerance = lowering.default_tolerance(gm)
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

                    reference_tolerance = verify.Tolerance(math.inf, math.inf) if has_qdq(gm) else tolerance
                _against_reference(lowering, gm, reference, runner, label, check_inputs, reference_tolerance, report)
    return next(iter(verdicts.values()))


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



@dataclass(frozen=True)
class OffendingNode:
    """A node the backend cannot take, and why."""

    node: str
    op: str
    source_line: str | None
    reason: str

    def __str__(self) -> str:
        where = f"at {self.source_line}" if self.source_line else "(source line unknown)"
        return f"node {self.node!r} ({self.op}) {where}: {self.reason}"


def _failure(lowering: Backend, gm: fx.GraphModule, inputs: tuple[Any, ...], headline: str) -> LoweringError:
    """What failed, every node the backend rejects when offered alone, and what to do:
    :class:`UnsupportedNodesError` when such nodes exist, else :class:`LoweringError`."""
    offenders = offending_nodes(lowering, gm, inputs)
    if not offenders:
        return LoweringError(
            f"{lowering.name}: {headline}\nNo node is rejected when offered to the backend alone, so the "
            "failure comes from the graph as a whole or from an option: try other options or another backend, "
            "and report the model if it should lower."
        )
    lines = [f"{lowering.name}: {headline}", f"{len(offenders)} node(s) this backend cannot take:"]
    lines += [f"  - {o}" for o in offenders]
    lines.append(f"What to do: {lowering.unsupported_advice}.")
    return UnsupportedNodesError("\n".join(lines), nodes=offenders)


def offending_nodes(lowering: Backend, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[OffendingNode]:
    """Every computing node of ``gm`` that ``lowering.probe`` rejects when offered alone.

    Nodes whose inputs or output are not tensors (``getitem`` of a tuple, ``size()``) are not
    offered. Identical nodes (same op, constant arguments and input shapes) are probed once.
    """
    with collect_warnings([]):  # what the probes make torch say is noise for the user
        return _probe_nodes(lowering, gm, example_inputs)


def _probe_nodes(lowering: Backend, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[OffendingNode]:
    values = _node_values(gm, example_inputs)
    verdicts: dict[Any, str | None] = {}
    offenders = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node not in values:
            continue
        try:
            probe = _one_node_module(gm, node, values)
        except Exception:  # a node FX cannot copy alone is not offered
            probe = None
        if probe is None:
            continue
        module, inputs, key = probe
        if key not in verdicts:
            try:
                verdicts[key] = lowering.probe(module, inputs)
            except Exception as exc:  # a probe that crashes is itself a rejection
                verdicts[key] = exception_summary(exc)
        if verdicts[key] is not None:
            offenders.append(OffendingNode(node.name, _describe_node(gm, node), G.source_line(node), verdicts[key]))
    return offenders


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = result = super().run_node(n)
        return result


def _node_values(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, Any]:
    """The value of every node on ``inputs``."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def _is_literal(value: Any) -> bool:
    """Values FX can write into generated code as constants."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_literal(v) for v in value)


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _one_node_module(
    gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]
) -> tuple[fx.GraphModule, tuple[Any, ...], Any] | None:
    """A graph module computing only ``node`` from placeholders, its inputs, and a dedup key."""
    if not _is_tensors(values.get(node)):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs, shapes = [], []
    for source in node.all_input_nodes:
        value = values.get(source)
        if source.op == "get_attr":
            env[source] = graph.get_attr(source.target)
        elif isinstance(value, torch.Tensor):
            env[source] = graph.placeholder(source.name)
            inputs.append(value)
        elif _is_literal(value):
            env[source] = value
        else:
            return None
        shapes.append((tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else repr(value))
    copy = graph.node_copy(node, lambda n: env[n])
    graph.output(copy)
    module = fx.GraphModule(gm, graph)
    target = repr(gm.get_submodule(node.target)) if node.op == "call_module" else str(node.target)
    constants = repr(fx.node.map_arg((node.args, node.kwargs), lambda n: "%"))
    return module, tuple(inputs), (node.op, target, constants, tuple(shapes))


def _describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}: {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"call_function {module + '.' if module and module != 'builtins' else ''}{name}"


# ---------------------------------------------------------------------- helpers for backends


def other_kernels_tolerance(dtype: torch.dtype = torch.float32) -> Tolerance:
    """The tolerance for a float graph whose outputs are ``dtype``, run on another library's
    kernels: ten times float32's default for float32 and float64 outputs. Such kernels sum in
    other orders and compute normalization statistics their own way, which shows on
    near-constant input: ONNX Runtime's batch norm with batch statistics was 1.8e-4 of
    max|output| away on a generated model (where torch's own float32 is 1e-6 from float64),
    ExecuTorch's layer norm 1.3e-4. A wrong lowering is off by far more.

    float16 and bfloat16 outputs get their dtype's own default
    (:meth:`graphopt.verify.Tolerance.for_dtype`), which already allows several units in the
    last place: there the rounding of each intermediate result (and whether a kernel keeps a
    wider accumulator) outweighs the order of summation. :func:`output_dtype` says which
    dtype a graph's outputs have."""
    from graphopt.verify import Tolerance

    if dtype in (torch.float16, torch.bfloat16):
        return Tolerance.for_dtype(dtype)
    base = Tolerance.for_dtype(torch.float32)
    return Tolerance(rtol=10 * base.rtol, atol=10 * base.atol)


def output_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The least precise floating dtype among ``gm``'s outputs (from their recorded shape
    metadata; float32 when none is floating)."""
    output = next(iter(reversed(gm.graph.nodes)))
    dtypes = [G.tensor_meta(n).dtype for n in pytree.tree_leaves(output.args[0])
              if isinstance(n, fx.Node) and G.tensor_meta(n) is not None and G.tensor_meta(n).dtype.is_floating_point]
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)




class _WarningRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


#: loggers whose warnings exporters print while they run; collected instead
_NOISY_LOGGERS: Sequence[str] = ("torch.onnx", "torch.export", "torch._export", "torch.jit", "onnxscript")


@contextlib.contextmanager
def collect_warnings(sink: list[str]) -> Iterator[None]:
    """Record Python warnings and exporter log warnings raised in the block into ``sink``
    (first line of each, once) instead of printing them."""
    handler = _WarningRecords()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [(lg, lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:  # torch gives some of these loggers their own stderr handler: swap it out
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        messages = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages
        for message in messages:
            text = ANSI_ESCAPE.sub("", message).strip()
            first = " ".join(text.splitlines()[0].split()) if text else message
            if first not in sink:
                sink.append(first)


@contextlib.contextmanager
def recording_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings raised in the block into the yielded list for the caller to inspect,
    then warn them again (also when the block raises) so an enclosing :func:`collect_warnings`
    keeps them too."""
    seen: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield caught
            finally:
                seen = list(caught)
    finally:
        for w in seen:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def tracer_warning(caught: Sequence[warnings.WarningMessage]) -> str | None:
    """The first ``TracerWarning`` among ``caught``, as a reason: ``torch.jit.trace`` (also
    under the TorchScript ONNX exporter) read a tensor's value into Python, so the traced
    graph holds the example's value as a constant and is wrong for other inputs."""
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if not tracer:
        return None
    first_sentence = str(tracer[0].message).splitlines()[0].split(". ")[0]
    return f"recorded a tensor value as a constant ({first_sentence[:200]})"
