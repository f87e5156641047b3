"""Small helpers over torch.fx graph modules shared by capture, passes and backends.

Metadata conventions on canonical graphs:

- ``node.meta["tensor_meta"]``: torch.fx ``TensorMetadata`` (shape, dtype, stride, ...) from
  :func:`propagate_shapes`, or a tuple/list of them for multi-output nodes.
- ``node.meta["provenance"]``: where the value came from in the user's model, as a string: the
  module path for inlined layers (``"layer1.0.conv1"``), else the original node name. Rewrites
  keep it with :func:`copy_provenance`.
- ``node.meta["stack_trace"]``: the user's source line, recorded by capture.
- ``node.meta["keep_module"]``: set on a ``call_module`` node of a user leaf module; such a
  node is never inlined, by capture or by later ``canonicalize`` runs.
- ``node.meta["fusion_unit"]`` / ``["fused_into"]``: a conv/linear and the activation that
  follows it, marked by ``fuse-conv-bn-relu`` as one unit for quantization and lowering.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from graphopt.errors import InputError, NodeRunError
from graphopt.ir.lazy import has_code


def as_input_tuple(example_inputs: Any, module: Any = None) -> tuple[torch.Tensor, ...]:
    """Normalize example inputs: a tensor becomes a 1-tuple; lists become tuples; a dict of
    keyword inputs (``{"input_ids": ..., "attention_mask": ...}``) becomes the positional tuple
    ``module``'s forward takes them in, parameters skipped before the last one given set to their
    default, which must be None (GPT-2's cache between ``input_ids`` and ``attention_mask``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, dict) and module is not None:
        return _keyword_inputs(example_inputs, module)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. (torch.randn(1, 3, 224, 224),)"
    )


def _keyword_inputs(given: dict[str, Any], module: Any) -> tuple[Any, ...]:
    import inspect

    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise InputError(f"example inputs name {', '.join(map(repr, unknown))}, which forward does not take "
                         f"positionally (its parameters: {', '.join(names) or 'none'})")
    # forward's parameters up to the last one given; those skipped take their defaults (None for
    # GPT-2's cache between input_ids and attention_mask), which capture fixes like any non-tensor
    leading = names[:max((names.index(k) for k in given), default=-1) + 1]
    missing = [p.name for p in params[:len(leading)] if p.name not in given and p.default is p.empty]
    if missing:
        raise InputError(
            f"keyword example inputs skip {', '.join(missing)}, which forward needs (no default): pass "
            f"{'it' if len(missing) == 1 else 'them'} too, or pass a tuple in forward's order"
        )
    if any(p.name not in given and p.default is not None for p in params[:len(leading)]):
        skipped = [p.name for p in params[:len(leading)] if p.name not in given and p.default is not None]
        raise InputError(
            f"keyword example inputs skip {', '.join(skipped)}, whose default is not None: pass "
            f"{'it' if len(skipped) == 1 else 'them'} too, or pass a tuple in forward's order"
        )
    return tuple(given.get(p.name) for p in params[:len(leading)])



def describe_values(values: Iterable[Any]) -> str:
    """``float32[1, 3], int64[2]``: each tensor's dtype and shape, the type of anything else."""
    return ", ".join(
        f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        for x in values
    )


