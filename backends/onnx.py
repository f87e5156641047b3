"""``onnx``: an ``.onnx`` file, checked with ``onnx.checker`` and run in ONNX Runtime.

Two exporters ship with torch: the TorchScript-based one (``torch.onnx.export(dynamo=False)``,
deprecated but fast) and the torch.export-based one (``dynamo=True``, onnxscript), which is
several times slower on the same models with the same ONNX operators in the result (the
``exporter`` option picks one; the lowering report times the export). So ``exporter="auto"`` (the default) uses the TorchScript exporter
and falls back to the dynamo exporter when it raises *or* when tracing read tensor values into
Python (a ``TracerWarning``: the file would hold the example's values as constants); the report
says which exporter wrote the file and why the first was not used.

Inputs and outputs are named by their pytree paths (:mod:`graphopt.ir.structure`): inputs after
the forward parameters (``input_ids``, ``inputs.image``), outputs after the fields and keys of
the model's output (``logits``, ``hidden_states.0``; ``output_0``, ... for plain tensors), one
output per tensor; ``artifact.run`` puts them back in the model's container.

Attention with a boolean mask that leaves a query row no key (left padding under a causal mask)
is written so that row is zero, as torch computes it (:mod:`graphopt.backends._attention_onnx`).

A ``model.half()`` is written in float16 and verified at float16's tolerance. A bfloat16 graph
is written in float32, since ONNX Runtime has no bfloat16 kernels on CPU; the runner casts at
the boundaries and the report's notes say so (:mod:`graphopt.backends._bfloat16_onnx`).

Weights go into the one ``.onnx`` file; only a model over the 2 GB protobuf limit gets external
data files, which land next to it. The graph's dynamic dims (declared at capture, the batch by
default: :mod:`graphopt.ir.shapes`) are symbolic in the file, named as declared, and
:func:`graphopt.lower` verifies it at their second sizes too; ``dynamic=False`` writes the
example's shapes (the report says so).

A quantized graph (quantize/dequantize nodes, e.g. from the ``mobile-int8`` preset) is written
as QuantizeLinear/DequantizeLinear around float operators, which ONNX Runtime fuses into its
int8 kernels (QLinearConv, ...). The TorchScript exporter learns these ops from
:mod:`graphopt.backends._onnx_symbolics`. Dynamically quantized linear layers
(``quantize{mode=dynamic}``) are written for the TorchScript exporter as DynamicQuantizeLinear +
MatMulInteger, which ONNX Runtime fuses into DynamicQuantizeMatMul
(:mod:`graphopt.backends._quantized_onnx`; the report counts them as ``integer_linears``). The
file is verified within a few quantization steps of each output
(:func:`graphopt.quantization.lowering_tolerance`): the int8 kernels round their own way. Ops
ONNX Runtime has no int8 kernel for (HardSwish, a bilinear Resize) compute in float between
DequantizeLinear and QuantizeLinear; ``report["float_between_qdq"]`` counts them and a note
says so.
Weights beyond +-64 are refused on an x86 CPU without VNNI, where ONNX Runtime's int8 kernels
saturate (see :meth:`Onnx.export`).
"""
from __future__ import annotations

import collections
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir import graph as G
from graphopt.ir import shapes, structure
from graphopt.backends._attention_onnx import NOTE as ATTENTION_NOTE
from graphopt.backends._attention_onnx import zero_fully_masked_rows
from graphopt.backends._bfloat16_onnx import NOTE as BFLOAT16_NOTE
from graphopt.backends._bfloat16_onnx import has_bfloat16, in_float32
from graphopt.backends._quantized_onnx import DYNAMO_TRANSLATIONS, float_between_qdq, integer_linears
from graphopt.backends._onnx_symbolics import register_torchscript_symbolics
from graphopt.errors import LoweringError, exception_summary
from graphopt.fileio import native_stdout_discarded
from graphopt.lowering.backend import Backend, register_backend
from graphopt.lowering.support import other_kernels_tolerance, output_dtype, recording_warnings, tracer_warning
from graphopt.quantization import has_qdq, kernels, lowering_tolerance, saturating_weights
from graphopt.quantization.qdq import has_dynamic_qdq

_EXPORTERS = ("auto", "torchscript", "dynamo")
#: opsets both exporters write well (dynamo needs >= 18; the TorchScript one stops at 20)
_OPSETS = range(18, 21)
#: protobuf's 2 GiB limit, less room for the graph itself
_SINGLE_FILE_LIMIT = 2**31 - 2**26


