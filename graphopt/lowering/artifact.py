"""The artifact: a lowered model on disk, verified in its runtime, that runs there."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from graphopt.errors import InputError
from graphopt.ir import structure

if TYPE_CHECKING:
    from graphopt.verify import Verdict


@dataclass
class Artifact:
    """A lowered model on disk, verified in its runtime (``verdict`` is None with verify=False).

    ``report`` is JSON-serializable: ``wall_time_s``, ``timings_s`` per step, ``warnings``
    collected from torch and the exporters (not printed), ``op_counts`` and ``node_count`` of
    the written graph, ``verification`` (one verdict dict per input set) and what the backend
    adds (exporter used and why it fell back, XNNPACK availability, ...).
    """

    path: Path
    backend: str
    size_bytes: int
    verdict: Verdict | None
    report: dict[str, Any]
    _runner: Callable[..., Any] = field(repr=False)
    _output_spec: pytree.TreeSpec = field(repr=False)
    _input_layout: structure.InputLayout | None = field(default=None, repr=False)

    def run(self, *inputs: Any, **named: Any) -> Any:
        """Run the artifact in its runtime (the session that was verified); outputs are tensors
        arranged like the graph's outputs. Inputs are passed as to the graph: containers
        (dicts, lists, dataclasses) as the model takes them, or their tensors flat. The built-in
        backends' runtimes use the thread count torch had when the artifact was lowered
        (``torch.set_num_threads``)."""
        if self._input_layout is not None:
            inputs = self._input_layout.flat(inputs, named)
        elif named:
            raise InputError("this artifact takes its inputs positionally, in forward's order")
        leaves = [torch.from_numpy(np.asarray(v)) if isinstance(v, (np.ndarray, np.generic)) else v
                  for v in pytree.tree_leaves(self._runner(*inputs))]
        if len(leaves) != self._output_spec.num_leaves:
            return leaves
        return pytree.tree_unflatten(leaves, self._output_spec)

    def __str__(self) -> str:
        verification = "not verified (verify=False)" if self.verdict is None else f"verified in its runtime: {self.verdict}"
        summary = self.report.get("summary")
        return (
            f"{self.backend}: {self.path} ({self.size_bytes / 1024:.1f} KiB, {self.report.get('node_count', '?')} ops, "
            f"{self.report.get('wall_time_s', 0.0):.2f} s)"
            + (f"; {summary}" if summary else "")
            + f"\n  {verification}"
        )
