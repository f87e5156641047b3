"""The report of a pipeline run: one :class:`PassRecord` per pass, the final verdict, and
the table and details ``str(report)`` shows (the HTML report shows the same rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphopt.fileio import jsonable


@dataclass
class PassRecord:
    """What one pass did: status, timing, sizes, rewrites, error figures."""

    name: str
    status: str  # "changed" | "unchanged" | "rolled-back" | "failed"
    seconds: float
    nodes_before: int
    nodes_after: int
    rewrites: int
    param_bytes_before: int
    param_bytes_after: int
    changed: bool
    contract: str
    options: dict[str, Any] = field(default_factory=dict)
    max_abs_error: float | None = None
    min_sqnr_db: float | None = None
    #: "ok" (checked against its contract), "no budget" (lossy without a numeric budget: outputs
    #: changed, measured where verified, never judged) or None (not checked, or failed: see status)
    check: str | None = None
    error: str | None = None
    declines: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    #: parameters and buffers the module holds (read by the graph or not) before and after
    tensors_before: int = 0
    tensors_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["declines"] = [{"node": n, "reason": r} for n, r in self.declines]
        d["options"] = {k: jsonable(v) for k, v in self.options.items()}
        d["figures"] = {k: jsonable(v) for k, v in self.figures.items()}
        for k in ("max_abs_error", "min_sqnr_db"):
            d[k] = jsonable(d[k])
        return d


@dataclass(frozen=True)
class HistoryPoint:
    """A node's error against the original graph after one pass (:meth:`Report.node_history`)."""

    record: int  # index into Report.records
    pass_name: str
    error: Any  # graphopt.verify.history.NodeError

    def __str__(self) -> str:
        return f"after pass #{self.record + 1} {self.pass_name}: {self.error}"


