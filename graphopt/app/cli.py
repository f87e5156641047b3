"""The ``graphopt`` command line.

    graphopt optimize MODEL --input 1x3x224x224 --pipeline mobile-fp32 --backend onnx -o m.onnx
    graphopt passes
    graphopt models
    graphopt demo
    graphopt explore MODEL --pipeline mobile-int8   (optimize, then open the graphs in Model Explorer)

Exit codes: 0 done; 1 done, but some pass failed verification (rolled back, see the report);
2 nothing or not everything was done: bad arguments, an output path that cannot be written
(checked before the pipeline runs), or any graphopt error. Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from graphopt.errors import GraphoptError

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

    # optimize's arguments; explore takes them too (it runs the same pipeline, then serves its graphs)
    o = _Parser(add_help=False)
    o.add_argument("model", help="built-in example, package.module:factory, path/file.py:factory or torchvision:NAME")
    o.add_argument("--input", action="append", default=[], metavar="SHAPE",
                   help="example input shape such as 1x3x224x224 (repeat for several inputs)")
    o.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    o.add_argument("--pipeline", default="mobile-fp32", help="preset or pipeline string (default mobile-fp32)")
    o.add_argument("--verify", default="each", choices=["each", "final", "none"])
    o.add_argument("--on-failure", default="rollback", choices=["rollback", "raise"])
    o.add_argument("--option", action="append", default=[], metavar="PASS.NAME=VALUE")
    o.add_argument("--backend", default=None,
                   help="lower with this backend (onnx, torchscript-mobile, ...); default: the one whose "
                        "suffix -o has (.onnx, .ptl, .pte)")
    o.add_argument("-o", "--output", default=None,
                   help="output path: an artifact (.onnx, .ptl, .pte) or a graph module file (.pt); "
                        "missing folders are created")
    o.add_argument("--report-json", default=None,
                   help="also write the report as JSON here (atomically; missing folders are created)")
    o.add_argument("--report", default=None, metavar="HTML",
                   help="also write the HTML report here: the pass table and each pass's graph before and after "
                        "(needs Graphviz's dot)")
    o.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="print the graph after this pass (repeat, or join names by ','), to stderr")
    o.add_argument("--print-ir-after-all", action="store_true", help="print the graph after every pass")
    o.add_argument("--print-ir-after-change", action="store_true",
                   help="print only after passes that changed the graph (alone: after every such pass)")
    o.add_argument("--print-ir-after-failure", action="store_true",
                   help="print the graph a failing pass left, before it is rolled back")
    o.add_argument("--calibration-data", default=None, metavar="FILE",
                   help="calibration batches: a .pt list of input tuples, a .npy array (one input; first axis "
                        "over batches) or a .npz of one array per input")
    o.add_argument("--capture-mode", default="auto", choices=["auto", "symbolic", "export"],
                   help="auto (default): symbolic tracing, torch.export where that fails")
    o.add_argument("--dynamic", default="batch", metavar="SPEC",
                   help="input dims that stay dynamic: 'batch' (default: dim 0), 'static', or "
                        "INPUT.DIM=NAME,... with INPUT a forward parameter name or input index "
                        "(e.g. input_ids.0=batch,input_ids.1=seq)")
    sub.add_parser("optimize", parents=[o], help="capture, optimize and (optionally) lower a model")
    e = sub.add_parser("explore", parents=[o],
                       help="optimize, then open each state of the graph in Model Explorer with graphopt's node data "
                            "(needs the explorer extra: pip install 'graphopt[explorer]'); serves until Ctrl-C")
    e.add_argument("--port", type=int, default=8080, help="Model Explorer's local server port (default 8080)")
    e.add_argument("--no-browser", action="store_true", help="serve only; do not open a browser tab")

    sub.add_parser("passes", help="list registered passes with contracts and options")
    sub.add_parser("models", help="list built-in example models")
    sub.add_parser("backends", help="list registered backends")
    d = sub.add_parser("demo", help="the whole job on a built-in model: optimize, lower to every backend, compare")
    d.add_argument("--model", default="resnet_cnn")
    d.add_argument("--out", default="out/demo",
                   help="directory for the artifacts and the HTML report, report.html (default out/demo)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return {"optimize": cmd_optimize, "passes": cmd_passes, "models": cmd_models,
                "backends": cmd_backends, "demo": cmd_demo, "explore": cmd_explore}[args.command](args)
    except UsageError as exc:
        message = _one_line(str(exc))
        print(message if message.startswith("graphopt") else f"graphopt: error: {message}", file=sys.stderr)
        return 2
    except GraphoptError as exc:
        print(f"graphopt: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing an output failed after all (disk full, permissions changed, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"graphopt: error: {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    """Messages may carry a hint on a line of its own; the command line prints one line."""
    out = ""
    for line in (ln.strip() for ln in message.splitlines()):
        if line:
            out += line if not out else (" " if out[-1] in ".:;,?!" else "; ") + line
    return out


def _check_folder(folder: Path, what: str) -> None:
    """UsageError unless ``folder`` is a writable folder or can be made: the nearest part of it
    that exists is a folder we may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: cannot write in folder {existing} (permission denied)")


