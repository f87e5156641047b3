"""``executorch``: a ``.pte`` program for ExecuTorch, delegated to XNNPACK, run in ExecuTorch's runtime.

Steps: ``torch.export`` of the graph module, the edge dialect and the XNNPACK partitioner
(``to_edge_transform_and_lower``), ``to_executorch``, the program's bytes written to the staged
path; then :class:`executorch.runtime.Runtime` loads the file and runs it on the CPU for
verification. The report says which operators XNNPACK took (``delegated_ops``) and which stayed
on ExecuTorch's portable kernels (``portable_ops``, with the node names in ``portable_nodes``).

Needs the optional extra: ``pip install 'graphopt[executorch]'``. Without it the backend is still
listed, and lowering to it raises :class:`~graphopt.errors.LoweringError` saying so.

A quantized graph (quantize/dequantize nodes, e.g. from ``mobile-int8``) is already in the form
XNNPACK's partitioner consumes (``quantized_decomposed`` ops, per-channel symmetric int8
weights), with two exceptions, each converted exactly and counted in the report: XNNPACK's int8
kernels take signed activations, and the ``x86`` quantization config stores activations in
uint8, so those nodes are rewritten to int8 with the zero point moved down by 128
(``converted_uint8_nodes``). Weights must be int8 constants: a graph whose weights are still
quantized at run time (``quantize`` without ``fold-weight-quantization``) is refused with a
:class:`~graphopt.errors.LoweringError` naming that pass (the backend requires it, see
:class:`graphopt.lowering.Requires`). Quantize ops that stay outside XNNPACK run on ExecuTorch's
quantized portable kernels. The program is verified within a few quantization steps of each output
(:func:`graphopt.quantization.lowering_tolerance`): XNNPACK requantizes with its own rounding.

A graph with ``scaled_dot_product_attention`` (transformers) has it decomposed before
ExecuTorch's lowering and its views spelled as reshapes (:func:`attention_decomposed`), which
the lowering otherwise fails on with "Cannot view a tensor ..." (GPT-2).

A model returning containers (named tuples, ``ModelOutput``, dicts, nested) becomes a program
returning its tensors flat, named in ``report["output_names"]``;
:meth:`~graphopt.lowering.Artifact.run` gives them back in the model's containers.

Loading a program sizes ExecuTorch's thread pool (process-wide; XNNPACK's kernels run on it) to
``torch.get_num_threads()``; ``set_threads(n)`` sizes it explicitly.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import operator
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from graphopt.errors import LoweringError, exception_summary
from graphopt.ir.graph import add_constant, get_attr_value, set_tensor
from graphopt.ir.purity import mutated_values
from graphopt.fileio import native_stdout_discarded
from graphopt.lowering.backend import Backend, Requires, register_backend
from graphopt.lowering.support import flat_output_module, other_kernels_tolerance
from graphopt.quantization import has_qdq, lowering_tolerance
from graphopt.ir import shapes
from graphopt.quantization.qdq import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_CHANNEL, QUANTIZE_PER_TENSOR, has_dynamic_qdq

_DELEGATES = ("xnnpack", "none")
INSTALL_HINT = "pip install 'graphopt[executorch]'"
#: loggers that print while executorch and its dependencies import (optional kernels missing,
#: deprecation notices): not the user's concern
_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "executorch")


@register_backend("executorch")
@dataclass
class ExecuTorch(Backend):
    """ExecuTorch (.pte): torch.export, XNNPACK delegation, verified in the ExecuTorch runtime."""

    suffix = ".pte"
    runtime = "the ExecuTorch runtime"
    requires = (Requires("fold-weight-quantization", lambda gm: weights_quantized_at_run_time(gm),
                         "the preset mobile-int8 runs it"),)
    unsupported_advice = (
        "replace these operations with core ATen operations torch.export can capture, keep them out of "
        "the lowered graph, or lower with backend='onnx'"
    )

    #: "xnnpack": delegate what XNNPACK supports, the rest runs on portable kernels;
    #: "none": portable kernels only (a reference, slow)
    delegate: str = "xnnpack"
    #: keep the graph's dynamic dims (declared at capture) dynamic in the program, each up to
    #: ``max_size`` (the runtime plans memory for that bound); False, or a graph torch.export
    #: cannot keep dynamic, bakes in the example's shapes (``report["static_shapes"]`` says why)
    dynamic: bool = True
    max_size: int = 1024

    def __post_init__(self) -> None:
        if self.delegate not in _DELEGATES:
            raise LoweringError(f"executorch: delegate must be one of {', '.join(_DELEGATES)}, not {self.delegate!r}")
        if not isinstance(self.dynamic, bool):
            raise LoweringError(f"executorch: dynamic must be True or False, not {self.dynamic!r}")
        if not isinstance(self.max_size, int) or isinstance(self.max_size, bool) or self.max_size < 2:
            raise LoweringError(f"executorch: max_size must be an int >= 2, not {self.max_size!r}")

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            executorch_modules()
        except LoweringError as exc:
            return str(exc).removeprefix("executorch: ")
        return None

    def export(self, gm: fx.GraphModule, example_inputs: tuple[Any, ...], path: Path, report: dict[str, Any]) -> None:
        et = executorch_modules()
        gm = flat_output_module(gm, example_inputs, report)  # a program cannot serialize a named tuple's structure
        gm = contiguous_constants(gm)
        if has_attention(gm):
            gm, report["views_as_reshapes"] = views_as_reshapes(gm)
        quantized = has_qdq(gm)
        if quantized:
            gm, converted = signed_activations(gm)
            report["converted_uint8_nodes"] = converted
        self._prepared = (gm, example_inputs)
        self._quantized = quantized
        self._dynamic = self.dynamic and bool(shapes.sizes_for(gm))
        if self.dynamic is False and shapes.sizes_for(gm):
            report["static_shapes"] = "dynamic=False: the program has the example's shapes (" + \
                "; ".join(shapes.describe(gm)) + ")"
        try:
            program = self._program(et, gm, example_inputs, report, delegate=self.delegate == "xnnpack")
        except LoweringError:
            raise
        except Exception as exc:
            if self.delegate != "xnnpack":
                raise
            program = self._portable_fallback(et, f"the XNNPACK lowering failed ({exception_summary(exc)})", report)
        path.write_bytes(program.buffer)
        report["summary"] = self._summary(report, quantized)

    def _portable_fallback(self, et: SimpleNamespace, why: str, report: dict[str, Any]) -> Any:
        """The program without delegation, when ExecuTorch's XNNPACK path fails on a graph its
        portable kernels run (seen on generated models: its Conv1dUnsqueezePass on a depthwise
        dilated conv1d, its DecomposeBatchNorm on batch norms left in an int8 graph, and
        delegated programs that fail to load). Slow but correct, verified like any program;
        the report says why (``delegate_fallback``)."""
        gm, inputs = self._prepared
        report["delegate_fallback"] = f"{why}; the program runs on the portable kernels"
        return self._program(et, gm, inputs, report, delegate=False)

    def _summary(self, report: dict[str, Any], quantized: bool) -> str:
        delegated, portable = report["delegated_ops"], report["portable_ops"]
        if self.delegate == "xnnpack" and "delegate_fallback" not in report:
            summary = (f"XNNPACK took {sum(delegated.values())} of {sum(delegated.values()) + sum(portable.values())} "
                       f"ops in {report['delegated_subgraphs']} subgraph(s)")
        elif self.delegate == "xnnpack":
            summary = "portable kernels only: " + report["delegate_fallback"].split(";")[0]
        else:
            summary = "portable kernels only"
        if quantized:
            summary = "int8, " + summary
            if report["converted_uint8_nodes"]:
                summary += f"; {report['converted_uint8_nodes']} uint8 quantize/dequantize nodes made int8 (exact)"
        return summary

    def load(self, path: Path, report: dict[str, Any]) -> Callable[..., Any]:
        et = executorch_modules()
        set_threads(torch.get_num_threads())
        try:
            method = _load_method(et, path)
        except Exception as exc:
            if self.delegate != "xnnpack" or "delegate_fallback" in report:
                raise
            program = self._portable_fallback(et, f"the delegated program failed to load ({exception_summary(exc)})", report)
            path.write_bytes(program.buffer)
            report["summary"] = self._summary(report, self._quantized)
            method = _load_method(et, path)

        def run(*inputs: Any) -> list[Any]:
            flat = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in inputs]
            # the runtime's output tensors are views of its planned memory, overwritten by the next run
            return [y.clone() if isinstance(y, torch.Tensor) else y for y in method.execute(flat)]

        return run

    def default_tolerance(self, gm: fx.GraphModule) -> Any:
        """The tolerance :func:`graphopt.lower` checks the program against ``gm`` with.

        - int8, activations quantized at calibration time: a few quantization steps of each
          output (:func:`graphopt.quantization.lowering_tolerance`), as for the other backends.
        - int8, activations quantized at run time (``quantize{mode=dynamic}``): twice that
          tolerance's relative part. XNNPACK quantizes each row of a dynamic linear's input
          with its own scale where the graph uses one scale per tensor, so the program is
          *closer* to float than the graph, by up to the graph's own rounding (measured on the
          MLP example: 1.0-1.8% of max|output| against 1.57% allowed elsewhere).
        - float: :func:`graphopt.lowering.other_kernels_tolerance` (XNNPACK and the portable
          kernels sum in other orders than torch; seen: 1.3e-4 of max|output| after a portable
          layer norm over 3 values of near-constant input).
        """
        from graphopt.verify import Tolerance

        if has_qdq(gm):
            tolerance = lowering_tolerance(gm)
            if has_dynamic_qdq(gm):
                tolerance = Tolerance(rtol=2 * tolerance.rtol, atol=tolerance.atol)
            return tolerance
        return other_kernels_tolerance()

    def probe(self, module: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
        et = executorch_modules()
        try:
            self._program(et, module, inputs, {}, delegate=False)
        except Exception as exc:
            return exception_summary(exc)
        return None

    def _program(self, et: SimpleNamespace, gm: fx.GraphModule, inputs: tuple[Any, ...], report: dict[str, Any],
                 delegate: bool) -> Any:
        """The program, with the graph's dynamic dims where asked and torch.export and the
        lowering keep them; else with the example's shapes, the reason in ``report``."""
        if getattr(self, "_dynamic", False) and "static_shapes" not in report:
            try:
                program = self._lowered(et, gm, inputs, report, delegate, dynamic=True)
                _run_at_second_sizes(et, program, gm, inputs)
                return program
            except Exception as exc:  # noqa: BLE001 - the static program is the way out
                report["static_shapes"] = (f"the dynamic dims could not be kept ({exception_summary(exc)}); the "
                                           f"program has the example's shapes ({'; '.join(shapes.describe(gm))})")
        return self._lowered(et, gm, inputs, report, delegate, dynamic=False)

    def _lowered(self, et: SimpleNamespace, gm: fx.GraphModule, inputs: tuple[Any, ...], report: dict[str, Any],
                 delegate: bool, dynamic: bool) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # executorch's own use of deprecated pytree names
            if not delegate:  # the portable kernels' own requirements (XNNPACK takes the graph as is)
                gm = portable_qparams(gm)
            try:
                traced_at, spec = shapes.export_spec(gm, inputs, max_size=self.max_size) if dynamic else (inputs, None)
                exported = attention_decomposed(torch.export.export(gm, traced_at, dynamic_shapes=spec, strict=False))
            except Exception as exc:
                raise LoweringError(f"torch.export failed: {exception_summary(exc)}") from exc
            if spec is not None:
                report["inferred_view_dims"] = inferred_view_dims(exported.graph_module)
            partitioners = [et.XnnpackPartitioner()] if delegate else []
            edge = et.to_edge_transform_and_lower(exported, partitioner=partitioners)
            delegated, portable, nodes, subgraphs = delegation(edge.exported_program().graph_module)
            report.update(
                delegated_ops=dict(delegated.most_common()), portable_ops=dict(portable.most_common()),
                portable_nodes=nodes, delegated_subgraphs=subgraphs,
                op_counts=dict((delegated + portable).most_common()),
                node_count=sum(delegated.values()) + sum(portable.values()),
            )
            return edge.to_executorch()


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.flatten.using_ints)