@dataclass
class Report:
    """Per-pass records plus the final verdict; ``str()`` is a table, ``to_dict()`` is JSON-able."""

    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    final_verdict: Any = None
    seconds: float = 0.0
    #: lossy passes without a numeric budget that changed the graph (their loss is not judged)
    unbudgeted: list[str] = field(default_factory=list)
    #: remarks about the whole run (a model in training mode, ...), shown before the passes' own
    notes: list[str] = field(default_factory=list)
    #: the graph's inputs with their dynamic dims by name, and dims kept static with why
    #: (:func:`graphopt.ir.shapes.describe`); ``checked_at``: the second sizes verification used
    shapes: list[str] = field(default_factory=list)
    checked_at: dict[str, int] = field(default_factory=dict)
    #: the graph before and after each pass that changed it or declined somewhere, by index into
    #: ``records`` (:class:`graphopt.ir.diff.GraphView`); consecutive passes share a view.
    #: Kept only when the run was asked to (``keep_graphs=True``; ``graphs_kept`` says so)
    graphs: dict[int, tuple[Any, Any]] = field(default_factory=dict, repr=False)
    graphs_kept: bool = True
    #: per-node error against the original graph after each pass that changed values, by index
    #: into ``records``: provenance -> :class:`graphopt.verify.history.NodeError`. Recorded with
    #: ``verify="each"``; exact passes whose outputs stayed bit-equal have no entry
    numeric_history: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: the lowest SQNR floor among the budgeted lossy passes that changed the graph: the final
    #: check holds the whole run to it (a run cannot be within every pass's budget and below it)
    sqnr_floor_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "shapes": list(self.shapes),
            "checked_at": dict(self.checked_at),
            "records": [r.to_dict() for r in self.records],
            "final_check": self.final_check,
            "unbudgeted_lossy_passes": list(self.unbudgeted),
            "final_verdict": self.final_verdict.to_dict() if self.final_verdict is not None else None,
            "numeric_history": [
                {"record": i, "pass": self.records[i].name, "nodes": {k: e.to_dict() for k, e in errors.items()}}
                for i, errors in sorted(self.numeric_history.items())
            ],
        }

    def node_history(self, node: str) -> list[HistoryPoint]:
        """The error of ``node`` (a provenance: the module path or original node name, as the
        per-pass entries of :attr:`numeric_history` key it) after each pass that recorded it."""
        return [HistoryPoint(i, self.records[i].name, errors[node])
                for i, errors in sorted(self.numeric_history.items()) if node in errors]

    def first_below(self, node: str, min_sqnr_db: float) -> HistoryPoint | None:
        """The first pass after which ``node``'s value is below ``min_sqnr_db`` against the
        original graph (None if it never is, or has no history)."""
        return next((p for p in self.node_history(node) if p.error.sqnr_db < min_sqnr_db), None)

    def history_lines(self, worst: int = 3) -> list[str]:
        """One line per pass with a numeric history entry: how many values were compared and the
        ``worst`` of them (lowest SQNR against the original graph)."""
        lines = []
        for i, errors in sorted(self.numeric_history.items()):
            ranked = sorted(errors.items(), key=lambda item: (item[1].sqnr_db, -item[1].max_abs))[:worst]
            shown = "; ".join(f"{node} {error}" for node, error in ranked) or "none corresponds"
            lines.append(f"{self.records[i].name} (#{i + 1}): per-node error against the original graph, "
                         f"{len(errors)} value(s) compared; lowest: {shown}")
        return lines

    @property
    def final_check(self) -> str | None:
        """"ok", "over budget" (a lossy run whose output SQNR against the captured model is below
        the lowest floor of its budgeted lossy passes), "no budget" (within shapes, but a lossy
        pass without a budget changed the outputs: nothing judges how much), "mismatch", or None
        when not checked."""
        if self.final_verdict is None:
            return None
        if not self.final_verdict.ok:
            return "mismatch"
        if self.sqnr_floor_db is not None and self.final_verdict.min_sqnr_db < self.sqnr_floor_db:
            return "over budget"
        return "no budget" if self.unbudgeted else "ok"

    def final_check_text(self) -> str:
        v = self.final_verdict
        if self.final_check == "over budget":
            return (f"OVER BUDGET: output SQNR {_fmt_db(v.min_sqnr_db)} dB against the captured model, below the "
                    f"{self.sqnr_floor_db:g} dB the lossy passes' budgets allow (max_abs {v.max_abs:.3g}; "
                    f"{v.inputs_checked} input(s) x {len(v.outputs)} output(s))")
        if self.final_check != "no budget":
            return str(v)
        return (f"no budget: output SQNR {_fmt_db(v.min_sqnr_db)} dB (max_abs {v.max_abs:.3g}, max_rel {v.max_rel:.3g}; "
                f"{v.inputs_checked} input(s) x {len(v.outputs)} output(s)); lossy pass(es) without a numeric budget "
                f"changed the outputs ({', '.join(self.unbudgeted)}), so only shapes and non-finite values are judged")

    @property
    def failed(self) -> list[PassRecord]:
        return [r for r in self.records if r.status in ("rolled-back", "failed")]

    def table(self):
        from rich.table import Table

        t = Table(title=f"graphopt pipeline: {self.pipeline}", title_justify="left", caption_justify="left",
                  caption="rewrites: edits the pass made; nodes: graph nodes but inputs and output (constants "
                          "included); tensors: parameters and buffers held; param bytes: those the graph reads")
        for col in self.COLUMNS:
            t.add_column(col, justify="left" if col in ("pass", "status") else "right")
        colours = {"changed": "[green]", "rolled back": "[red]", "failed": "[red]", "changed, no budget": "[yellow]"}
        for row in self.rows():
            t.add_row(row[0], colours.get(row[1], "") + row[1], *row[2:])
        return t

    #: the columns of :meth:`rows`, as the table and the HTML report show them
    COLUMNS = ("pass", "status", "rewrites", "nodes", "tensors", "param bytes", "max abs err", "SQNR dB", "ms")

    def rows(self) -> list[list[str]]:
        """The table's cells, one row per record (plain text; the HTML report shows the same)."""
        out = []
        for r in self.records:
            status = {"rolled-back": "rolled back"}.get(r.status, r.status)
            if r.check == "no budget":
                status = "changed, no budget"
            out.append([
                r.name, status, str(r.rewrites), f"{r.nodes_before} -> {r.nodes_after}",
                f"{r.tensors_before} -> {r.tensors_after}",
                f"{_fmt_bytes(r.param_bytes_before)} -> {_fmt_bytes(r.param_bytes_after)}",
                "-" if r.max_abs_error is None else _fmt_err(r.max_abs_error),
                "-" if r.min_sqnr_db is None else _fmt_db(r.min_sqnr_db),
                f"{r.seconds * 1e3:.1f}",
            ])
        return out

    def save_html(self, path: Any) -> Any:
        """Write this report as one self-contained HTML page (:mod:`graphopt.view.html`);
        returns the path. Needs Graphviz's ``dot`` (ReportError when it is missing). The graph
        pictures need a run that kept them (``keep_graphs=True``)."""
        from graphopt.view.html import write_html

        return write_html(self, path)

    def details(self) -> list[str]:
        lines = list(self.notes)
        if self.shapes:
            where = f"; every check also at {', '.join(f'{k}={v}' for k, v in self.checked_at.items())}" \
                if self.checked_at else "; static shapes: other sizes are refused"
            lines.insert(0, f"inputs: {' | '.join(self.shapes)}{where}")
        for r in self.records:
            if r.error:
                lines.append(f"{r.name}: {r.error}")
                if r.max_abs_error is not None:  # the table's figure: the worst input, not the first failing one
                    lines.append(f"{r.name}: max abs error {_fmt_err(r.max_abs_error)} over all inputs checked")
            if r.check == "no budget":
                measured = (f"output SQNR {_fmt_db(r.min_sqnr_db)} dB against the graph before it"
                            if r.min_sqnr_db is not None else "output SQNR not measured (verify='each' measures it)")
                lines.append(f"{r.name}: no budget: {measured}; its {r.contract} contract accepts any loss")
            for node, reason in r.declines:
                lines.append(f"{r.name}: declined at {node}: {reason}")
            for note in r.notes:
                lines.append(f"{r.name}: {note}")
        lines.extend(self.history_lines())
        if self.final_verdict is not None:
            lines.append(f"final check against the captured model: {self.final_check_text()}")
        return lines

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=open("/dev/null", "w"), color_system=None)
        console.print(self.table())
        for line in self.details():
            console.print(line, markup=False, highlight=False)
        return console.export_text()


def _fmt_err(value: float) -> str:
    return f"{value:.2e}"


def _fmt_db(value: float) -> str:
    return "inf" if value == float("inf") else "-inf" if value == float("-inf") else f"{value:.1f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