def fresh_copies(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Copies of the input tensors: a model that writes into its inputs (``x.add_(1)``) must
    not change what the next run sees, nor the user's example inputs."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)

@contextlib.contextmanager
def preserved_state(module: torch.nn.Module):
    """Run code that calls ``module`` without keeping the buffer updates it makes (running
    statistics, counters): analysis and verification runs must not change the model."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                if not torch.equal(buf, value):
                    buf.copy_(value)


@contextlib.contextmanager
def collector_paused():
    """Pause Python's cyclic garbage collector while capturing or running a pipeline.

    Both create tens of thousands of long-lived objects (modules, tensors, fx nodes, graph
    copies for rollback) and little cyclic garbage; with the collector on, its full collections
    re-scan that growing heap again and again, which made their time grow faster than the
    graph (a 20k-node pipeline took 4.8-5.6 s with it on, 2.6-3.3 s off). Collection resumes,
    as it was, on return or on an exception.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def propagate_shapes(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> Any:
    """Run ``gm`` once on ``example_inputs``, record ``tensor_meta`` on every node, and return
    the outputs of that run (buffer updates the run makes are undone)."""
    inputs = as_input_tuple(tuple(example_inputs))
    fresh = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.no_grad(), preserved_state(gm):
        if detect_fake_mode(fresh) is not None:
            return ShapeProp(gm).propagate(*fresh)  # fake tensors need fx's fake-mode handling
        return record_shapes(gm, fresh)


def record_shapes(module: torch.nn.Module, inputs: Iterable[Any], graph: fx.Graph | None = None) -> Any:
    """Run ``graph`` (default ``module.graph``) node by node on ``inputs``, fetching attributes
    and submodules from ``module``; record ``meta["tensor_meta"]`` and ``meta["type"]`` on every
    node exactly as ``torch.fx.passes.shape_prop.ShapeProp`` does, and return the outputs.

    The same job as ``ShapeProp(gm).propagate(*inputs)`` without the per-node cost of
    ``fx.Interpreter`` and of ShapeProp's symbolic-shape contiguity checks, and without
    needing generated code (see :mod:`graphopt.ir.lazy`). Values are freed after their last use.
    Buffer updates are kept: callers isolate the run (see :func:`propagate_shapes`). A node
    that fails raises RuntimeError naming the node.
    """
    return execute(module, inputs, graph, record=True)


def execute(module: torch.nn.Module, inputs: Iterable[Any], graph: fx.Graph | None = None, *,
            record: bool = False, plan: "GraphRunner | None" = None,
            observe: "Callable[[fx.Node, Any], None] | None" = None) -> Any:
    """Run ``graph`` (default ``module.graph``) node by node on ``inputs`` and return what its
    generated forward would return; with ``record``, as :func:`record_shapes`; ``observe`` is
    called with each node and its value.

    Each node does what its line of fx's generated code does, and values are freed after their
    last use as that code frees them, so this computes what ``module(*inputs)`` computes without
    generating and compiling the code (module hooks aside: see :func:`call`). ``plan`` carries
    the freeing schedule and attribute reads of earlier runs (see :class:`GraphRunner`).
    """
    graph = graph if graph is not None else module.graph
    last_uses = plan.last_uses if plan is not None else _last_uses(graph)
    attrs = plan.attrs if plan is not None else None
    env: dict[fx.Node, Any] = {}
    pending = iter(graph.process_inputs(*inputs))
    lookup = env.__getitem__
    reads: dict[tuple[type, str], bool] = {}  # see _fetch
    for node in graph.nodes:
        try:
            if attrs is not None and node.op == "get_attr":
                value = attrs[node]
            else:
                value = _run_node(module, node, pending, lookup, reads)
        except Exception as exc:  # noqa: BLE001 - say which node failed, keep the cause
            raise NodeRunError(
                f"running node {node.name} ({node.format_node()}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        if record:
            if isinstance(value, torch.Tensor):
                node.meta["tensor_meta"] = tensor_metadata(value)
            else:
                _record_structure_meta(node, value)
            node.meta["type"] = type(value)
        if observe is not None:
            observe(node, value)
        if node.op == "output":
            return graph.process_outputs(value)
        if node.users:
            env[node] = value
        for dead in last_uses.get(node, ()):
            del env[dead]
    raise NodeRunError("the graph has no output node; end it with graph.output(...)")


class GraphRunner:
    """Runs a graph module node by node, as often as asked, raising what a call of the module
    would raise (with a note naming the node). The freeing schedule and the attributes the
    graph reads are worked out once: the module must not change between runs (verification
    runs one state on several inputs)."""

    def __init__(self, module: fx.GraphModule):
        self.__qualname__ = "graph module"  # how verification's messages name the runnable
        self.module = module
        self.last_uses = _last_uses(module.graph)
        reads: dict[tuple[type, str], bool] = {}
        self.attrs = {n: _fetch(module, n.target, reads) for n in module.graph.nodes if n.op == "get_attr"}

    def __call__(self, *args: Any) -> Any:
        try:
            return execute(self.module, args, plan=self)
        except NodeRunError as exc:  # the node's own exception, as a call would raise it
            cause = exc.__cause__
            if cause is None:
                raise
            if hasattr(cause, "add_note"):  # Python 3.11+
                cause.add_note(str(exc).split(" failed: ")[0])  # "running node ... (...)"
            raise cause from None


def runner(module: Any) -> Any:
    """What runs ``module`` for checking: a :class:`GraphRunner` for a graph module whose code
    is stale (:mod:`graphopt.ir.lazy`) and that has no hooks, so checking a graph never pays for
    its code; else ``module`` itself."""
    if isinstance(module, fx.GraphModule) and not has_code(module) and not _has_call_hooks(module):
        return GraphRunner(module)
    return module


def call(module: Any, args: tuple[Any, ...]) -> Any:
    """``module(*args)``, through :func:`runner`."""
    return runner(module)(*args)


def _has_call_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as M

    return bool(module._forward_hooks or module._forward_pre_hooks or M._global_forward_hooks
                or M._global_forward_pre_hooks)


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """user -> the values it is the last reader of (freed once it has run)."""
    seen: set[fx.Node] = set()
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for value in node.all_input_nodes:
            if value not in seen:
                seen.add(value)
                out.setdefault(node, []).append(value)
    return out


def _run_node(module: torch.nn.Module, node: fx.Node, pending: Any, lookup: Any,
              reads: dict[tuple[type, str], bool]) -> Any:
    op = node.op
    if op == "call_function":
        if node.kwargs:
            return node.target(*map_arg(node.args, lookup), **map_arg(node.kwargs, lookup))
        return node.target(*map_arg(node.args, lookup))
    if op == "get_attr":
        return _fetch(module, node.target, reads)
    if op == "call_method":
        obj, *rest = map_arg(node.args, lookup)
        return getattr(obj, node.target)(*rest, **map_arg(node.kwargs, lookup))
    if op == "call_module":
        return _fetch(module, node.target, reads)(*map_arg(node.args, lookup), **map_arg(node.kwargs, lookup))
    if op == "placeholder":
        if str(node.target).startswith("*"):
            return list(pending)
        value = next(pending, _MISSING)
        if value is _MISSING:
            if not node.args:
                raise TypeError(f"no value passed for graph input {node.target!r}")
            return node.args[0]  # the parameter's default
        return value
    if op == "output":
        return map_arg(node.args[0], lookup)
    raise RuntimeError(f"unknown node kind {op!r}")


_MISSING = object()
_MODULE_GETATTR = torch.nn.Module.__getattr__


def _fetch(module: torch.nn.Module, target: str, reads: dict[tuple[type, str], bool]) -> Any:
    """``get_attr_value(module, target)``, reading modules' parameter, buffer and submodule
    tables directly: plain ``getattr`` reaches them only after a failed normal lookup and a
    call of ``nn.Module.__getattr__``, the slowest step of running a graph node by node.

    That holds where the module's class has no attribute of the name (which would come first)
    and keeps Module's ``__getattr__``; ``reads`` remembers that per (class, name) for one run,
    as the class lookup (a failing ``hasattr``) cost more than the rest of the read.
    """
    obj: Any = module
    for part in target.split("."):
        kind = type(obj)
        direct = reads.get((kind, part))
        if direct is None:
            direct = reads[kind, part] = issubclass(kind, torch.nn.Module) and kind.__getattr__ is _MODULE_GETATTR \
                and not hasattr(kind, part)
        if direct:
            state = obj.__dict__
            if part in state:
                obj = state[part]
                continue
            for table in (state["_parameters"], state["_buffers"], state["_modules"]):
                if part in table:
                    obj = table[part]
                    break
            else:
                obj = getattr(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tensor_metadata(value: torch.Tensor) -> TensorMetadata:
    """``TensorMetadata`` of ``value``, field for field what ShapeProp records.

    For plain dense tensors the memory format comes from the tensor's own contiguity flags
    (the same definitions ShapeProp evaluates in Python through ``torch._prims_common``,
    checked in order: contiguous, channels-last for 4-D, channels-last-3d for 5-D); anything
    else (sparse, quantized, nested, subclasses such as fake tensors) goes through ShapeProp's
    own extractor.
    """
    if type(value) not in _PLAIN_TENSORS or value.layout is not torch.strided or value.is_quantized \
            or value.is_nested:
        return _extract_tensor_metadata(value)
    if value.is_contiguous():
        memory_format: torch.memory_format | None = torch.contiguous_format
    elif value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
        memory_format = torch.channels_last
    elif value.dim() == 5 and value.is_contiguous(memory_format=torch.channels_last_3d):
        memory_format = torch.channels_last_3d
    else:
        memory_format = None
    return TensorMetadata(value.shape, value.dtype, value.requires_grad, value.stride(), memory_format, False, {})


def _record_structure_meta(node: fx.Node, value: Any) -> None:
    """``tensor_meta`` of a tuple/list/dict result: the same structure with tensors replaced by
    their metadata (as ShapeProp); nothing when it holds no tensor."""
    found = False

    def meta_of(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return tensor_metadata(obj)
        return obj

    meta = map_aggregate(value, meta_of)
    if found:
        node.meta["tensor_meta"] = meta


def tensor_meta(node: fx.Node) -> TensorMetadata | None:
    """Shape/dtype metadata of a single-tensor node, or None when unknown."""
    tm = node.meta.get("tensor_meta")
    return tm if isinstance(tm, TensorMetadata) else None


def shape_of(node: fx.Node) -> torch.Size | None:
    tm = tensor_meta(node)
    return tm.shape if tm is not None else None


def copy_provenance(dst: fx.Node, src: fx.Node) -> None:
    """Give ``dst`` the provenance and source line of ``src`` (for nodes a rewrite creates)."""
    for key in ("provenance", "stack_trace", "nn_module_stack"):
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]


def provenance(node: fx.Node) -> str:
    return str(node.meta.get("provenance", node.name))


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def source_line(node: fx.Node) -> str | None:
    """The user's source line ``file:line`` (last frame of the stack trace), if recorded."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    # the recorded trace ends in torch's own frames (fx proxies); the user's line is the last
    # frame outside torch and graphopt
    user = [(f, l) for f, l in frames if not f.startswith(_LIBRARY_DIRS)]
    if not user:
        return None
    file, line = user[-1]
    return f"{file}:{line}"


def get_attr_value(gm: fx.GraphModule, node_or_target: fx.Node | str) -> Any:
    """The object a ``get_attr`` node (or dotted target) refers to."""
    target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def unique_attr_name(gm: fx.GraphModule, hint: str) -> str:
    """A free attribute name on ``gm`` derived from ``hint`` (dots become underscores)."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint) or "const"
    if base[0].isdigit():
        base = "_" + base
    name, i = base, 1
    while hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def set_tensor(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Make the parameter or buffer ``qualname`` of ``gm`` the new tensor ``value`` (the old
    tensor is left untouched; a parameter slot gets a Parameter)."""
    owner_name, _, field_name = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if field_name in owner._parameters and not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    if field_name in owner._buffers:
        owner._buffers[field_name] = value
    elif field_name in owner._parameters:
        owner._parameters[field_name] = value
    else:
        setattr(owner, field_name, value)


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor) -> str:
    """Register ``value`` as a (non-trainable) buffer of ``gm``; returns its attribute name."""
    name = unique_attr_name(gm, hint)
    gm.register_buffer(name, value.detach())
    return name


def add_parameter(gm: fx.GraphModule, hint: str, value: torch.Tensor, requires_grad: bool = True) -> str:
    """Register ``value`` as a parameter of ``gm``; returns its attribute name."""
    name = unique_attr_name(gm, hint)
    gm.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=requires_grad))
    return name


def rewritten_attr(gm: fx.GraphModule, old: fx.Node, old_value: torch.Tensor, new_value: torch.Tensor, suffix: str,
                   before: fx.Node) -> fx.Node:
    """A ``get_attr`` node, inserted before ``before``, of a new attribute holding ``new_value``
    stored as ``old_value`` was (dtype, memory format, parameter or buffer): what a pass that
    rescales a layer's weights points the layer at, leaving ``old`` (the ``get_attr`` of
    ``old_value``) for other readers. The attribute is named after ``old``'s with ``suffix``
    (once), and the node keeps ``old``'s provenance."""
    value = torch.empty_like(old_value)
    value.copy_(new_value)
    target = str(old.target)
    hint = target if target.endswith(suffix) else f"{target}{suffix}"
    if isinstance(old_value, torch.nn.Parameter):
        attr = add_parameter(gm, hint, value, requires_grad=old_value.requires_grad)
    else:
        attr = add_constant(gm, hint, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta["provenance"] = attr
    copy_provenance(node, old)
    return node


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (each storage counted once)."""
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def count_nodes(gm: fx.GraphModule) -> int:
    """Nodes that compute something (placeholders, get_attr and output excluded)."""
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def attr_users(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Map attribute target -> the get_attr nodes reading it (more than one means sharing)."""
    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.setdefault(str(n.target), []).append(n)
    return out