#: torch's fused attention: its kernel and its decomposition give the output different strides
_ATTENTION = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
              "_scaled_dot_product_flash_attention_for_cpu")


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and str(getattr(node.target, "__name__", "")).split(".")[0] in _ATTENTION


def has_attention(gm: fx.GraphModule) -> bool:
    return any(_is_attention(node) for node in gm.graph.nodes)


def attention_decomposed(exported: Any) -> Any:
    """``exported`` with ``scaled_dot_product_attention`` decomposed into its math, before
    ExecuTorch's lowering sees it. The lowering first turns each ``reshape`` into a view where
    the strides allow it, with the strides torch's fused attention kernel gives its output,
    and only then decomposes attention, whose math gives that output other strides: the views
    after it then fail ("Cannot view a tensor with shape [2, 8, 32] and strides (32, 64, 1)",
    GPT-2's ``x.view(-1, nx)`` in each ``Conv1D``). Decomposed here, every later view is
    chosen on the strides the program has (with :func:`views_as_reshapes` for the graph's own
    views)."""
    if not any(_is_attention(node) for node in exported.graph.nodes):
        return exported
    table = {op: fn for op, fn in torch.export.default_decompositions().items()
             if str(op).split(".")[1] in _ATTENTION}
    return exported.run_decompositions(table)