def _check_output_file(path: Path, flag: str) -> Path:
    """``path`` if a file can be written there (missing folders are made when it is written)."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} {path}: exists and is not a regular file")
    _check_folder(path.parent, f"{flag} {path}")
    return path


def _plan_output(model_ref: str, backend: str | None, output: str | None) -> tuple[str | None, Path | None]:
    """(backend or None for a graph module file, checked output path or None), before anything runs.

    Without --backend, an -o suffix that is a backend's (.onnx, .ptl, .pte) picks that backend;
    any other suffix (.pt) writes a graph module file. A --backend whose suffix differs from the
    one -o has, when that suffix is another backend's, is refused.
    """
    from graphopt.errors import LoweringError
    from graphopt.lowering.backend import available_backends, get_backend

    if output == "":
        raise UsageError("-o: empty path; give a file path")
    if backend is not None:
        get_backend(backend)  # an unknown name fails here, with close names
    if output is not None:
        by_suffix = {cls.suffix.lower(): name for name, cls in available_backends().items() if cls.suffix}
        implied = by_suffix.get(Path(output).suffix.lower())
        if backend is None:
            backend = implied
        elif implied is not None and implied != backend:
            raise UsageError(
                f"-o {output}: {Path(output).suffix} is the {implied} backend's suffix but --backend is {backend}; "
                f"write {Path(output).with_suffix(get_backend(backend).suffix or Path(output).suffix)} or "
                f"drop --backend to lower with {implied}"
            )
    if backend is None:
        return None, None if output is None else _check_output_file(Path(output), "-o")
    cls = get_backend(backend)
    missing = cls.unavailable()
    if missing is not None:
        raise LoweringError(f"{backend}: cannot run on this machine: {missing}")
    out = Path(output if output is not None else Path(model_ref.split(":")[-1]).stem)
    if out.is_dir():
        raise UsageError(f"-o {out}: is a folder; give a file path such as {out / ('model' + cls.suffix)}")
    if not out.suffix:
        out = out.with_name(out.name + cls.suffix)
    return backend, _check_output_file(out, "-o")


def _write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically: the complete new file or the old one, never half of it."""
    from graphopt.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as staged, open(staged, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def cmd_passes(args) -> int:
    from rich.table import Table

    from graphopt import available_passes, available_presets

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
    from graphopt.app import examples

    for name, entry in examples.EXAMPLES.items():
        print(f"{name:20s} {getattr(entry, 'description', '')}")
    return 0


def cmd_backends(args) -> int:
    from graphopt.lowering.backend import available_backends

    for name, b in available_backends().items():
        missing = b.unavailable()
        line = (b.__doc__ or "").strip().splitlines()[0] if b.__doc__ else ""
        print(f"{name:20s} {line}" + (f" [unavailable: {missing}]" if missing else ""))
    return 0


def parse_dynamic(text: str) -> Any:
    """``--dynamic``: 'batch', 'static', or INPUT.DIM=NAME pairs -> what capture's dynamic_shapes takes."""
    if text in ("batch", "static"):
        return text
    by_name: dict[str, dict[int, str]] = {}
    for item in text.split(","):
        m = re.fullmatch(r"([A-Za-z_]\w*|\d+)\.(-?\d+)=([A-Za-z_]\w*)", item.strip())
        if not m:
            raise UsageError(f"--dynamic {text!r}: expected 'batch', 'static' or INPUT.DIM=NAME pairs joined by ',', "
                             "e.g. input_ids.0=batch,input_ids.1=seq")
        by_name.setdefault(m.group(1), {})[int(m.group(2))] = m.group(3)
    if all(key.isdigit() for key in by_name):  # by input index
        count = max(int(key) for key in by_name) + 1
        return tuple(by_name.get(str(i)) for i in range(count))
    if any(key.isdigit() for key in by_name):
        raise UsageError(f"--dynamic {text!r}: name every input by index or every input by parameter name, not both")
    return by_name


def cmd_optimize(args) -> int:
    from graphopt import optimize
    from graphopt.app.models import load_model, save

    # everything that can be checked without the model is checked first: no pipeline run is lost
    dynamic = parse_dynamic(args.dynamic)
    shapes = [parse_shape(s) for s in args.input]
    backend, out = _plan_output(args.model, args.backend, args.output)
    report_json = None if args.report_json is None else _check_output_file(Path(args.report_json), "--report-json")
    report_html = None if args.report is None else _check_output_file(Path(args.report), "--report")
    written = [(flag, p) for flag, p in (("-o", out), ("--report-json", report_json), ("--report", report_html))
               if p is not None]
    for i, (flag_a, a) in enumerate(written):
        for flag_b, b in written[i + 1:]:
            if a.resolve() == b.resolve():
                raise UsageError(f"{flag_a} and {flag_b} name the same file {a}; give two paths")
    if report_html is not None:
        from graphopt.view.layout import require_dot

        require_dot()
    hooks = _ir_printing(args)
    model, default_inputs = load_model(args.model)
    dtype = _DTYPES[args.dtype]
    if shapes:
        inputs = tuple(torch.randn(*shape).to(dtype) if dtype.is_floating_point
                       else torch.zeros(shape, dtype=dtype) for shape in shapes)
    elif default_inputs is not None:
        inputs = default_inputs
        if dtype.is_floating_point:  # the model is converted below: its example inputs must follow
            inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for t in inputs)
    else:
        raise UsageError(f"{args.model} has no default input: give --input SHAPE (e.g. --input 1x3x224x224)")
    if dtype is not torch.float32 and dtype.is_floating_point:
        model = model.to(dtype)
    options: dict[str, dict[str, str]] = {}
    for text in args.option:
        pass_name, key, value = _parse_option(text)
        options.setdefault(pass_name, {})[key] = value
    calibration = None
    if args.calibration_data is not None:
        from graphopt.app.calibration_files import load_calibration_file

        calibration = load_calibration_file(args.calibration_data, inputs, _calibration_dims(dynamic, inputs))
    console = _console()
    original = model
    if isinstance(dynamic, tuple) and len(dynamic) < len(inputs):
        dynamic = dynamic + (None,) * (len(inputs) - len(dynamic))
    if args.capture_mode != "auto":
        from graphopt.capture import capture

        with console.status(f"capturing {args.model} ({args.capture_mode})"):
            model = capture(model, inputs, mode=args.capture_mode, dynamic_shapes=dynamic)
    # optimize's own bar (on a terminal) shows capture and each pass
    result = optimize(model, inputs, args.pipeline, verify=args.verify, on_failure=args.on_failure,
                      options=options or None, dynamic_shapes=dynamic, calibration_data=calibration,
                      hooks=hooks, keep_graphs=report_html is not None or args.command == "explore")
    console.print(result.report.table())
    for line in result.report.details():
        console.print(line, markup=False, highlight=False)
    if report_json is not None:
        _write_json(report_json, result.report.to_dict())
    if report_html is not None:
        console.print(f"wrote {result.report.save_html(report_html)}", markup=False, highlight=False)
    if backend is not None:
        from graphopt.lowering import lower

        out.parent.mkdir(parents=True, exist_ok=True)
        # checked against the graph and the model itself; a lossy pipeline's distance from the
        # model is the report's to give (only shapes are held against the model then); lower's own
        # bar (on a terminal) shows export, load and verify
        lossy = any(r.changed and r.contract.startswith("lossy") for r in result.report.records)
        artifact = lower(result.module, inputs, backend=backend, path=out, reference=original,
                         reference_tolerance=_loose() if lossy else None)
        console.print(str(artifact), markup=False, highlight=False)
    elif out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        n = save(result.module, out)
        console.print(f"wrote {out} ({n} bytes): graph code + state, load with graphopt.app.models.load(path, trust_code=True)",
                      markup=False, highlight=False)
    if args.command == "explore":
        from graphopt.view import explorer

        console.print(f"Model Explorer on http://localhost:{args.port}/ (Ctrl-C stops it)", markup=False, highlight=False)
        explorer.explore(result.report, port=args.port, open_browser=not args.no_browser)
    return 1 if result.report.failed else 0


