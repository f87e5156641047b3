"""``torchscript-mobile``: a ``.ptl`` file for PyTorch's lite interpreter.

Steps: ``torch.jit.script`` the graph module (``torch.jit.trace`` on the example inputs when
scripting fails, with the reason in the report), ``torch.jit.freeze`` in eval mode,
``torch.utils.mobile_optimizer.optimize_for_mobile`` when this torch build has XNNPACK (the PyPI
CPU wheels do not; the report then says it was skipped), save with
``_save_for_lite_interpreter``, reload with ``torch.jit.mobile._load_for_lite_interpreter``.

Freezing runs without torch's numerics-changing optimizations by default
(``freeze_optimizations=False``): graphopt's own passes fuse and fold with verified contracts,
while freeze's folding has known silent bugs (Linear followed by BatchNorm1d on 3-D inputs,
HARD-CASES A3).

A quantized graph (quantize/dequantize nodes, e.g. from the ``mobile-int8`` preset) is first
converted to torch's int8 kernels (:func:`graphopt.backends._quantized_torchscript.convert_for_torchscript`)
for the quantized engine of option ``engine``: ``"x86"`` (fbgemm) or ``"qnnpack"`` (ARM). It is
scripted, frozen only for qnnpack (freezing an x86 module stores its packed weights twice),
loaded with that engine set, and verified within a few quantization steps of each output
(:func:`graphopt.quantization.lowering_tolerance`). Run the file with the same engine. Ops
torch has no int8 kernel for (SiLU, a broadcast multiply) compute in float between dequantize
and quantize: ``report["float_between_qdq"]`` lists them and a note says so. When
``torch.jit.script`` fails, the error keeps TorchScript's reason and the line it points at.
A model returning containers (named tuples, ``ModelOutput``, dicts, nested) is lowered to a file
returning its tensors as one flat tuple, named in ``report["output_names"]``;
:meth:`~graphopt.lowering.Artifact.run` gives them back in the model's containers.
Dynamically quantized linear layers (``quantize{mode=dynamic}``) run on
``quantized::linear_dynamic``, which quantizes their float input itself.
"""
from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.backends.xnnpack
import torch.fx as fx

from graphopt.ir import shapes
from graphopt.errors import LoweringError, exception_summary
from graphopt.lowering.backend import Backend, register_backend
from graphopt.lowering.support import flat_output_module, other_kernels_tolerance, recording_warnings, tracer_warning
from graphopt.quantization import has_qdq, lowering_tolerance

_METHODS = ("auto", "script", "trace")
_ENGINES = ("x86", "qnnpack")


