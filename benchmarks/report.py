"""What a benchmark run leaves behind: ``bench.json`` (every figure and the environment),
``report.md`` (the tables), ``charts/*.png`` (matplotlib) and ``README-headline.md`` (the
headline table with date and machine, ready to paste into the project README).

The results dict that :mod:`benchmarks.run` assembles and this module renders::

    {"environment": {...}, "settings": {...}, "rows": [...], "goals": [...],
     "external": {"bench_quantize": {...}, "bench_prune": {...}, "bench_executorch": {...}},
     "scaling": {"spine": {...}, "fusion": {...}}, "wall_s": ...}

``rows`` are :func:`benchmarks.bench_fp32.bench_model`'s; ``external`` holds what the
quantization, pruning and ExecuTorch benchmarks wrote (their JSON files and Markdown tables).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

#: packages whose versions the figures depend on
_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "onnxslim", "onnxsim",
             "torch-pruning", "numpy", "graphopt")


# ----------------------------------------------------------------------------- environment


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package, None where it is missing."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(threads: list[int]) -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    import torch
    import torch.backends.xnnpack

    versions = package_versions(_PACKAGES)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx_vnni")),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "xnnpack": bool(torch.backends.xnnpack.enabled),
        "threads": threads,
        "commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags(wanted: tuple[str, ...]) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_line(env: dict[str, Any]) -> str:
    v = env["versions"]
    return (f"{env['cpu']} ({env['cores']} cores, {', '.join(env['cpu_flags']) or 'no AVX2'}, "
            f"{env['memory_gib']} GiB), torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, "
            f"{_load_summary(env)}")


def _load_summary(env: dict[str, Any]) -> str:
    """The 1-minute load average over the run: other work on the machine slows every figure."""
    start = env["load_average_at_start"][0]
    end = env.get("load_average_at_end", [start])[0]
    samples = [s[1] for s in env.get("load_samples", [])]
    if not samples:  # runs from before the harness sampled the load in between
        return f"load average {start:.1f} at start and {end:.1f} at end"
    loads = [start, *samples, end]
    return f"load average {min(loads):.1f} to {max(loads):.1f} during the run"


# ------------------------------------------------------------------------------ formatting


def _ms(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _count(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _err(x: float | None) -> str:
    if x is None:
        return ""
    return "0" if x == 0 else "nan" if math.isnan(x) else f"{x:.1e}"


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- tables


def _models(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def headline_table(results: dict[str, Any], threads: int) -> str:
    """Speed-up over eager fp32 per path (rows) and model (columns) at ``threads`` threads,
    the first row giving eager fp32's median in ms."""
    rows = results["rows"]
    models = _models(rows)
    t = str(threads)
    by_key = {(r["model"], r["key"]): r for r in rows}
    labels = list(dict.fromkeys((r["key"], r["label"]) for r in rows))
    body = []
    for key, label in labels:
        cells = []
        for m in models:
            r = by_key.get((m, key))
            if r is None:
                cells.append("")
            elif key == "eager":
                cells.append(_ms(r["latency_ms"].get(t)) or r["status"])
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{r['speedup'][t]:.2f}" if t in r["speedup"] else "")
        body.append([f"{label}, ms" if key == "eager" else label, *cells])
    return _table(["path", *models], body)


def model_table(results: dict[str, Any], model: str) -> str:
    threads = [str(t) for t in results["settings"]["threads"]]
    header = ["path", "runtime"]
    for t in threads:
        header += [f"{t}T ms", f"{t}T speed-up"]
    header += ["bytes", "params", "MACs", "nodes", "max err", "pipeline s", "export s", "peak MiB", "note"]
    body = []
    for r in results["rows"]:
        if r["model"] != model:
            continue
        cells = [r["label"], r["runtime"]]
        for t in threads:
            cells += [_ms(r["latency_ms"].get(t)), f"{r['speedup'][t]:.2f}x" if t in r["speedup"] else ""]
        peak = r.get("peak_rss_bytes")
        note = r.get("note", "") if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        cells += [_bytes(r.get("artifact_bytes")), _count(r.get("parameters")), _count(r.get("macs")),
                  r.get("nodes") if r.get("nodes") is not None else "", _err(r.get("max_abs_error")),
                  _s(r.get("pipeline_s")), _s(r.get("export_s")), "" if peak is None else f"{peak / 2**20:.0f}", note]
        body.append(cells)
    return _table(header, body, "ll" + "r" * (len(header) - 3) + "l")


