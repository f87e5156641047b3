"""Safe file input/output: atomic writes and pickle-free weight loading.

Two promises graphopt makes about files (see DESIGN.md, "Errors and safety"):

- An output file is either the complete new file or left exactly as it was: writers never
  leave a half-written file behind, whatever fails midway (:func:`atomic_write`).
- Loading tensors never runs code from the file (:func:`load_weights` uses
  ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from graphopt.errors import ModelLoadError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Stage a file and move it to ``path`` only when the ``with`` block succeeds.

    Yields a path with the same file name as ``path`` inside a private staging directory
    created next to ``path`` (same file system, so the final ``os.replace`` is atomic). Write
    the file there, by name or by opening it. Files written beside it in the staging directory
    (an exporter's external-data files, say) move along, each with its own name, before the
    main file, so the main file never points to missing side files. Every file is fsynced
    before it is moved and the directory after.

    If the block raises, the staging directory is removed and ``path`` keeps its old content
    (or stays absent). Raises ``OSError`` when the directory of ``path`` is missing or not
    writable, before the block runs::

        with atomic_write("model.pt") as staged:
            torch.save(state, staged)
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory, not a file path")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent or "."))
    try:
        staged = staging / target.name
        yield staged
        if not staged.exists():
            raise FileNotFoundError(f"nothing was written to the staged file {staged}")
        side_files = sorted(p for p in staging.iterdir() if p != staged)
        for file in [*side_files, staged]:
            _fsync_file(file)
        for file in [*side_files, staged]:
            os.replace(file, target.parent / file.name)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist the renames themselves (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def jsonable(v: Any) -> Any:
    """``v`` as JSON can hold it: inf and NaN as the strings "inf", "-inf", "nan", tuples as lists,
    keys as strings, objects with ``to_dict()`` by it, anything else by ``str``."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return str(v)


def load_weights(path: str | os.PathLike) -> Any:
    """Load a file written by ``torch.save`` without executing anything from it.

    Only tensors and plain containers (dicts, lists, tuples, numbers, strings) are accepted:
    ``torch.load(weights_only=True)`` refuses any other pickled object, because unpickling it
    could run arbitrary code. Tensors are mapped to the CPU. Raises
    :class:`~graphopt.errors.ModelLoadError` when the file is missing, corrupted or holds
    objects other than tensors and containers.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"cannot load weights from {file}: no such file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _blocked_global(str(exc))
        if blocked is None:
            raise _corrupted(file, exc) from exc
        raise ModelLoadError(
            f"refused to load {file}: it holds a Python object other than tensors and plain containers "
            f"({blocked}); unpickling it could run arbitrary code. Save a state_dict instead "
            "(torch.save(model.state_dict(), path)), or load this file with torch.load(weights_only=False) "
            "only if you trust whoever wrote it."
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise _corrupted(file, exc) from exc


def _blocked_global(message: str) -> str | None:
    """The line of torch's weights-only refusal naming the global it blocked, if any."""
    return next((ln.strip() for ln in message.splitlines() if "GLOBAL" in ln), None)


def _corrupted(file: Path, exc: BaseException) -> ModelLoadError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch's weights-only error starts with generic advice; the cause is the "Unsupported ..." line
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "no detail")
    return ModelLoadError(
        f"cannot load weights from {file}: the file is corrupted or was not written by torch.save "
        f"({type(exc).__name__}: {detail.split('. ')[0][:160]}). Write it again with torch.save."
    )


@contextlib.contextmanager
def native_stdout_discarded(stderr: bool = False) -> Iterator[None]:
    """Discard what native code prints to stdout (and to stderr with ``stderr=True``) in the block.

    When the TorchScript exporter fails it prints its whole IR graph from C++ (torch 2.13 leaves
    its ONNX log switched on); ExecuTorch's XNNPACK delegate logs its CPU probing to stderr when
    a program first loads. The exception or the report says what matters.
    """
    fds = (1, 2) if stderr else (1,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as devnull:
            for fd in fds:
                os.dup2(devnull.fileno(), fd)
            try:
                yield
            finally:
                _libc_fflush()
                for fd, copy in zip(fds, saved):
                    os.dup2(copy, fd)
    finally:
        for copy in saved:
            os.close(copy)


def _libc_fflush() -> None:
    """Flush C stdio buffers, so text buffered in the block is not written after it."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (not POSIX)
        pass
