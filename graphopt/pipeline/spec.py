"""Pipelines: pipeline strings (``"a,b{x=1},c"``) parsed, presets expanded, and every pass
and option resolved into a list of invocations before anything runs; then the ordering
constraints the passes declare are checked against it.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from graphopt.errors import PipelineError
from graphopt.pipeline.contracts import Exact
from graphopt.pipeline.options import _options_from_function
from graphopt.pipeline.passes import PASSES, PRESETS, Invocation, Pass, get_pass

_ITEM = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline_string(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{x=1,y=two},c"`` -> ``[("a", {}), ("b", {"x": "1", "y": "two"}), ("c", {})]``."""
    items: list[tuple[str, dict[str, str]]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(
                f"cannot parse pipeline {text!r} at column {pos}: {text[pos:pos + 20]!r}; "
                "expected name or name{option=value,...} separated by commas"
            )
        opts: dict[str, str] = {}
        if m.group(2):
            for part in _split_options(m.group(2)):
                if "=" not in part:
                    raise PipelineError(f"option {part!r} of {m.group(1)!r} needs the form name=value")
                k, v = part.split("=", 1)
                opts[k.strip().replace("-", "_")] = v.strip()
        items.append((m.group(1), opts))
        pos = m.end()
    if not items:
        raise PipelineError("empty pipeline: name at least one pass or preset")
    return items


def _split_options(body: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def build_pipeline(spec: Any, overrides: dict[str, dict[str, Any]] | None = None) -> list[Invocation]:
    """Resolve a pipeline spec into invocations; every name and option is checked here,
    before anything runs. ``overrides`` maps pass name -> options set from Python."""
    invocations: list[Invocation] = []
    _expand(spec, invocations, depth=0)
    for name in overrides or {}:
        if not any(inv.name == name for inv in invocations):
            raise PipelineError(f"options given for pass {name!r}, which is not in the pipeline")
    for inv in invocations:
        extra = (overrides or {}).get(inv.name, {})
        inv.options = inv.pass_.resolve_options({**inv.options, **extra})
    check_ordering(invocations)
    return invocations


def _expand(spec: Any, out: list[Invocation], depth: int) -> None:
    if depth > 8:
        raise PipelineError("presets nest more than 8 deep; is a preset referring to itself?")
    if isinstance(spec, str):
        for name, opts in parse_pipeline_string(spec):
            if name in PRESETS and name not in PASSES:
                if opts:
                    raise PipelineError(f"preset {name!r} takes no options; set them on its passes")
                _expand(PRESETS.get(name).pipeline, out, depth + 1)
            else:
                p = get_pass(name)
                p.resolve_options(opts)  # unknown options fail here, before anything runs
                out.append(Invocation(p, dict(opts)))
        return
    if isinstance(spec, Invocation):
        out.append(Invocation(spec.pass_, dict(spec.options)))
        return
    if isinstance(spec, Pass):
        out.append(Invocation(spec, {}))
        return
    if callable(spec) and not isinstance(spec, (list, tuple)):
        for p in PASSES.items().values():
            if p.fn is spec:
                out.append(Invocation(p, {}))
                return
        name = getattr(spec, "__name__", "anonymous").replace("_", "-").lower()
        adhoc = Pass(name=f"{name}", fn=spec, contract=Exact(), options=_options_from_function(spec),
                     doc=inspect.getdoc(spec) or "")
        out.append(Invocation(adhoc, {}))
        return
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise PipelineError("empty pipeline: name at least one pass or preset")
        for item in spec:
            _expand(item, out, depth)
        return
    raise PipelineError(f"cannot build a pipeline from {type(spec).__name__}: use a string, a pass or a list")


def check_ordering(invocations: list[Invocation]) -> None:
    """Raise PipelineError listing every declared ordering constraint the pipeline breaks.

    Constraints are never fixed by reordering: the user's order is what runs.
    """
    import networkx as nx

    position: dict[str, list[int]] = {}
    for i, inv in enumerate(invocations):
        position.setdefault(inv.name, []).append(i)
    g = nx.DiGraph()
    for inv in invocations:
        for earlier in inv.pass_.after:
            g.add_edge(earlier, inv.name)
        for later in inv.pass_.before:
            g.add_edge(inv.name, later)
    problems = []
    try:
        cycle = nx.find_cycle(g)
        problems.append("declared constraints form a cycle: " + " -> ".join(a for a, _ in cycle))
    except nx.NetworkXNoCycle:
        pass
    for a, b in g.edges:
        if a in position and b in position and min(position[b]) < min(position[a]):
            problems.append(f"{b!r} (step {min(position[b]) + 1}) must run after {a!r} (step {min(position[a]) + 1})")
    if problems:
        raise PipelineError(
            "pipeline order breaks declared constraints: " + "; ".join(problems)
            + ". Reorder the pipeline (graphopt never reorders it for you)."
        )


def inference_presets(spec: Any) -> list[str]:
    """Presets meant for inference that a pipeline spec names, directly or nested in presets."""
    found: list[str] = []

    def walk(item: Any, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(item, (list, tuple)):
            for x in item:
                walk(x, depth)
        elif isinstance(item, str):
            try:
                names = [name for name, _ in parse_pipeline_string(item)]
            except PipelineError:
                return
            for name in names:
                preset = PRESETS.peek(name) if name in PRESETS and name not in PASSES else None
                if preset is not None:
                    if preset.inference and name not in found:
                        found.append(name)
                    walk(preset.pipeline, depth + 1)

    walk(spec, 0)
    return found
