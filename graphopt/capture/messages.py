"""Pointing at the user's code: error text names the user's line (:func:`_where`), stack
traces keep the user's frames only (:func:`_user_frames`), and the ways out of a failed capture."""
from __future__ import annotations

import os
import re
import sysconfig
import traceback

import torch

from graphopt.ir import canonical, structure

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: capture's own files (every module of this package) and the canonicalization it runs
_OWN_FILES = {os.path.join(_PACKAGE_DIR, name) for name in os.listdir(_PACKAGE_DIR) if name.endswith(".py")} | {
    os.path.abspath(canonical.__file__), os.path.abspath(structure.__file__)}
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_SITE_DIRS = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
_WAYS_OUT = (
    "Ways out: keep the submodule that contains this line opaque with leaf_modules=(ThatModule,) "
    "or its qualified name; fix Python-level arguments with concrete_args={'name': value}; "
    'or capture with mode="export", which follows control flow on shapes.'
)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]*)(?:\n(?P<code>    [^\n]*))?')


def _is_library_file(path: str) -> bool:
    path = os.path.abspath(path) if not path.startswith("<") else path
    if path.startswith(_TORCH_DIR) or path in _OWN_FILES:
        return True
    return path.startswith(_STDLIB_DIR) and not path.startswith(_SITE_DIRS)


def _user_frames(trace: str) -> str:
    """A formatted stack trace without torch's frames, so its last frame is the user's line."""
    frames = [m for m in _FRAME.finditer(trace) if not _is_library_file(m["file"])]
    return "".join(
        f'  File "{m["file"]}", line {m["line"]}, in {m["fn"]}\n' + (f"{m['code']}\n" if m["code"] else "")
        for m in frames
    )


def _where(exc: BaseException) -> str:
    """' at file:line (`code`)' for the innermost frame of ``exc`` in the user's code, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library_file(f.filename)]
    if not frames:
        return ""
    frame = frames[-1]
    code = f" `{frame.line.strip()}`" if frame.line else ""
    return f" at {frame.filename}:{frame.lineno} in {frame.name}{code}"