def goals_table(results: dict[str, Any]) -> str:
    body = [[g["issue"], g["goal"], g["model"], g["threads"], _ms(g["graphopt_ms"]), g["best_peer"], _ms(g["peer_ms"]),
             f"{g['ratio']:.2f}x", g["verdict"]] for g in results["goals"]]
    return _table(["issue", "goal", "model", "threads", "graphopt ms", "best peer", "peer ms", "peer / graphopt", "verdict"],
                  body, "lllrrlrrl")


def goals_summary(results: dict[str, Any]) -> list[str]:
    """One line per goal: in how many (model, threads) cases it was met."""
    lines = []
    for goal in dict.fromkeys(g["goal"] for g in results["goals"]):
        cases = [g for g in results["goals"] if g["goal"] == goal]
        met = sum(g["verdict"] == "met" for g in cases)
        noise = sum(g["verdict"] == "missed, within noise" for g in cases)
        missed = [f"{g['model']} {g['threads']}T ({g['ratio']:.2f}x)" for g in cases if g["verdict"] == "missed"]
        lines.append(f"- issue {cases[0]['issue']}, {goal}: met in {met} of {len(cases)} cases, "
                     f"{noise} missed within noise" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return lines


def failures_table(results: dict[str, Any]) -> str:
    body = [[r["model"], r["label"], r["status"], r["reason"]] for r in results["rows"] if r["status"] != "ok"]
    return _table(["model", "path", "status", "reason"], body, "llll") if body else "No failures."


# -------------------------------------------------------------------------------- markdown


def headline_markdown(results: dict[str, Any], chart: str | None) -> str:
    """The headline: speed-up tables per thread count, date and machine, the chart."""
    env = results["environment"]
    parts = [f"Measured {env['date'][:10]} on {machine_line(env)}; "
             f"median of {results['settings']['runs']} calls per path, all paths of a model timed round robin "
             f"in one process (`python -m benchmarks.run{' --quick' if results['settings']['quick'] else ''}`). "
             "Speed-up over eager fp32, higher is better; differences under about 0.25x are noise on this machine."]
    for t in results["settings"]["threads"]:
        parts.append(f"**{t} thread{'s' if t > 1 else ''}**\n\n" + headline_table(results, t))
    if results["goals"]:
        parts.append("Goals (issue 3: fusion, issue 4: backends):\n\n" + "\n".join(goals_summary(results)))
    if chart:
        parts.append(f"![speed-up over eager fp32 per model and path]({chart})")
    return "\n\n".join(parts) + "\n"


def markdown(results: dict[str, Any], charts: dict[str, str]) -> str:
    env, settings = results["environment"], results["settings"]
    out = [f"# graphopt benchmark report{' (quick)' if settings['quick'] else ''}",
           f"{env['date']} — {machine_line(env)}; graphopt commit {env['commit']}; XNNPACK in torch: {env['xnnpack']}. "
           f"Threads {settings['threads']}, {settings['runs']} timed calls per path and thread count, "
           f"wall time of the whole run {results['wall_s'] / 60:.1f} min.",
           "Column meanings: `benchmarks/README.md`.",
           "## Headline", headline_markdown(results, charts.get("latency")).rstrip()]
    if results["goals"]:
        out += ["## Goals of issues 3 and 4", goals_table(results)]
    out.append("## Per model")
    for model in _models(results["rows"]):
        out += [f"### {model}", model_table(results, model)]
    out += ["## Failures and unavailable paths", failures_table(results)]
    external = results.get("external", {})
    out += ["## Quantization and pruning",
            *_external_sections({k: v for k, v in external.items() if k not in _OWN_SECTIONS})]
    if charts.get("accuracy"):
        out.append(f"![accuracy vs size]({charts['accuracy']})")
    if charts.get("error"):
        out.append(f"![max error vs artifact size]({charts['error']})")
    for module, heading in _OWN_SECTIONS.items():
        out += [f"## {heading}", *_external_sections({module: external[module]} if module in external else {})]
    out += ["## Scaling", *_scaling_sections(results.get("scaling", {}))]
    if charts.get("scaling"):
        out.append(f"![scaling]({charts['scaling']})")
    out.append(f"Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}.")
    return "\n\n".join(out) + "\n"


#: external modules whose tables get a section of their own rather than "Quantization and pruning"
_OWN_SECTIONS = {"bench_executorch": "ExecuTorch", "bench_corpus": "Corpus"}


def _external_sections(external: dict[str, Any]) -> list[str]:
    if not external:
        return ["Not run (section skipped)."]
    parts = []
    for name, ext in external.items():
        head = f"### {name}: {ext['status']}" + (f" — {ext['reason']}" if ext.get("reason") else "")
        parts.append(head)
        for md_name, text in ext.get("markdown", {}).items():
            parts.append(f"From `{md_name}`:\n\n{_demoted(text.strip())}")
    return parts


def _demoted(markdown_text: str) -> str:
    """Headings two levels down, so an embedded report nests under this one's sections."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown_text.splitlines())


def _scaling_sections(scaling: dict[str, Any]) -> list[str]:
    if not scaling:
        return ["Not run (section skipped)."]
    parts = []
    spine = scaling.get("spine")
    if spine:
        parts.append("### Spine: capture + canonicalize + dead-code elimination vs torch.fx.symbolic_trace "
                     "(`benchmarks/bench_spine.py`)")
        parts.append(spine["markdown"].strip() if spine.get("markdown") else f"{spine['status']}: {spine.get('reason', '')}")
    wide = scaling.get("spine_wide")
    if wide:
        parts.append("The same with 32-channel layers (parameters about as large as the graph):")
        parts.append(wide["markdown"].strip() if wide.get("markdown") else f"{wide['status']}: {wide.get('reason', '')}")
    fusion = scaling.get("fusion")
    if fusion:
        parts.append("### Fusion: graphopt mobile-fp32 vs torch.fx and torch.ao on the same conv-BN-ReLU stacks")
        parts.append(fusion_table(fusion) if fusion.get("rows") else f"{fusion['status']}: {fusion.get('reason', '')}")
    return parts


def fusion_table(fusion: dict[str, Any]) -> str:
    tools = list(dict.fromkeys(k for r in fusion["rows"] for k in r.get("tools", {})))
    header = ["compute nodes", *[f"{t} s" for t in tools], *[f"{t} peak MiB" for t in tools]]
    body = []
    for r in fusion["rows"]:
        if "error" in r:
            body.append([r.get("compute_nodes", r["target_nodes"]), f"failed: {r['error']}", *[""] * (len(header) - 2)])
            continue
        cells = [r["compute_nodes"]]
        cells += [_s(r["tools"][t]["seconds"]) if "seconds" in r["tools"].get(t, {}) else r["tools"].get(t, {}).get("error", "")
                  for t in tools]
        cells += ["" if r["tools"].get(t, {}).get("peak_rss_bytes") is None else f"{r['tools'][t]['peak_rss_bytes'] / 2**20:.0f}"
                  for t in tools]
        body.append(cells)
    return _table(header, body)


# ---------------------------------------------------------------------------------- charts


def charts(results: dict[str, Any], directory: Path) -> dict[str, str]:
    """Draw the PNG charts the data allows; name -> path. Nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, draw in (("latency", _latency_chart), ("error", _error_chart), ("accuracy", _accuracy_chart),
                       ("scaling", _scaling_chart)):
        path = directory / f"{name}.png"
        if draw(results, path):
            drawn[name] = str(path)
    return drawn


def _latency_chart(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok" and r["key"] != "eager"]
    models = [m for m in _models(results["rows"]) if any(r["model"] == m for r in rows)]
    if not models:
        return False
    threads = [str(t) for t in results["settings"]["threads"]]
    cols = min(3, len(models))
    nrows = math.ceil(len(models) / cols)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 0.32 * len(labels) * nrows + 1.2 * nrows), squeeze=False)
    height = 0.8 / len(threads)
    for ax, model in zip(axes.flat, models):
        mine = {r["label"]: r for r in rows if r["model"] == model}
        for i, t in enumerate(threads):
            ys = [j + i * height for j in range(len(labels))]
            xs = [mine[lbl]["speedup"].get(t, 0) if lbl in mine else 0 for lbl in labels]
            colors = ["tab:blue" if lbl.startswith("graphopt") else "tab:gray" for lbl in labels]
            ax.barh(ys, xs, height=height, color=colors, alpha=1.0 if i == 0 else 0.55, label=f"{t} thread(s)")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")  # speed-ups span 0.5x to 100x+ (ORT on tiny models, loaded 2-thread runs)
        ax.set_yticks([j + height * (len(threads) - 1) / 2 for j in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("speed-up over eager fp32 (dark: 1 thread, light: 2)", fontsize=8)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("Latency: speed-up over eager fp32 (blue: graphopt, grey: peers)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _error_chart(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    points = [r for r in results["rows"] if r["status"] == "ok" and r.get("artifact_bytes") and r.get("max_abs_error") is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "int8": "s", "pruned": "^"}
    for model in _models(points):
        mine = [r for r in points if r["model"] == model]
        for precision, marker in markers.items():
            sel = [r for r in mine if r["precision"] == precision]
            if sel:
                ax.scatter([r["artifact_bytes"] for r in sel], [max(r["max_abs_error"], 1e-9) for r in sel], marker=marker,
                           label=f"{model} {precision}", alpha=0.75)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("artifact bytes")
    ax.set_ylabel("max |error| vs eager fp32 (floored at 1e-9)")
    ax.set_title("Error vs size, every path")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: size keys in the quantization/pruning JSON, by preference: absolute bytes, then relative sizes
_ABSOLUTE_SIZE_KEYS = ("bytes", "artifact_bytes", "size_bytes", "model_bytes", "file_bytes")
_RELATIVE_SIZE_KEYS = ("bytes_x", "size_x", "parameters_x")


def accuracy_points(obj: Any, source: str = "") -> list[dict[str, Any]]:
    """Every (accuracy, size) figure, anywhere in the quantization/pruning benchmarks' JSON.

    Their schema is theirs, so this reads any dict that holds numbers under a key naming an
    accuracy (``accuracy``, ``accuracy_finetuned``, ...) and a size: absolute bytes
    (:data:`_ABSOLUTE_SIZE_KEYS`) or, failing that, a size relative to the fp32 model
    (:data:`_RELATIVE_SIZE_KEYS`). One point per accuracy key:
    ``{"label", "accuracy", "size", "relative", "source"}``.
    """
    found = []
    if isinstance(obj, dict):
        numbers = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        size_key = next((k for k in _ABSOLUTE_SIZE_KEYS if k in numbers), None)
        relative = size_key is None
        if relative:
            size_key = next((k for k in _RELATIVE_SIZE_KEYS if k in numbers), None)
        label = " ".join(str(obj[k]) for k in ("model", "label", "variant", "name", "tool", "method", "path") if k in obj
                         and isinstance(obj[k], str)) or "?"
        if size_key is not None:
            for key in (k for k in numbers if "acc" in k.lower()):
                suffix = key.lower().replace("accuracy", "").strip("_")
                found.append({"label": f"{label} {suffix}".strip(), "accuracy": numbers[key], "size": numbers[size_key],
                              "relative": relative, "source": source})
        for v in obj.values():
            found += accuracy_points(v, source)
    elif isinstance(obj, list):
        for v in obj:
            found += accuracy_points(v, source)
    return found


def _accuracy_chart(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    points = [p for name, ext in results.get("external", {}).items()
              for fname, data in ext.get("json", {}).items() for p in accuracy_points(data, f"{name}/{fname}")]
    kinds = [k for k in (False, True) if any(p["relative"] is k for p in points)]
    if not kinds:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, relative in zip(axes.flat, kinds):
        spots: dict[tuple[float, float], list[dict[str, Any]]] = {}  # one label per spot: many variants coincide
        for p in (p for p in points if p["relative"] is relative):
            spots.setdefault((round(math.log10(max(p["size"], 1e-12)), 2), round(p["accuracy"], 4)), []).append(p)
        for i, group in enumerate(sorted(spots.values(), key=lambda g: g[0]["size"])):
            p = group[0]
            ours = sum("graphopt" in q["label"].lower() for q in group)
            color = "tab:gray" if not ours else "tab:blue" if ours == len(group) else "tab:purple"
            ax.scatter(p["size"], p["accuracy"], color=color)
            label = p["label"] + (f" (+{len(group) - 1} more)" if len(group) > 1 else "")
            ax.annotate(label, (p["size"], p["accuracy"]), fontsize=6, xytext=(3, 3 if i % 2 == 0 else -9),
                        textcoords="offset points")  # neighbours alternate above/below so labels do not collide
        ax.set_xscale("log")
        ax.set_xlabel("size relative to the fp32 model (bytes, else parameters)" if relative else "bytes")
        ax.set_ylabel("accuracy")
    fig.suptitle("Accuracy vs size (quantization and pruning benchmarks; blue: graphopt, grey: peers, purple: both)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _scaling_chart(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    scaling = results.get("scaling", {})
    spine = [r for r in scaling.get("spine", {}).get("rows", []) if "total_s" in r]
    fusion = [r for r in scaling.get("fusion", {}).get("rows", []) if "tools" in r]
    if not spine and not fusion:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, tuple[list[int], list[float], list[float | None]]] = {}
    for r in spine:
        for key, label in (("symbolic_trace_s", "fx.symbolic_trace"), ("capture_s", "graphopt capture"),
                           ("total_s", "graphopt capture+canonicalize+DCE")):
            xs, ts, ms = series.setdefault(label, ([], [], []))
            xs.append(r.get("compute_nodes", r["nodes"]))
            ts.append(r[key])
            ms.append(r.get("peak_rss_growth_bytes") if key == "total_s" else None)  # bench_spine measures the whole
    for r in fusion:
        for tool, fig_ in r["tools"].items():
            if "seconds" in fig_:
                xs, ts, ms = series.setdefault(tool, ([], [], []))
                xs.append(r["compute_nodes"])
                ts.append(fig_["seconds"])
                ms.append(fig_.get("peak_rss_bytes"))
    for label, (xs, ts, ms) in series.items():
        style = "-o" if "graphopt" in label else "--s"
        ax_t.plot(xs, ts, style, label=label)
        pts = [(x, m / 2**20) for x, m in zip(xs, ms) if m is not None]
        if pts:
            ax_m.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS growth, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute nodes (calls) in the graph")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Scaling on deep conv-BN-ReLU stacks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------- write


def write(results: dict[str, Any], out: Path, repo_root: Path) -> dict[str, Path]:
    """Write JSON, Markdown, charts and the headline; name -> path written."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = charts(results, out / "charts")
    relative_to_report = {k: os.path.relpath(v, out) for k, v in drawn.items()}
    written = {"json": out / "bench.json", "markdown": out / "report.md", "headline": out / "README-headline.md"}
    written["json"].write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    written["markdown"].write_text(markdown(results, relative_to_report))
    latency_chart = drawn.get("latency")
    chart_from_root = _relative_or_absolute(latency_chart, repo_root) if latency_chart else None
    written["headline"].write_text("## Benchmarks\n\n" + headline_markdown(results, chart_from_root)
                                   + f"\nFull report: `{_relative_or_absolute(str(written['markdown']), repo_root)}`.\n")
    written.update({f"chart:{k}": Path(v) for k, v in drawn.items()})
    return written


def _relative_or_absolute(path: str, root: Path) -> str:
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(root.resolve()))
    except ValueError:
        return str(resolved)


def main(argv: list[str] | None = None) -> int:
    """Render the report again from a run's ``bench.json`` (after a change to this module)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("out", nargs="?", default="benchmarks/results", help="folder holding bench.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = json.loads((out / "bench.json").read_text())
    for name, path in write(results, out, Path(__file__).resolve().parent.parent).items():
        print(f"{name}: {path}")
    return 0


def _jsonable(obj: Any) -> Any:
    """NaN and infinities as strings: JSON has no spelling for them."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    raise SystemExit(main())