def cmd_explore(args) -> int:
    from graphopt.view import explorer

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a port number between 1 and 65535")
    explorer.require()  # before the run: say what to install
    return cmd_optimize(args)


def _ir_printing(args) -> list:
    """The --print-ir-* flags as a hook (none when no flag is given); pass names are checked."""
    names = [n.strip() for text in args.print_ir_after for n in text.split(",") if n.strip()]
    if not (names or args.print_ir_after_all or args.print_ir_after_change or args.print_ir_after_failure):
        return []
    from graphopt import available_passes
    from graphopt.pipeline.printing import PrintIR

    known = available_passes()
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; passes: {', '.join(known)}"
            raise UsageError(f"--print-ir-after {name}: no such pass{hint}")
    return [PrintIR(names, after_all=args.print_ir_after_all, after_change=args.print_ir_after_change,
                    after_failure=args.print_ir_after_failure)]


def _calibration_dims(dynamic: Any, inputs: tuple) -> list[frozenset[int]] | None:
    """The dims calibration batches may differ in, as far as the command line knows before
    capture: dim 0 for 'batch', none for 'static', every dim for a spec by name or index (the
    quantize pass checks the batches again against the dims the graph declares)."""
    if dynamic == "batch":
        return None
    if dynamic == "static":
        return [frozenset() for _ in inputs]
    return [frozenset(range(t.dim())) if isinstance(t, torch.Tensor) else frozenset() for t in inputs]


def _loose() -> Any:
    from graphopt.verify import Tolerance

    return Tolerance(float("inf"), float("inf"))


def cmd_demo(args) -> int:
    from graphopt.app.demo import run_demo

    _check_folder(Path(args.out), f"--out {args.out}")
    return run_demo(args.model, args.out)  # without Graphviz it skips its HTML report and says why
