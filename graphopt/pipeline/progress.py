"""Progress on stderr (rich, transient): of a pipeline run (capture, then one step per pass) and
of a lowering (capture, export, load, verify). On when stderr is a terminal, unless
``progress=False``; ``progress=True`` forces it (a log file then holds the bar's states)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from graphopt.pipeline.hooks import Hook


def wanted(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _progress(force: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, force_terminal=force or None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=not force)


@contextlib.contextmanager
def stages(label: str, total: int, progress: bool | None) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` named stages: yields ``step(name)``, called as each stage starts
    (a no-op when the bar is off). Each stage is drawn as it starts, however short."""
    if not wanted(progress):
        yield lambda name: None
        return
    bar = _progress(progress is True)
    task = bar.add_task(label, total=total)
    started = False

    def step(name: str) -> None:
        nonlocal started
        if started:
            bar.advance(task)
        started = True
        bar.update(task, description=f"{label}: {name}")
        bar.refresh()

    with bar:
        yield step
        if started:
            bar.advance(task)


class PipelineProgress(Hook):
    """A bar over capture and the pipeline's passes; use as a context manager around the run."""

    def __init__(self, passes: int, label: str, *, force: bool = False):
        self._bar = _progress(force)
        self._label = label
        self._task = self._bar.add_task(f"{label}: capturing", total=passes + 1)
        self._started = False

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any):
        return self._bar.__exit__(*exc)

    def before_pass(self, inv, gm, ctx):
        if not self._started:  # the first pass starts once capture is done
            self._started = True
            self._bar.advance(self._task)
        self._bar.update(self._task, description=f"{self._label}: {inv}")

    def after_pass(self, inv, gm, record):
        self._bar.advance(self._task)

    def on_failure(self, inv, gm, record, error):
        self._bar.advance(self._task)
