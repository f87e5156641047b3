"""Graph modules that generate their Python code when it is first needed.

A ``torch.fx.GraphModule`` turns its graph into Python source and compiles it each time the
graph is set or ``recompile()`` is called. On large graphs that is the dearest step of capture
and of a pipeline, in time and in memory: at 20k nodes fx writes 1.7 MB of source, and
Python's ``compile()`` of it peaks above 110 MiB, more than the graph itself. Capture, the
PassManager and the graph runs they do (shape propagation, verification) need none of it:
they run graphs node by node (:func:`graphopt.graph.execute`).

:class:`LazyGraphModule` therefore only marks its code stale; the code is generated on the
first call, on reading ``.code``, printing, pickling, deep-copying and scripting. It is a
``torch.fx.GraphModule`` in every other respect (torch's own ``_LazyGraphModule``, which it
extends, is what ``torch.compile`` uses for the same reason).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph import _PyTreeCodeGen


class LazyGraphModule(_LazyGraphModule):
    """A GraphModule whose forward is generated from the graph on first use."""

    # TorchScript compiles a module's properties unless told otherwise; ``code`` is Python
    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "code"]

    def _lazy_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Generate the code, then run it. (torch's version re-enters ``__call__``, which runs
        the module's hooks a second time on that first call.)"""
        self.real_recompile()
        return type(self).forward(self, *args, **kwargs)

    forward = _lazy_forward

    def recompile(self) -> None:  # type: ignore[override]
        """Mark the code stale; it is regenerated when next needed."""
        codegen = self._graph._codegen
        if isinstance(codegen, _PyTreeCodeGen):  # what GraphModule.recompile records up front
            self._in_spec = codegen.pytree_info.in_spec
            self._out_spec = codegen.pytree_info.out_spec
        type(self).forward = type(self)._lazy_forward

    def __prepare_scriptable__(self) -> "LazyGraphModule":
        """``torch.jit.script`` reads the forward's source: generate it first."""
        self.real_recompile()
        return self


def graph_module(root: torch.nn.Module | dict[str, Any], graph: fx.Graph,
                 class_name: str = "GraphModule") -> LazyGraphModule:
    """``fx.GraphModule(root, graph, class_name)`` without generating code yet."""
    return LazyGraphModule(root, graph, class_name)


def has_code(gm: torch.nn.Module) -> bool:
    """Whether ``gm``'s forward is up to date with its graph (False: generated on next use)."""
    return not (isinstance(gm, _LazyGraphModule) and gm._needs_recompile())


def materialize(gm: torch.nn.Module) -> torch.nn.Module:
    """Generate ``gm``'s code now if it is stale (for tools that read ``forward`` itself)."""
    if isinstance(gm, _LazyGraphModule):
        gm.real_recompile()
    return gm