def views_as_reshapes(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with its ``view`` calls spelled ``reshape``, and their count (``gm``
    itself, and 0, when it has none or writes any value in place).

    A view needs its input's strides to allow it; ``reshape`` is the same view where they do
    and a copy where they do not, with the same values. A graph captured with torch's fused
    attention kernel has views valid for that kernel's output strides, which its
    decomposition (:func:`attention_decomposed`) does not give. Only a write through the view
    could tell the two apart, hence the copy is taken only for graphs without in-place
    writes."""
    if any(mutated_values(node) for node in gm.graph.nodes):
        return gm, 0
    views = [n for n in gm.graph.nodes if _is_view_call(n)]
    if not views:
        return gm, 0
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if _is_view_call(node):
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            node.op, node.target = "call_function", torch.ops.aten.reshape.default
            node.args, node.kwargs = (node.args[0], list(sizes)), {}
    plain = fx.GraphModule(gm, graph)
    plain.meta.update(gm.meta)
    return plain, len(views)


def _is_view_call(node: fx.Node) -> bool:
    """``x.view(*sizes)``, ``x.view(sizes)`` or ``aten.view(x, sizes)`` (not ``view(dtype)``)."""
    if node.op == "call_method" and node.target == "view":
        sizes = node.args[1:]
        return not node.kwargs and bool(sizes) and not any(isinstance(s, torch.dtype) for s in sizes)
    return node.op == "call_function" and node.target is torch.ops.aten.view.default and not node.kwargs


def inferred_view_dims(module: fx.GraphModule) -> int:
    """Spell views whose result has one symbolic size as reshapes to constant sizes and -1
    (``flatten(x, 1)`` of an ``s0 x 64 x 1 x 1`` tensor -> ``reshape(x, [-1, 64])``, the same
    view), so XNNPACK, which takes a reshape with one inferred dim but none with symbolic
    sizes, keeps it delegated; returns how many."""
    changed = 0
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in _VIEWS:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        symbolic = [i for i, size in enumerate(value.shape) if not isinstance(size, int)]
        if len(symbolic) != 1:
            continue
        sizes = [size if isinstance(size, int) else -1 for size in value.shape]
        node.target = torch.ops.aten.reshape.default
        node.args = (node.args[0], sizes)
        node.kwargs = {}
        changed += 1
    if changed:
        module.graph.eliminate_dead_code()  # the size reads nothing needs any more
        module.recompile()
    return changed


def _run_at_second_sizes(et: SimpleNamespace, program: Any, gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Run a program exported with dynamic dims at the example's sizes and at the second sizes
    in the runtime: some kernels (XNNPACK's, portable split) fail to resize where torch.export
    allowed the dims, and a program traced at size 2 (export specializes 1) may fail at 1."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trial.pte"
        path.write_bytes(program.buffer)
        method = _load_method(et, path)
        for trial in (inputs, shapes.resized_inputs(gm, inputs)):
            with native_stdout_discarded(stderr=True):  # the runtime logs the failing kernel
                method.execute([x.contiguous() if isinstance(x, torch.Tensor) else x for x in trial])


def _load_method(et: SimpleNamespace, path: Path) -> Any:
    with native_stdout_discarded(stderr=True):  # XNNPACK logs its CPU probing on first load
        return et.Runtime.get().load_program(path).load_method("forward")


def set_threads(count: int) -> None:
    """Size ExecuTorch's thread pool (process-wide), which XNNPACK's kernels run on. Loading a
    program sizes it to ``torch.get_num_threads()``, so artifacts run with torch's thread count."""
    et = executorch_modules()
    with native_stdout_discarded(stderr=True):  # the pool logs its CPU probing and resets
        if et.thread_count() != int(count):
            et.reset_threadpool(int(count))


_MODULES: SimpleNamespace | None = None
_IMPORT_ERROR: LoweringError | None = None


def executorch_modules() -> SimpleNamespace:
    """The parts of ExecuTorch this backend uses, imported once and quietly."""
    global _MODULES, _IMPORT_ERROR
    if _MODULES is not None:
        return _MODULES
    if _IMPORT_ERROR is not None:
        raise _IMPORT_ERROR
    with _quiet_import():
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
            from executorch.extension.pybindings.portable_lib import (
                _threadpool_get_thread_count,
                _unsafe_reset_threadpool,
            )
            from executorch.runtime import Runtime
            import executorch.kernels.quantized  # noqa: F401  (out variants of quantize ops outside XNNPACK)
        except ImportError as exc:
            _IMPORT_ERROR = LoweringError(
                f"executorch: the executorch package cannot be imported ({exc}); install the extra with "
                f"`{INSTALL_HINT}`, or lower with backend='onnx' or 'torchscript-mobile'"
            )
            raise _IMPORT_ERROR from exc
    _MODULES = SimpleNamespace(
        XnnpackPartitioner=XnnpackPartitioner, to_edge_transform_and_lower=to_edge_transform_and_lower,
        Runtime=Runtime, reset_threadpool=_unsafe_reset_threadpool, thread_count=_threadpool_get_thread_count,
    )
    return _MODULES


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _IMPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def weights_quantized_at_run_time(gm: fx.GraphModule) -> str | None:
    """Why ``gm`` needs ``fold-weight-quantization`` for ExecuTorch, or None.

    XNNPACK takes int8 weights only as constants, and ExecuTorch's portable per-channel quantize
    kernel, which would run the rest, wants double-precision scales: such programs failed to load
    or computed wrong values on large inputs. The fold is bit-exact.
    """
    count = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is QUANTIZE_PER_CHANNEL)
    if not count:
        return None
    return f"{count} weight(s) are quantized at run time, which ExecuTorch cannot run right"


