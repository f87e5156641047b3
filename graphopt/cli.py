"""The ``graphopt`` command line.

    graphopt optimize MODEL --input 1x3x224x224 --pipeline mobile-fp32 --backend onnx -o m.onnx
    graphopt passes
    graphopt models
    graphopt demo
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .errors import GraphoptError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64}


class UsageError(Exception):
    """Bad command-line arguments: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line and exit code 2, no usage dump
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_shape(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(x\d+)*", text):
        raise UsageError(f"--input {text!r}: expected sizes joined by 'x', e.g. 1x3x224x224")
    return tuple(int(s) for s in text.split("x"))


def _parse_option(text: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"([a-z0-9-]+)\.([A-Za-z0-9_-]+)=(.*)", text)
    if not m:
        raise UsageError(f"--option {text!r}: expected PASS.NAME=VALUE, e.g. fold-constants.max_bytes=1000000")
    return m.group(1), m.group(2).replace("-", "_"), m.group(3)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="Verified graph compiler for PyTorch models headed to phones.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    o = sub.add_parser("optimize", help="capture, optimize and (optionally) lower a model")
    o.add_argument("model", help="built-in example, package.module:factory, path/file.py:factory or torchvision:NAME")
    o.add_argument("--input", action="append", default=[], metavar="SHAPE",
                   help="example input shape such as 1x3x224x224 (repeat for several inputs)")
    o.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    o.add_argument("--pipeline", default="mobile-fp32", help="preset or pipeline string (default mobile-fp32)")
    o.add_argument("--verify", default="each", choices=["each", "final", "none"])
    o.add_argument("--on-failure", default="rollback", choices=["rollback", "raise"])
    o.add_argument("--option", action="append", default=[], metavar="PASS.NAME=VALUE")
    o.add_argument("--backend", default=None, help="lower with this backend (onnx, torchscript-mobile, ...)")
    o.add_argument("-o", "--output", default=None, help="output path (artifact, or .pt graph module file)")
    o.add_argument("--report-json", default=None, help="also write the report as JSON here")
    o.add_argument("--capture-mode", default="symbolic", choices=["symbolic", "export"])

    sub.add_parser("passes", help="list registered passes with contracts and options")
    sub.add_parser("models", help="list built-in example models")
    sub.add_parser("backends", help="list registered backends")
    d = sub.add_parser("demo", help="the whole job on a built-in model: optimize, lower to every backend, compare")
    d.add_argument("--model", default="resnet_cnn")
    d.add_argument("--out", default="out/demo", help="directory for the artifacts (default out/demo)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return {"optimize": cmd_optimize, "passes": cmd_passes, "models": cmd_models,
                "backends": cmd_backends, "demo": cmd_demo}[args.command](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        from .errors import ModelLoadError, OptionError, PipelineError, UnknownBackendError

        return 2 if isinstance(exc, (PipelineError, OptionError, UnknownBackendError, ModelLoadError)) else 1


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def cmd_passes(args) -> int:
    from rich.table import Table

    from . import available_passes, available_presets

    t = Table(title="graphopt passes")
    for col in ("name", "contract", "options", "summary"):
        t.add_column(col)
    for name, p in available_passes().items():
        opts = ", ".join(f"{o.name}={o.default!r}" for o in p.options.values())
        t.add_row(name, str(p.contract), opts or "-", p.summary)
    console = _console()
    console.print(t)
    for name, pipeline in available_presets().items():
        console.print(f"preset [bold]{name}[/bold] = {pipeline}", highlight=False)
    return 0


def cmd_models(args) -> int:
    from . import examples

    for name, entry in examples.EXAMPLES.items():
        print(f"{name:20s} {getattr(entry, 'description', '')}")
    return 0


def cmd_backends(args) -> int:
    from .lowering import available_backends

    for name, b in available_backends().items():
        missing = b.unavailable()
        line = (b.__doc__ or "").strip().splitlines()[0] if b.__doc__ else ""
        print(f"{name:20s} {line}" + (f" [unavailable: {missing}]" if missing else ""))
    return 0


def cmd_optimize(args) -> int:
    from . import optimize
    from .models import load_model, save

    model, default_inputs = load_model(args.model)
    dtype = _DTYPES[args.dtype]
    if args.input:
        inputs = tuple(torch.randn(*parse_shape(s)).to(dtype) if dtype.is_floating_point
                       else torch.zeros(parse_shape(s), dtype=dtype) for s in args.input)
    elif default_inputs is not None:
        inputs = default_inputs
    else:
        raise UsageError(f"{args.model} has no default input: give --input SHAPE (e.g. --input 1x3x224x224)")
    if dtype is not torch.float32 and dtype.is_floating_point:
        model = model.to(dtype)
    options: dict[str, dict[str, str]] = {}
    for text in args.option:
        pass_name, key, value = _parse_option(text)
        options.setdefault(pass_name, {})[key] = value
    console = _console()
    with console.status(f"optimizing {args.model} with {args.pipeline} (verify={args.verify})"):
        if args.capture_mode != "symbolic":
            from .capture import capture

            model = capture(model, inputs, mode=args.capture_mode)
        result = optimize(model, inputs, args.pipeline, verify=args.verify, on_failure=args.on_failure,
                          options=options or None)
    console.print(result.report.table())
    for line in result.report.details():
        console.print(line, markup=False, highlight=False)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(result.report.to_dict(), indent=2))
    if args.backend:
        from .lowering import lower

        out = args.output or f"{Path(args.model.split(':')[-1]).stem}"
        with console.status(f"lowering to {args.backend} and verifying in its runtime"):
            artifact = lower(result.module, inputs, backend=args.backend, path=out)
        console.print(str(artifact), markup=False, highlight=False)
    elif args.output:
        n = save(result.module, args.output)
        console.print(f"wrote {args.output} ({n} bytes): graph code + state, load with graphopt.models.load(path, trust_code=True)",
                      markup=False, highlight=False)
    return 1 if result.report.failed else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.model, args.out)
