"""Graph modules that generate their Python code when it is first needed.

A ``torch.fx.GraphModule`` turns its graph into Python source and compiles it each time the
graph is set or ``recompile()`` is called. On large graphs that is the dearest step of capture
and of a pipeline, in time and in memory: for a 20k-node graph fx writes megabytes of source,
and Python's ``compile()`` of it peaks above the size of the graph itself. Capture, the
PassManager and the graph runs they do (shape propagation, verification) need none of it:
they run graphs node by node (:func:`graphopt.ir.graph.execute`).

:class:`LazyGraphModule` therefore only marks its code stale; the code is generated on the
first call, on reading ``.code``, printing, pickling, deep-copying and scripting. It is a
``torch.fx.GraphModule`` in every other respect (torch's own ``_LazyGraphModule``, which it
extends, is what ``torch.compile`` uses for the same reason).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph import _PyTreeCodeGen

from graphopt.ir.shapes import check_call

#: output node meta: the structure the model returns its outputs in, where the graph's differs
#: only in container type (torch.export gives a ModelOutput's fields as a dict)
OUTPUT_SPEC_KEY = "graphopt_output_spec"
#: output node meta: how the model's structured arguments map to the graph's flat inputs
#: (:class:`graphopt.ir.structure.InputLayout`), for a graph captured from dicts, lists, dataclasses
INPUT_LAYOUT_KEY = "graphopt_input_layout"


def _stale_forward(graph: fx.Graph | None) -> Any:
    """A forward that writes the code on its first call, then runs it, with the signature the
    code will have (``inspect.signature`` of a stale module's forward names its inputs, as fx's
    would). torch's own version re-enters ``__call__``, which runs the module's forward hooks
    a second time on that first call."""

    def _lazy_forward(self: "LazyGraphModule", *args: Any, **kwargs: Any) -> Any:
        self.real_recompile()
        return type(self).forward(self, *args, **kwargs)

    _lazy_forward._graphopt_stale = True  # type: ignore[attr-defined]  # named as torch's: dynamo looks for it
    if graph is not None and type(graph._codegen) is fx.graph.CodeGen:
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for node in graph.find_nodes(op="placeholder"):
            name = str(node.target)
            if name.startswith("**"):
                parameters.append(inspect.Parameter(name[2:], inspect.Parameter.VAR_KEYWORD))
            elif name.startswith("*"):
                parameters.append(inspect.Parameter(name[1:], inspect.Parameter.VAR_POSITIONAL))
            else:
                default = node.args[0] if node.args else inspect.Parameter.empty
                parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
        try:
            _lazy_forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        except ValueError:  # an order Python would not accept: leave (*args, **kwargs)
            pass
    return _lazy_forward


class LazyGraphModule(_LazyGraphModule):
    """A GraphModule whose forward is generated from the graph on first use."""

    # TorchScript compiles a module's properties unless told otherwise; ``code`` is Python
    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "code"]

    forward = _stale_forward(None)  # GraphModule.__init__ sets the graph, which calls recompile()

    @classmethod
    def _needs_recompile(cls) -> bool:
        return getattr(cls.forward, "_graphopt_stale", False)

    def recompile(self) -> None:  # type: ignore[override]
        """Mark the code stale; it is regenerated when next needed."""
        codegen = self._graph._codegen
        if isinstance(codegen, _PyTreeCodeGen):  # what GraphModule.recompile records up front
            self._in_spec = codegen.pytree_info.in_spec
            self._out_spec = codegen.pytree_info.out_spec
        type(self).forward = _stale_forward(self._graph)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module, refusing inputs the graph was not made for (see
        :func:`graphopt.ir.shapes.check_call`): a static dim of another size is an InputError,
        never a wrong answer. Outputs come in the model's own container where capture recorded
        one (:data:`OUTPUT_SPEC_KEY`). A graph captured from structured inputs takes them as the
        model does, or flat (:data:`INPUT_LAYOUT_KEY`). Under a tracer, none of this: it would
        record them."""
        if _tracing():
            return super().__call__(*args, **kwargs)
        output_meta = next(reversed(self._graph.nodes)).meta if len(self._graph.nodes) else {}
        layout = output_meta.get(INPUT_LAYOUT_KEY)
        if layout is not None:  # called as the model is: its containers flattened to the graph's inputs
            args, kwargs = layout.flat(args, kwargs), {}
        if args or kwargs:
            check_call(self._graph, args, kwargs)
        out = super().__call__(*args, **kwargs)
        spec = output_meta.get(OUTPUT_SPEC_KEY)
        if spec is not None:  # the model's own container (a ModelOutput where export gave a dict)
            leaves = pytree.tree_leaves(out)
            if len(leaves) == spec.num_leaves:
                out = pytree.tree_unflatten(leaves, spec)
        return out

    def __prepare_scriptable__(self) -> "LazyGraphModule":
        """``torch.jit.script`` reads the forward's source: generate it first."""
        self.real_recompile()
        return self


def _tracing() -> bool:
    """Whether a tracer (TorchScript's, dynamo, torch.export) is running the module: the guard
    then stays out of the trace (it reads sizes into Python)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


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
