"""Helpers for backends: the tolerance for another library's kernels, a graph's output dtype,
a graph returning its tensors flat (for formats without containers), and the recording of the warnings torch and the exporters raise (collected into the report, or
inspected, as a ``TracerWarning`` is)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import ANSI_ESCAPE
from graphopt.ir import graph as G
from graphopt.ir import structure

if TYPE_CHECKING:
    from graphopt.verify import Tolerance


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


def flat_output_module(gm: fx.GraphModule, inputs: tuple[Any, ...], report: dict[str, Any]) -> fx.GraphModule:
    """``gm`` itself when it returns one tensor, else a graph module (over a copy of its graph,
    sharing its attributes) returning every tensor ``gm`` returns as one flat tuple, in pytree
    leaf order, each named by its path in ``report["output_names"]``
    (:func:`graphopt.ir.structure.flat_outputs`).

    For runtimes that cannot return the model's containers: TorchScript knows no user-defined
    named tuple or ``ModelOutput``, and an ExecuTorch program cannot serialize a named tuple's
    structure. :meth:`graphopt.lowering.Artifact.run` rebuilds the containers from the flat
    tuple, and verification compares tensors in that same order."""
    with torch.no_grad():
        outputs = gm(*inputs)
    if isinstance(outputs, torch.Tensor):
        return gm
    flat, names = structure.flat_outputs(gm, outputs)
    report["output_names"] = names
    return flat




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
