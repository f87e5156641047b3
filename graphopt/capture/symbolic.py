"""The symbolic front end: ``torch.fx`` tracing with standard layers inlined as they are met,
user leaves kept opaque, and each node's stack trace pointing at the user's code.

:func:`_user_stack` (each traced node's user frames) is the tracer's: it stops at
:func:`_trace_symbolic`'s frame and runs once per node."""
from __future__ import annotations

import inspect
import linecache
import sys
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.ir import canonical, lowerings
from graphopt.errors import CaptureError, first_line
from graphopt.capture.messages import _WAYS_OUT, _is_library_file, _where


class _CaptureTracer(fx.Tracer):
    """fx tracer that keeps standard layers, hooked, parametrized and user-chosen modules as leaves."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = (), leaf_names: frozenset[str] = frozenset()):
        # (no-argument construction: unpickling a GraphModule re-traces its code with its graph's tracer)
        super().__init__()
        # buffers become graph values, so ``self.buf.add_(1)`` is recorded, not run while tracing
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.user_leaves: set[str] = set()
        self.lowerings: dict[str, tuple[lowerings.Step, ...]] = {}  # path -> steps, for layers to inline
        self.lowered: list[str] = []  # paths of the layers inlined while tracing
        self.stack_texts: dict[tuple[tuple[str, int, str], ...], str] = {}
        self.opaque_subclasses: frozenset[str] = frozenset()  # see _opaque_subclasses

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output"):
            node.meta["stack_trace"] = _user_stack(self.stack_texts)
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # noqa: ANN001
                     proxy_factory_fn=None) -> fx.Proxy:  # noqa: ANN001
        """A standard layer's call becomes its functional calls right away (what
        canonicalization would do to its ``call_module`` node, without making that node)."""
        if kind == "call_module" and name is None and proxy_factory_fn is None and len(args) == 1 \
                and not kwargs and target not in self.user_leaves:
            lowered = self._lower(target, args[0])
            if lowered is not None:
                return lowered
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def _lower(self, path: str, arg: Any) -> fx.Proxy | None:
        steps = self.lowerings.get(path)
        if steps is None or not isinstance(arg, fx.Proxy):
            return None  # canonicalization lowers what is left (e.g. a layer fed a constant)
        value = arg.node
        # the meta the call_module node would have had (see fx's TracerBase.create_node)
        origin_meta: dict[str, Any] = {"stack_trace": _user_stack(self.stack_texts)}
        if self.module_stack:  # an OrderedDict: its copy() is copy.copy's result, without the reduce
            origin_meta["nn_module_stack"] = self.module_stack.copy()
        self.lowered.append(path)
        return self.proxy(canonical.emit_lowering(self.graph, steps, value, path, origin_meta))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            self.user_leaves.add(module_qualified_name)
            return True
        if type(m) in lowerings.MODULE_LOWERINGS or lowerings.is_opaque(m):
            return True
        if isinstance(m, lowerings.LOWERABLE_TYPES):  # a subclass of a standard layer: see _opaque_subclasses
            return module_qualified_name in self.opaque_subclasses
        return super().is_leaf_module(m, module_qualified_name)


def _trace_symbolic(
    root: nn.Module,
    leaf_types: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
    concrete_args: dict[str, Any] | None,
    fixed_kwargs: dict[str, Any],
) -> tuple[fx.Graph, list[str]]:
    """The traced graph, with standard layers already inlined, and the paths of those layers."""
    tracer = _CaptureTracer(leaf_types, leaf_names)
    # Lowerings are read off the layers before tracing: while tracing, fx intercepts module
    # attribute reads (a parameter read scans all parameters and records a get_attr node).
    tracer.lowerings = {path: steps for path, m in root.named_modules()
                        if type(m) in lowerings.MODULE_LOWERINGS and (steps := lowerings.lowering_for(m)) is not None}
    tracer.opaque_subclasses = _opaque_subclasses(root, leaf_types, leaf_names)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise CaptureError(
            f"could not trace {type(root).__name__} symbolically{_where(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}\n{_WAYS_OUT}"
        ) from None
    finally:
        # fx's trace leaves the tracer in a reference cycle (through a recursive nested
        # function); emptying it lets what it holds (the copy's own containers, the lowerings)
        # be freed when capture is done, not by a later collection of that cycle
        state = vars(tracer).copy()
        vars(tracer).clear()
    for node in graph.nodes:
        if node.op == "call_module" and node.target in state["user_leaves"]:
            node.meta["keep_module"] = True
    _drop_specialized_arguments(graph, root, fixed_kwargs)
    return graph, state["lowered"]


def _opaque_subclasses(root: nn.Module, leaf_types: tuple[type[nn.Module], ...], leaf_names: frozenset[str]) -> frozenset[str]:
    """Paths of the layers that subclass a standard layer and cannot be traced into.

    Only exact standard types are inlined (a subclass may compute something else). The others
    are traced through like any user module when their forward traces on its own: timm's
    ``BatchNormAct2d`` (a ``BatchNorm2d`` whose forward adds the activation) becomes a batch
    norm and a ReLU that fusion folds and pruning reads. One that does not trace (torch's own
    ``BatchNorm2d.forward`` branches on the input's rank) stays an opaque call, as before."""
    opaque = []
    for path, module in root.named_modules():
        if not path or type(module) in lowerings.MODULE_LOWERINGS or not isinstance(module, lowerings.LOWERABLE_TYPES):
            continue
        if path in leaf_names or isinstance(module, leaf_types) or lowerings.is_opaque(module):
            continue
        probe = _CaptureTracer(leaf_types, frozenset())
        probe.proxy_buffer_attributes = True
        try:
            probe.trace(module)
        except Exception:  # noqa: BLE001 - fx raises many kinds; the layer stays one call
            opaque.append(path)
        finally:
            vars(probe).clear()  # fx's trace leaves the tracer in a reference cycle (see _trace_symbolic)
    return frozenset(opaque)


def _drop_specialized_arguments(graph: fx.Graph, root: nn.Module, fixed: dict[str, Any]) -> None:
    """Remove the placeholders fx keeps for concrete args, with the asserts that guard them."""
    if not fixed:
        return
    params = [p for p in inspect.signature(root.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for param, node in zip(params, placeholders):
        if param.name in fixed:
            _erase_guard_cone(graph, node)


def _erase_guard_cone(graph: fx.Graph, placeholder: fx.Node) -> None:
    """Erase ``placeholder`` and everything computed from it, if all of that only feeds asserts."""
    cone: list[fx.Node] = []
    frontier = [placeholder]
    while frontier:
        node = frontier.pop()
        if node in cone:
            continue
        cone.append(node)
        frontier.extend(node.users)
    if any(n.op == "output" for n in cone):
        return
    if any(u not in cone for n in cone for u in n.users):
        return
    if not all(n is placeholder or n.target is torch._assert or n.users for n in cone):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(cone, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


_LIBRARY_FILES: dict[str, bool] = {}  # file name -> _is_library_file(file name)


def _user_stack(texts: dict[tuple[tuple[str, int, str], ...], str]) -> str:
    """The current stack, user frames only, outermost first, formatted like fx's stack traces.

    (fx's own ``record_stack_traces`` symbolizes through torch._inductor, a multi-second import.)
    Called for every traced node, so it walks frames directly, with a dict lookup per frame
    (a function call per frame cost more than the rest of the walk), and formats each distinct
    stack once (``texts`` caches the text per tuple of (file, line, function)).
    """
    frames = []
    library_files = _LIBRARY_FILES
    stop = _trace_symbolic.__code__  # frames further out are capture's caller, not the model
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is stop:
            break
        library = library_files.get(code.co_filename)
        if library is None:
            library = library_files[code.co_filename] = _is_library_file(code.co_filename)
        if not library:
            frames.append(frame)
        frame = frame.f_back
    key = tuple([(f.f_code.co_filename, f.f_lineno, f.f_code.co_name) for f in frames])
    text = texts.get(key)
    if text is None:
        for f in frames:  # as traceback.StackSummary.extract: source of modules without a file
            linecache.lazycache(f.f_code.co_filename, f.f_globals)
        summary = traceback.StackSummary.from_list([(*where, None) for where in reversed(key)])
        text = texts[key] = "".join(summary.format())
    return text