def portable_qparams(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose per-channel zero points are int64, as ExecuTorch's portable
    dequantize kernel requires (it aborts the process on graphopt's int8 zero points; XNNPACK
    takes them as they are). Values are unchanged; ``gm`` itself is untouched."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is DEQUANTIZE_PER_CHANNEL
             and isinstance(n.args[2], fx.Node) and n.args[2].op == "get_attr"]
    if not nodes:
        return gm
    graph = copy.deepcopy(gm.graph)
    portable = fx.GraphModule(gm, graph)
    by_name = {n.name: n for n in graph.nodes}
    for original in nodes:
        node = by_name[original.name]
        zero_points = get_attr_value(gm, original.args[2])
        if zero_points.dtype in (torch.int32, torch.int64):
            continue
        name = add_constant(portable, f"{original.args[2].target}_int64".replace(".", "_"), zero_points.to(torch.int64))
        old = node.args[2]
        with graph.inserting_before(node):
            node.args = (*node.args[:2], graph.get_attr(name), *node.args[3:])
        if not old.users:
            graph.erase_node(old)
    portable.recompile()
    return portable


def contiguous_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose tensor attributes are all contiguous (``gm`` itself untouched).

    ExecuTorch's portable kernels require the operands of an op to share one dim order, and
    ``channels-last`` leaves conv weights NHWC for eager CPUs. XNNPACK packs weights its own
    way, so nothing is lost; the values are the same.
    """
    targets = sorted({str(n.target) for n in gm.graph.nodes if n.op == "get_attr"
                      and isinstance(value := get_attr_value(gm, n), torch.Tensor)
                      and value.layout is torch.strided and not _plain_strides(value)})
    if not targets:
        return gm
    plain = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    plain.meta.update(gm.meta)
    for target in targets:
        owner = target.rpartition(".")[0]
        if owner and plain.get_submodule(owner) is gm.get_submodule(owner):
            continue  # inside a module the graph calls, which the copy shares: never written
        old = get_attr_value(gm, target)
        value = old.detach().clone(memory_format=torch.contiguous_format)
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        set_tensor(plain, target, value)
    return plain


def _plain_strides(value: torch.Tensor) -> bool:
    """Row-major strides, checked as numbers: ``is_contiguous()`` also accepts an NHWC 1x1
    kernel (size-one dims may have any stride), but convs choose their layout from the strides."""
    return value.stride() == torch.empty(value.shape, device="meta").stride()


def signed_activations(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose uint8 per-tensor quantize/dequantize nodes are int8, and their count.

    ``q_int8 = q_uint8 - 128`` with zero point ``zp - 128`` dequantizes to the same values, and
    the clamp range [0, 255] becomes [-128, 127], so the rewrite is exact. ``gm`` is untouched.
    """
    targets = [n for n in gm.graph.nodes
               if n.op == "call_function" and n.target in (QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR)
               and n.args[5] == torch.uint8]
    if not targets:
        return gm, 0
    graph = copy.deepcopy(gm.graph)
    converted = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR):
            value, scale, zero_point, qmin, qmax, dtype, *rest = node.args
            if dtype == torch.uint8:
                node.args = (value, scale, int(zero_point) - 128, int(qmin) - 128, int(qmax) - 128, torch.int8, *rest)
                converted += 1
    signed = fx.GraphModule(gm, graph)
    signed.meta.update(gm.meta)
    return signed, converted


