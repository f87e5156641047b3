"""Instrumentation hooks the PassManager calls around each pass: :class:`Hook` and the
hooks graphopt ships (:class:`PrintGraph`, :class:`Timing`).
"""
from __future__ import annotations

import difflib

import torch.fx as fx

from graphopt.pipeline.passes import Invocation, PassContext
from graphopt.pipeline.report import PassRecord


class Hook:
    """Instrumentation: subclass and override what you need."""

    def before_pass(self, inv: Invocation, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after_pass(self, inv: Invocation, gm: fx.GraphModule, record: PassRecord) -> None: ...

    def on_failure(self, inv: Invocation, gm: fx.GraphModule, record: PassRecord, error: BaseException) -> None: ...


class PrintGraph(Hook):
    """Print the graph (or a unified diff of its code) after each pass that changed it."""

    def __init__(self, diff: bool = True, only_changed: bool = True, file=None):
        self.diff, self.only_changed, self.file = diff, only_changed, file
        self._before = ""

    def before_pass(self, inv, gm, ctx):
        self._before = gm.code

    def after_pass(self, inv, gm, record):
        if self.only_changed and not record.changed:
            return
        print(f"--- after {inv} ({record.status}) ---", file=self.file)
        if self.diff:
            lines = difflib.unified_diff(self._before.splitlines(), gm.code.splitlines(), "before", "after", lineterm="")
            print("\n".join(lines), file=self.file)
        else:
            print(gm.code, file=self.file)


class Timing(Hook):
    """Collect wall time per pass name across runs (``.totals``)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def after_pass(self, inv, gm, record):
        self.totals[inv.name] = self.totals.get(inv.name, 0.0) + record.seconds