@register_backend("onnx")
@dataclass
class Onnx(Backend):
    """ONNX (.onnx), checked with onnx.checker and verified in ONNX Runtime (CPU)."""

    suffix = ".onnx"
    runtime = "ONNX Runtime"
    unsupported_advice = (
        "replace these operations with ones ONNX has (see the reasons above), keep them out of the exported "
        "graph, or lower with backend='torchscript-mobile'"
    )

    #: "torchscript" (fast, deprecated by torch), "dynamo" (torch.export + onnxscript, slow),
    #: or "auto": torchscript, falling back to dynamo when it fails or traces unsoundly
    exporter: str = "auto"
    #: ONNX opset of the default domain
    opset: int = 18
    #: keep the graph's dynamic dims (declared at capture: the batch by default) symbolic in the
    #: file, named as declared; False writes the example's shapes
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.exporter not in _EXPORTERS:
            raise LoweringError(f"onnx: exporter must be one of {', '.join(_EXPORTERS)}, not {self.exporter!r}")
        if not isinstance(self.opset, int) or self.opset not in _OPSETS:
            raise LoweringError(f"onnx: opset must be an int from {_OPSETS.start} to {_OPSETS.stop - 1}, not {self.opset!r}")
        if not isinstance(self.dynamic, bool):
            raise LoweringError(f"onnx: dynamic must be True or False, not {self.dynamic!r}")
        self._tried: list[str] = []

    # ----------------------------------------------------------------------- export + load

    def export(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        """Write ``gm`` with the chosen exporter(s); see the module docstring.

        A quantized graph whose int8 weights exceed +-64 is refused on an x86 CPU without VNNI:
        ONNX Runtime's int8 kernels there add products in int16 and saturate, so the file
        would compute wrong results here (tens of quantization steps off) and verification
        would fail anyway, with a mismatch that does not say why. Refusing up front says why
        and what to do.
        """
        external_data = G.param_bytes(gm) > _SINGLE_FILE_LIMIT
        report.update(opset=self.opset, external_data=external_data)
        if not self.dynamic and shapes.sizes_for(gm):
            report["static_shapes"] = "dynamic=False: the file has the example's shapes " + \
                "; ".join(shapes.describe(gm))
        if has_bfloat16(gm, example_inputs):  # ONNX Runtime has no bfloat16 kernels: write it in float32
            with torch.no_grad():
                outputs = [t for t in pytree.tree_leaves(gm(*example_inputs)) if isinstance(t, torch.Tensor)]
            report["output_dtypes"] = [str(t.dtype).removeprefix("torch.") for t in outputs]
            gm, example_inputs = in_float32(gm, example_inputs)
            report.setdefault("notes", []).append(BFLOAT16_NOTE)
        gm, masked = zero_fully_masked_rows(gm)
        if masked:
            report.setdefault("notes", []).append(ATTENTION_NOTE)
        graphs = {"torchscript": gm, "dynamo": gm}
        if has_qdq(gm):
            _refuse_saturating_weights(gm)
            register_torchscript_symbolics(self.opset)  # else the TorchScript exporter fails on QDQ ops
            report["quantized"] = True
        if has_dynamic_qdq(gm):
            graphs["torchscript"], report["integer_linears"] = integer_linears(gm)
            graphs["dynamo"], _ = integer_linears(gm, custom_op=True)
        failures = []
        existing = set(path.parent.iterdir())
        for exporter in ("torchscript", "dynamo") if self.exporter == "auto" else (self.exporter,):
            self._tried.append(exporter)
            try:
                self._export_with(exporter, graphs[exporter], example_inputs, path, external_data, report)
                if exporter == "torchscript" and self.exporter == "auto" and self.dynamic:
                    _check_other_sizes(gm, example_inputs, path, report)
            except Exception as exc:
                failures.append(f"the {exporter} exporter failed: {exception_summary(exc)}")
                for leftover in set(path.parent.iterdir()) - existing:  # so the next exporter starts clean
                    leftover.unlink()
                continue
            report["exporter"] = exporter
            if failures:
                report["exporter_fallback"] = "; ".join(failures)
            break
        else:
            raise LoweringError("torch.onnx.export could not export the graph: " + "; ".join(failures))
        self._check_and_count(path, report)

    def load(self, path: Path, report: dict[str, Any]) -> Callable[..., Any]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        # torch's thread count, as the other backends' runtimes use (ORT's default is every core)
        options.intra_op_num_threads = torch.get_num_threads()
        if report.get("quantized"):
            import onnx

            with tempfile.TemporaryDirectory() as scratch:  # not next to the file: its size is counted
                options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                _note_float_ops(onnx.load(options.optimized_model_filepath), report)
        else:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        expected = {i.name for i in session.get_inputs()}
        names = report.get("input_names") or [i.name for i in session.get_inputs()]
        report["onnxruntime"] = {"version": ort.__version__, "providers": session.get_providers()}
        if len(expected) < len(names):
            report.setdefault("notes", []).append(
                f"inputs {sorted(set(names) - expected)} are unused by the graph and not inputs of the ONNX model")

        # a bfloat16 graph's file computes in float32: inputs go up, outputs back to the graph's dtypes
        cast_back = [getattr(torch, name) for name in report.get("output_dtypes", ())]

        def run(*inputs: Any) -> list[Any]:
            tensors = [x.float() if x.dtype == torch.bfloat16 else x
                       for x in inputs if isinstance(x, torch.Tensor)]  # other inputs were baked in
            feed = {name: x.detach().cpu().numpy() for name, x in zip(names, tensors) if name in expected}
            outputs = session.run(None, feed)
            if cast_back:
                outputs = [torch.from_numpy(v).to(dtype) for v, dtype in zip(outputs, cast_back)]
            return outputs

        return run

    def default_tolerance(self, gm: fx.GraphModule) -> Any:
        """For a quantized graph, the quantization steps on the paths to its outputs
        (:func:`graphopt.quantization.lowering_tolerance`: ONNX Runtime's int8 kernels round
        their own way); otherwise :func:`graphopt.lowering.other_kernels_tolerance`
        (found by a 2,000-case campaign: batch norm with batch statistics on near-constant input)
        for the dtype of the graph's outputs: float16's own tolerance for a ``model.half()``."""
        return lowering_tolerance(gm) if has_qdq(gm) else other_kernels_tolerance(output_dtype(gm))

    # ------------------------------------------------------------------------------ probes

    def probe(self, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        """Rejected when every exporter this lowering tried rejects the node.

        Every node is screened with the TorchScript exporter (milliseconds); only nodes it
        rejects are offered to the dynamo exporter (seconds each). A node the TorchScript
        exporter takes counts as supported by both: the dynamo exporter covers more operators.
        """
        tried = self._tried or ["torchscript"]
        screened = self._probe_with("torchscript", module, inputs)
        if screened is None:
            return None
        reasons = [f"torchscript exporter: {screened}"] if "torchscript" in tried else []
        if "dynamo" in tried:
            reason = self._probe_with("dynamo", module, inputs)
            if reason is None:
                return None
            reasons.append(f"dynamo exporter: {reason}")
        return "; ".join(reasons)

    def _probe_with(self, exporter: str, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        if exporter == "torchscript" and has_qdq(module):
            register_torchscript_symbolics(self.opset)
        with recording_warnings() as caught:
            try:
                if exporter == "torchscript":
                    with native_stdout_discarded():
                        torch.onnx.export(module.eval(), inputs, io.BytesIO(), dynamo=False, opset_version=self.opset)
                else:
                    torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=self.opset, verbose=False)
            except Exception as exc:
                return exception_summary(exc)
        return tracer_warning(caught)

    # ----------------------------------------------------------------------------- helpers

    def _export_with(
        self, exporter: str, gm: fx.GraphModule, inputs: tuple[Any, ...], path: Path, external_data: bool,
        report: dict[str, Any],
    ) -> None:
        input_names = [name for name, x in zip(structure.input_names(gm), inputs) if isinstance(x, torch.Tensor)]
        report["input_names"] = input_names  # exporters drop unused inputs: feed the session by name
        with torch.no_grad():
            gm, output_names = structure.flat_outputs(gm, gm(*inputs))  # one output per tensor, named by its path
        report["output_names"] = output_names
        common = dict(opset_version=self.opset, input_names=input_names, output_names=output_names)
        if exporter == "dynamo":
            traced_at, dynamic_shapes = shapes.export_spec(gm, inputs) if self.dynamic else (inputs, None)
            torch.onnx.export(gm, traced_at, str(path), dynamo=True, external_data=external_data, verbose=False,
                              dynamic_shapes=dynamic_shapes, custom_translation_table=DYNAMO_TRANSLATIONS, **common)
            return
        dynamic_axes = _dynamic_axes(gm, inputs, input_names, output_names) if self.dynamic else None
        with recording_warnings() as caught, native_stdout_discarded():
            torch.onnx.export(gm, inputs, str(path), dynamo=False, dynamic_axes=dynamic_axes, **common)
        unsound = tracer_warning(caught)
        if unsound is not None:
            raise LoweringError(f"the trace is only right for the example values: {unsound}")

    @staticmethod
    def _check_and_count(path: Path, report: dict[str, Any]) -> None:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        counts = collections.Counter(node.op_type for node in model.graph.node)
        report["op_counts"] = dict(counts.most_common())
        report["node_count"] = sum(counts.values())
        report["summary"] = f"{report['exporter']} exporter, opset {report['opset']}" + (
            f" (fell back: {report['exporter_fallback']})" if "exporter_fallback" in report else ""
        )


def _refuse_saturating_weights(gm: fx.GraphModule) -> None:
    """LoweringError when ONNX Runtime's int8 kernels would saturate on this CPU's weights."""
    saturating = saturating_weights(gm)
    if not saturating:
        return
    shown = ", ".join(saturating[:5]) + (f" and {len(saturating) - 5} more" if len(saturating) > 5 else "")
    raise LoweringError(
        f"int8 weights exceed +-{kernels.NON_VNNI_WEIGHT_LIMIT} ({shown}) and this x86 CPU has no VNNI: ONNX "
        "Runtime's int8 kernels here add products in 16 bits and saturate, so the model would give wrong results "
        "in this runtime and cannot be verified. Quantize with config='x86' (7-bit weights; the mobile-int8 "
        "default), or lower on a CPU with VNNI or an ARM machine"
    )


def _check_other_sizes(gm: fx.GraphModule, inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
    """The TorchScript exporter traces: where the graph turns a size into a Python number the
    file holds the example's. Run the file at the dynamic dims' second sizes, so ``auto``
    falls back to the dynamo exporter (which keeps sizes symbolic) when it is wrong there."""
    resized = shapes.resized_inputs(gm, inputs)
    if resized is None:
        return
    import onnxruntime as ort
    from graphopt.verify import compare_outputs

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = {i.name for i in session.get_inputs()}
    tensors = [x for x in resized if isinstance(x, torch.Tensor)]
    feed = {name: x.numpy() for name, x in zip(report["input_names"], tensors) if name in expected}
    try:
        got = session.run(None, feed)
    except Exception as exc:
        raise LoweringError(f"the trace holds the example's sizes: {exception_summary(exc)}") from None
    with torch.no_grad():
        want = pytree.tree_leaves(G.call(gm, resized))
    verdict = compare_outputs([want], [got], other_kernels_tolerance(output_dtype(gm)))
    if not verdict.ok:
        raise LoweringError(f"the trace holds the example's sizes: {verdict.reason}")


def _dynamic_axes(gm: fx.GraphModule, inputs: tuple[Any, ...], input_names: list[str],
                  output_names: list[str]) -> dict[str, dict[int, str]] | None:
    """The TorchScript exporter's ``dynamic_axes``: each input's declared dynamic dims by name,
    and each output dim that changes when they do (seen by running the graph at the second
    sizes), named after the input dim of the same sizes or ``<output>_dim<d>``."""
    sizes = shapes.sizes_for(gm)
    if not sizes:
        return None
    axes: dict[str, dict[int, str]] = {}
    dims = shapes.input_dims(gm)
    for name, d in zip(structure.input_names(gm), dims):
        if d is not None and d.dynamic and name in input_names:
            axes[name] = dict(d.dynamic)
    with torch.no_grad():
        first = pytree.tree_leaves(G.call(gm, inputs))
        second = pytree.tree_leaves(G.call(gm, shapes.resized_inputs(gm, inputs, sizes)))
    by_sizes = {(size, sizes[name]): name for name, size in shapes.dynamic_names(gm).items()}
    for out_name, a, b in zip(output_names, first, second):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim():
            varying = {d: by_sizes.get((p, q), f"{out_name}_dim{d}") for d, (p, q) in enumerate(zip(a.shape, b.shape))
                       if p != q}
            if varying:
                axes[out_name] = varying
    return axes


def _note_float_ops(optimized: Any, report: dict[str, Any]) -> None:
    """Say which ops ONNX Runtime has no int8 kernel for in this graph (they compute in float
    between DequantizeLinear and QuantizeLinear)."""
    found = float_between_qdq(optimized)
    report["float_between_qdq"] = found
    if found:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(found.items()))
        report.setdefault("notes", []).append(
            f"ONNX Runtime has no int8 kernel for {listed}: computed in float between DequantizeLinear and "
            "QuantizeLinear")