@register_backend("torchscript-mobile")
@dataclass
class TorchScriptMobile(Backend):
    """PyTorch lite interpreter (.ptl): TorchScript, frozen, optimized for mobile where XNNPACK exists."""

    suffix = ".ptl"
    runtime = "the lite interpreter"
    unsupported_advice = (
        "make these nodes scriptable (plain torch operations, no numpy or Python-only code in forward), "
        "or lower with backend='onnx'"
    )

    #: "script" (fails on non-scriptable code), "trace" (records one run on the example inputs),
    #: or "auto": script, and trace when scripting fails
    method: str = "auto"
    #: run optimize_for_mobile when this torch build has XNNPACK
    mobile_optimize: bool = True
    #: let torch.jit.freeze fold and fuse on its own (unverified rewrites; see the module docstring)
    freeze_optimizations: bool = False
    #: torch quantized engine the int8 kernels of a quantized graph are packed for and run with:
    #: "x86" (fbgemm) or "qnnpack" (ARM phones); unused for float graphs
    engine: str = "x86"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise LoweringError(f"torchscript-mobile: method must be one of {', '.join(_METHODS)}, not {self.method!r}")
        if self.engine not in _ENGINES:
            raise LoweringError(f"torchscript-mobile: engine must be one of {', '.join(_ENGINES)}, not {self.engine!r}")
        for name in ("mobile_optimize", "freeze_optimizations"):
            if not isinstance(getattr(self, name), bool):
                raise LoweringError(f"torchscript-mobile: {name} must be True or False, not {getattr(self, name)!r}")
        self._script_error: str | None = None
        self._quantized = False

    def export(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        gm = flat_output_module(gm, example_inputs, report)  # TorchScript has no named tuples or ModelOutputs
        if has_qdq(gm):
            self._quantized = True
            self._export_quantized(gm, example_inputs, path, report)
            return
        scripted = self._to_torchscript(gm, example_inputs, report)
        frozen = torch.jit.freeze(scripted.eval(), optimize_numerics=self.freeze_optimizations)
        report["xnnpack"] = has_xnnpack()
        frozen = self._optimize_for_mobile(frozen, report)
        counts = collections.Counter(n.kind() for n in frozen.graph.nodes() if not n.kind().startswith("prim::"))
        report["op_counts"] = dict(counts.most_common())
        report["node_count"] = sum(counts.values())
        frozen._save_for_lite_interpreter(str(path))
        report["summary"] = f"{report['converter']}, frozen, optimize_for_mobile {report['optimize_for_mobile'].split(':')[0]}"

    def load(self, path: Path, report: dict[str, Any]) -> Callable[..., Any]:
        from torch.jit.mobile import _export_operator_list, _load_for_lite_interpreter

        if not self._quantized:
            module = _load_for_lite_interpreter(str(path))
            # the root operators a selective (size-reduced) build of the mobile runtime must keep
            report["operators"] = sorted(_export_operator_list(module))
            return module
        with _quantized_engine(self.engine):  # loading repacks the int8 weights for the engine set
            module = _load_for_lite_interpreter(str(path))
        report["operators"] = sorted(_export_operator_list(module))

        def run(*inputs: Any) -> Any:
            with _quantized_engine(self.engine):
                return module(*inputs)

        return run

    def default_tolerance(self, gm: fx.GraphModule) -> Any:
        """A few quantization steps of the output for a quantized graph (torch's int8 kernels
        round their own way); the per-dtype default otherwise."""
        return lowering_tolerance(gm) if has_qdq(gm) else None

    def probe(self, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        reasons = []
        if self.method in ("auto", "script"):
            try:
                torch.jit.script(_without_annotations(module))
                return None
            except Exception as exc:
                reason = script_error_summary(exc)
                if "Can't redefine method" in reason and self._script_error:
                    # TorchScript keeps half-compiled classes from the failed whole-graph attempt;
                    # that attempt's error is the real one
                    reason = self._script_error
                reasons.append(f"script: {reason}")
        if self.method in ("auto", "trace"):
            with recording_warnings() as caught:
                try:
                    torch.jit.trace(module, inputs, check_trace=False)
                except Exception as exc:
                    reasons.append(f"trace: {exception_summary(exc)}")
                    return "; ".join(reasons)
            problem = tracer_warning(caught)
            if problem is None:
                return None
            reasons.append(f"trace: {problem}")
        return "; ".join(reasons)

    def _export_quantized(self, gm: fx.GraphModule, inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        """Convert the QDQ graph to int8 kernels for ``engine``, script, save (see the module docstring)."""
        from graphopt.backends._quantized_torchscript import convert_for_torchscript

        with _quantized_engine(self.engine):
            converted = convert_for_torchscript(gm, inputs, engine=self.engine)
            try:
                scripted = torch.jit.script(_without_annotations(converted)).eval()
            except Exception as exc:
                raise LoweringError(
                    f"torch.jit.script failed on the int8 module converted from the quantized graph: "
                    f"{script_error_summary(exc)}; lower with backend='onnx', or report the model"
                ) from exc
            report.update(converter="script", quantized_engine=self.engine, int8_layers=list(converted.meta["int8_layers"]))
            floats = converted.meta["float_between_qdq"]
            report["float_between_qdq"] = list(floats)
            if floats:
                report.setdefault("notes", []).append(
                    f"torch has no int8 kernel for {', '.join(floats)}: computed in float between dequantize and "
                    "quantize")
            report["xnnpack"] = has_xnnpack()
            if self.engine == "x86":
                # freezing inlines the x86-packed weights as constants next to their serialized
                # copies: the file about doubles (measured in tests/test_quantized_lowering.py)
                report["freeze"] = "skipped: torch.jit.freeze stores x86-packed int8 weights twice"
                report["optimize_for_mobile"] = "skipped: it freezes the module (x86 engine, see freeze)"
                final = scripted
            else:
                final = torch.jit.freeze(scripted, optimize_numerics=self.freeze_optimizations)
                report["freeze"] = "applied"
                final = self._optimize_for_mobile(final, report)
            counts = collections.Counter(n.kind() for n in final.inlined_graph.nodes() if not n.kind().startswith("prim::"))
            report["op_counts"] = dict(counts.most_common())
            report["node_count"] = sum(counts.values())
            final._save_for_lite_interpreter(str(path))
        report["summary"] = (
            f"int8 ({len(report['int8_layers'])} layers on {self.engine} kernels), script, "
            f"{'frozen' if report['freeze'] == 'applied' else 'not frozen'}, "
            f"optimize_for_mobile {report['optimize_for_mobile'].split(':')[0]}"
        )

    def _to_torchscript(self, gm: fx.GraphModule, inputs: tuple[Any, ...], report: dict[str, Any]) -> torch.jit.ScriptModule:
        if self.method in ("auto", "script"):
            try:
                scripted = torch.jit.script(_without_annotations(gm))
                report["converter"] = "script"
                return scripted
            except Exception as exc:
                self._script_error = script_error_summary(exc)
                if self.method == "script":
                    raise LoweringError(f"torch.jit.script failed: {self._script_error}") from exc
                report["converter_fallback"] = f"torch.jit.script failed ({self._script_error}); traced instead"
        report["converter"] = "trace"
        with recording_warnings() as caught:
            traced = torch.jit.trace(gm, inputs, check_trace=False)
        unsound = tracer_warning(caught)
        if unsound is not None:
            # only right for the example values: verification on other inputs decides
            report["trace_warning"] = unsound
        self._check_trace_sizes(gm, traced, inputs)
        return traced

    def _check_trace_sizes(self, gm: fx.GraphModule, traced: torch.jit.ScriptModule, inputs: tuple[Any, ...]) -> None:
        """A trace records the example's sizes wherever the graph turns a size into a Python
        number; with dynamic dims, refuse a trace that is wrong at their second sizes."""
        resized = shapes.resized_inputs(gm, inputs)
        if resized is None:
            return
        from graphopt.verify import compare

        try:
            verdict = compare(gm, traced, resized, tolerance=other_kernels_tolerance(), synthesize=0, localize=False)
            problem = None if verdict.ok else str(verdict)
        except Exception as exc:  # noqa: BLE001 - the trace raising at other sizes is the same finding
            problem = exception_summary(exc)
        if problem is not None:
            raise LoweringError(
                f"torch.jit.script failed ({self._script_error or 'method=trace'}) and the trace holds the example's "
                f"sizes: at {shapes.label(shapes.sizes_for(gm))[len('example at '):]} it {problem[:300]}. Make the "
                "graph scriptable, lower with backend='onnx' or 'executorch', or capture with dynamic_shapes='static' "
                "for a fixed-size model"
            )

    def _optimize_for_mobile(self, frozen: torch.jit.ScriptModule, report: dict[str, Any]) -> torch.jit.ScriptModule:
        if not self.mobile_optimize:
            report["optimize_for_mobile"] = "skipped: mobile_optimize=False"
            return frozen
        if not report["xnnpack"]:
            report["optimize_for_mobile"] = "skipped: this torch build has no XNNPACK"
            return frozen
        from torch.utils.mobile_optimizer import optimize_for_mobile

        try:
            optimized = optimize_for_mobile(frozen)
        except Exception as exc:
            report["optimize_for_mobile"] = f"failed, kept the frozen module: {exception_summary(exc)}"
            return frozen
        report["optimize_for_mobile"] = "applied"
        return optimized


def has_xnnpack() -> bool:
    """Whether this torch build has XNNPACK, which optimize_for_mobile's rewrites target."""
    return bool(torch.backends.xnnpack.enabled)


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Set torch's process-wide quantized engine inside the block, and restore the caller's."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _without_annotations(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` in a form ``torch.jit.script`` reads, sharing its parameters and submodules.

    - No type annotations: FX writes an annotated input as ``x : _torch_Tensor_``, an alias
      defined only for its generated code, which ``torch.jit.script`` cannot resolve; capture
      keeps the annotations of the user's ``forward``.
    - aten overloads called as their packets: TorchScript resolves ``torch.ops.aten.slice``
      (picking the overload from the arguments, as for any builtin) but not the attribute
      ``torch.ops.aten.slice.Tensor``, which graphs captured with ``torch.export`` call.
    """
    overloads = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    if all(node.type is None for node in gm.graph.nodes) and not overloads:
        return gm
    graph = copy.deepcopy(gm.graph)  # copies nodes with shallow copies of their meta: cheap
    for node in graph.nodes:
        node.type = None
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    return fx.GraphModule(gm, graph)


def script_error_summary(exc: BaseException) -> str:
    """:func:`graphopt.lowering.exception_summary` of a ``torch.jit.script`` failure, with the
    cause TorchScript gives under its headline: "Arguments for call are not valid." is followed
    by why each overload refused ("Expected a value of type 'List[int]' for argument 'stride'
    but instead found type 'NoneType'") and by the line of code it points at."""
    summary = exception_summary(exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if ln.startswith("Expected ")), None)
    pointed = [lines[i - 1] for i, ln in enumerate(lines) if ln.startswith("~") and "<--- HERE" in ln and i]
    details = [d for d in (reason, f"at: {pointed[0]}" if pointed else None) if d and d not in summary]
    return summary + (f" ({'; '.join(details)})" if details else "")