def delegation(program_module: fx.GraphModule) -> tuple[collections.Counter, collections.Counter, list[str], int]:
    """Operators inside XNNPACK subgraphs, operators left outside, the names of the nodes left
    outside, and the number of delegated subgraphs, read off an edge program's graph module."""
    delegated: collections.Counter = collections.Counter()
    portable: collections.Counter = collections.Counter()
    outside: list[str] = []
    subgraphs = 0
    for node in program_module.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module_"):
            subgraphs += 1
            lowered = getattr(program_module, node.target)
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function" and not _bookkeeping(inner):
                    delegated[_op_name(inner.target)] += 1
        elif node.op == "call_function" and not _bookkeeping(node):
            portable[_op_name(node.target)] += 1
            outside.append(node.name)
    return delegated, portable, outside, subgraphs


def _bookkeeping(node: fx.Node) -> bool:
    """getitem and delegate calls: plumbing, not operators."""
    return node.target is operator.getitem or "executorch_call_delegate" in str(node.target) \
        or "sym_size" in str(node.target)  # a size read: the runtime's prim op, not a kernel


def _op_name(target: Any) -> str:
    """``aten.convolution.default`` -> ``convolution``; ``quantized_decomposed.quantize_per_tensor.default`` -> ``quantize_per_tensor``."""
    name = getattr(target, "__name__", None) or str(target)
    parts = name.split(".")
    return parts[-2] if len(parts) >= 3 else parts[-1]
