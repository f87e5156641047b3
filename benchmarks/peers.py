"""The tools a user would pick instead of graphopt, invoked the way their documentation says,
and the runtimes that run every artifact (graphopt's and the peers' alike).

Each function does one step of one peer path, so :mod:`benchmarks.bench_fp32` can time and
measure every step on its own:

- TorchScript: :func:`script_and_freeze` (``torch.jit.script``, ``torch.jit.trace`` when
  scripting fails, then ``torch.jit.freeze`` with its default numerics-changing folds),
  :func:`save_for_lite_interpreter`, :func:`optimize_for_mobile` (needs XNNPACK, which the
  PyPI CPU wheels lack: it then raises :class:`Unavailable` with torch's own message).
- torch.fx: :func:`fx_fuse` (``torch.fx.experimental.optimization.fuse``: conv/linear + BN).
- ONNX: :func:`export_onnx` (plain ``torch.onnx.export`` of the original model with the
  TorchScript-based exporter, the one graphopt's ``onnx`` backend uses by default, so the
  comparison is about the graph and not the exporter), :func:`onnxslim_file`,
  :func:`onnxsim_file` (when those packages are installed).
- Runtimes: :func:`ort_runner` (ONNX Runtime CPU with a given optimization level and thread
  count) and :func:`lite_runner` (the lite interpreter).

The int8 peers (``torch.ao.quantization`` FX, ONNX Runtime ``quantize_static``) and
Torch-Pruning belong to ``benchmarks/bench_quantize.py`` and ``benchmarks/bench_prune.py``;
the harness runs those modules rather than copying them.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.backends.xnnpack
import torch.nn as nn

from graphopt.fileio import native_stdout_discarded

#: ONNX opset of the plain export; graphopt's ``onnx`` backend defaults to the same
OPSET = 18

#: graph optimization levels reported, by the label used in row names
ORT_LEVELS = {"off": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}


class Unavailable(Exception):
    """This peer cannot run on this machine (package not installed, feature not in the build).

    The row is kept with the reason, so the report says what was not compared and why."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation and tracer warnings torch prints for every export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------ TorchScript


def script_and_freeze(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.freeze`` of the scripted model (traced when scripting fails).

    Returns the frozen module and how it was converted ("script", or "trace (script failed:
    ...)"). Freeze keeps its default ``optimize_numerics=True``: that is what users get.
    """
    with quiet():
        try:
            scripted = torch.jit.script(model)
            how = "script"
        except Exception as exc:  # scripting rejects much Python; tracing is the documented fallback
            scripted = torch.jit.trace(model, inputs, check_trace=False)
            how = f"trace (script failed: {_first_line(exc)})"
        return torch.jit.freeze(scripted.eval()), how


def save_for_lite_interpreter(frozen: torch.jit.ScriptModule, path: Path) -> None:
    frozen._save_for_lite_interpreter(str(path))


def optimize_for_mobile(frozen: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``torch.utils.mobile_optimizer.optimize_for_mobile``; :class:`Unavailable` without XNNPACK."""
    from torch.utils.mobile_optimizer import optimize_for_mobile as optimize

    if not torch.backends.xnnpack.enabled:
        raise Unavailable("this torch build has no XNNPACK, which optimize_for_mobile requires "
                          "(the PyPI CPU wheels are built without it)")
    with quiet():
        return optimize(frozen)


def torchscript_node_count(module: torch.jit.ScriptModule) -> int:
    """Operators in a TorchScript graph, ``prim::`` bookkeeping (constants, lists) left out."""
    return sum(1 for n in module.graph.nodes() if not n.kind().startswith("prim::"))


# ---------------------------------------------------------------------------------- torch.fx


def fx_fuse(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.experimental.optimization.fuse``: folds BN into the preceding conv/linear."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


# ------------------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> None:
    """Plain ``torch.onnx.export`` of ``model`` (TorchScript-based exporter, opset 18)."""
    with quiet(), _stdout_discarded():
        torch.onnx.export(model.eval(), inputs, str(path), dynamo=False, opset_version=OPSET)


def onnxslim_file(source: Path, target: Path) -> None:
    try:
        import onnxslim
    except ImportError as exc:
        raise Unavailable("onnxslim is not installed (pip install onnxslim)") from exc
    import onnx

    with quiet(), _stdout_discarded():
        slimmed = onnxslim.slim(str(source))
    onnx.save(slimmed, str(target))


def onnxsim_file(source: Path, target: Path) -> None:
    try:
        import onnxsim
    except ImportError as exc:
        raise Unavailable("onnxsim is not installed (pip install onnxsim)") from exc
    import onnx

    with quiet(), _stdout_discarded():
        simplified, ok = onnxsim.simplify(onnx.load(str(source)))
    if not ok:
        raise RuntimeError("onnxsim's own check says the simplified model differs from the original")
    onnx.save(simplified, str(target))


def onnx_node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


# --------------------------------------------------------------------------------- runtimes


def ort_runner(path: Path, threads: int, level: str) -> Callable[..., list[Any]]:
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads and graph
    optimization ``level`` ("off" or "all"), as a callable taking the model's inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.log_severity_level = 3  # unused-initializer warnings are noise here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: Any) -> list[Any]:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        return session.run(None, {n: x.numpy() for n, x in zip(names, tensors)})

    return run


def lite_runner(path: Path) -> Callable[..., Any]:
    """The lite interpreter on a ``.ptl`` file (it shares torch's intra-op thread pool)."""
    from torch.jit.mobile import _load_for_lite_interpreter

    return _load_for_lite_interpreter(str(path))


# ---------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


@contextlib.contextmanager
def _stdout_discarded() -> Iterator[None]:
    """Drop what exporters print, from C++ (file descriptor 1) and from Python."""
    with native_stdout_discarded(), contextlib.redirect_stdout(io.StringIO()):
        yield
