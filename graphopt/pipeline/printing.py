"""Print the graph between passes, with MLIR's switches and their meanings:

- ``after``: pass names to print the graph after (``--print-ir-after=PASS``);
- ``after_all``: print after every pass (``--print-ir-after-all``);
- ``after_change``: print only when the pass changed the graph (``--print-ir-after-change``; on
  its own it means after every pass that changed it);
- ``after_failure``: print the graph a pass left when it failed, before its rollback
  (``--print-ir-after-failure``).

Each dump is headed ``// -----// IR Dump After NAME (status) //----- //`` as in MLIR, and is the
graph's Python code (``torch.fx``), written to ``file`` (stderr by default).
"""
from __future__ import annotations

import sys
from typing import Iterable

from graphopt.pipeline.hooks import Hook


class PrintIR(Hook):
    def __init__(self, after: Iterable[str] = (), *, after_all: bool = False, after_change: bool = False,
                 after_failure: bool = False, file=None):
        self.after = set(after)
        self.after_all = after_all or (after_change and not self.after)
        self.after_change = after_change
        self.after_failure = after_failure
        self.file = file

    def _dump(self, title: str, gm) -> None:
        out = self.file if self.file is not None else sys.stderr
        print(f"// -----// IR Dump After {title} //----- //", file=out)
        print(gm.graph.python_code("self").src.strip("\n"), file=out)

    def after_pass(self, inv, gm, record):
        if not (self.after_all or inv.name in self.after):
            return
        if self.after_change and not record.changed:
            return
        self._dump(f"{inv} ({record.status})", gm)

    def on_failure(self, inv, gm, record, error):
        if self.after_failure:
            self._dump(f"{inv} Failed ({record.status})", gm)
