"""The export front end: ``torch.export`` with dynamic dims where the model allows them, its
program unlifted into a graph whose parameters and buffers are ``get_attr`` nodes."""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from graphopt.ir import lowerings, shapes
from graphopt.errors import CaptureError, first_line
from graphopt.ir.graph import execute, fresh_copies, get_attr_value, unique_attr_name
from graphopt.capture import regions
from graphopt.capture.isolation import _Isolation
from graphopt.capture.messages import _user_frames, _where
from graphopt.capture.reproduction import _reproduction_problem


def _trace_export(root: nn.Module, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]] | None = None,
                  static: dict[str, str] | None = None) -> fx.Graph:
    """Export ``root``; with dynamic dims in ``dims``, symbolic in those.

    Examples of size 0 or 1 at a dynamic dim (which export specializes) are traced at the
    dim's second size. Where export finds the model constrains a dim (``seq <= 64``), its
    suggested fixes are taken and the dim's range recorded in ``dims`` (the graph refuses sizes
    outside it); a dim export specializes, or a dynamic export that still fails, is recorded
    in ``static`` with the reason and the model exported with the example's shapes there."""
    static = static if static is not None else {}
    recorded = shapes.build(inputs, dims or [], static)
    traced_at, dynamic = shapes.export_spec(recorded, inputs)
    reason = ""
    for _ in range(3 if dynamic is not None else 0):
        try:
            program = torch.export.export(root, traced_at, dynamic_shapes=dynamic)
        except Exception as exc:  # noqa: BLE001 - export raises many kinds; static is the way out
            reason = f"torch.export cannot keep it dynamic: {type(exc).__name__}: {first_line(exc)[:200]}"
            refined = _refined(exc, dynamic)
            if refined is None:
                break
            dynamic = refined
            continue
        if _record_export_ranges(program, dynamic, dims, static):
            return _unlift(program, root)
        break  # a dim became static: export again with the example's shapes there
    else:
        if dynamic is not None:
            reason = reason or "torch.export's suggested fixes did not converge"
    if dynamic is not None:
        names = shapes.dynamic_names(shapes.build(inputs, dims or [], static))
        if names and reason:
            for name in names:
                static.setdefault(name, reason)
        if names and not reason:  # some dims static, the rest still dynamic: export once more
            return _trace_export(root, inputs, dims, static)
    try:
        program = torch.export.export(root, inputs)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        raise CaptureError(
            f"torch.export could not capture {type(root).__name__}{_where(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}\n"
            'Ways out: mode="symbolic" with leaf_modules=/concrete_args=, or express data-dependent '
            "branches with torch.cond."
        ) from None
    return _unlift(program, root)


def _refined(exc: BaseException, dynamic: Any) -> Any:
    """``dynamic`` with torch.export's suggested fixes for ``exc`` applied, or None."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    text = str(exc)
    if "Suggested fixes:" not in text:
        return None
    # only the fixes themselves: the parser chokes on the advice torch prints after them
    fixes = re.findall(r"^\s+\w+ = .+$", text.split("Suggested fixes:", 1)[1], flags=re.MULTILINE)
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), dynamic)
    except Exception:  # noqa: BLE001 - a message it cannot read: no refinement
        return None
    return None if refined == dynamic else refined


def _record_export_ranges(program: torch.export.ExportedProgram, dynamic: Any, dims: list[dict[int, Any]],
                          static: dict[str, str]) -> bool:
    """Copy the range torch.export kept for each dynamic dim into ``dims`` (as a ``Dim`` of the
    same name and those bounds); a dim it specialized to a number, or tied to another by an
    expression, goes to ``static``. False when one did (the caller exports again)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n, spec in zip(placeholders, program.graph_signature.input_specs) if spec.kind == InputKind.USER_INPUT]
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    all_kept = True
    for i, entry in enumerate(dims):
        for dim, value in list(entry.items()):
            name = value if isinstance(value, str) else value.__name__
            if name in static:
                continue
            given = dynamic[i].get(dim) if i < len(dynamic) and isinstance(dynamic[i], dict) else None
            if isinstance(given, int) or given is None:
                static[name] = "torch.export specialized it: the model's code fixes this size"
                all_kept = False
                continue
            size = user[i].meta["val"].shape[dim] if i < len(user) and "val" in user[i].meta else None
            expr = str(size.node.expr) if isinstance(size, torch.SymInt) else None
            if expr is None or expr not in ranges:
                static[name] = (f"torch.export tied it to other sizes ({expr})" if expr is not None
                                else "torch.export specialized it to the example size")
                all_kept = False
                continue
            # export keeps a dim generic from 2 on (it specializes 0 and 1); size 1 is checked
            # apart (_extend_to_size_one)
            low, high = shapes.finite(ranges[expr].lower), shapes.finite(ranges[expr].upper)
            bounds = {"min": max(low or 0, 2)} | ({"max": high} if high is not None else {})
            entry[dim] = torch.export.Dim(name, **bounds)
    return all_kept


def _extend_to_size_one(root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...], dims: list[dict[int, Any]],
                        static: dict[str, str], kwargs: dict[str, Any], isolated: _Isolation) -> None:
    """torch.export keeps a dim generic from size 2 on; where the exported graph reproduces the
    model at size 1 too, that size is accepted (batch 1 is the common case on a phone)."""
    recorded = shapes.build(inputs, dims, static)
    for name, size in shapes.dynamic_names(recorded).items():
        low, high = shapes.input_dims_bounds(recorded, name) or (0, None)
        if low != 2:
            continue
        ok = size == 1  # an example of size 1 was traced at the second size, and checked at 1
        if not ok:
            resized = shapes.resized_inputs(recorded, inputs, {name: 1})
            try:
                with isolated():
                    want = root(*fresh_copies(resized), **kwargs)
                with isolated():
                    got = execute(root, fresh_copies(resized), graph)
                ok = not _reproduction_problem(want, got)
            except Exception:  # noqa: BLE001 - the model or the graph refuses size 1: keep the bound
                ok = False
        if ok:
            for entry in dims:
                for dim, value in list(entry.items()):
                    if (value if isinstance(value, str) else value.__name__) == name:
                        entry[dim] = torch.export.Dim(name, min=1, **({"max": high} if high is not None else {}))
    shapes.declare(graph, shapes.build(inputs, dims, static))


def _unlift(program: torch.export.ExportedProgram, root: nn.Module) -> fx.Graph:
    """The exported graph with parameters/buffers as ``get_attr`` of their qualified names."""
    signature = program.graph_signature
    input_specs = {s.arg.name: s for s in signature.input_specs}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    getters: dict[str, fx.Node] = {}
    inlined: dict[fx.Node, tuple[Any, ...]] = {}  # regions (see graphopt.capture.regions) -> what they return
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = input_specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                env[node] = graph.placeholder(node.name)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = _constant_target(root, spec.target, program) if spec.kind == InputKind.CONSTANT_TENSOR \
                    else spec.target
                env[node] = getters[spec.target] = graph.get_attr(target)
            else:
                raise CaptureError(f"exported graph input {node.name} is a {spec.kind.name}, which capture does "
                                   'not support; use mode="symbolic".')
        elif node.op == "output":
            graph.output(_outputs(program, graph, node, env, getters))
        elif regions.is_region_body(program.graph_module, node):
            continue  # a region's submodule: its nodes are copied where the region is called
        elif regions.is_region(node):
            inlined[node] = regions.inline_region(program.graph_module, graph, node, env, _copy_meta)
        elif (value := regions.read_of_region(node, inlined)) is not None:
            env[node] = value
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            _copy_meta(node, env[node])
    for getter in getters.values():
        if not getter.users:  # export lists every buffer, used or not
            graph.erase_node(getter)
    return graph


def _copy_meta(node: fx.Node, new: fx.Node) -> None:
    new.meta = {"provenance": _export_provenance(node)}
    if "nn_module_stack" in node.meta:
        new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
    if node.meta.get("stack_trace"):
        new.meta["stack_trace"] = _user_frames(node.meta["stack_trace"])


def _constant_target(root: nn.Module, name: str, program: torch.export.ExportedProgram) -> str:
    """Attribute path of a lifted tensor constant, registering it on ``root`` if it has none."""
    try:
        if isinstance(get_attr_value(root, name), torch.Tensor):
            return name
    except AttributeError:
        pass
    attr = unique_attr_name(root, name)
    root.register_buffer(attr, program.constants[name], persistent=False)
    return attr


def _outputs(
    program: torch.export.ExportedProgram,
    graph: fx.Graph,
    output: fx.Node,
    env: dict[fx.Node, fx.Node],
    getters: dict[str, fx.Node],
) -> Any:
    """The user's outputs in the model's own structure; buffer and input updates the exported
    program returns become explicit ``copy_`` writes."""
    user_outputs = []
    for spec, value in zip(program.graph_signature.output_specs, output.args[0]):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(env[value] if isinstance(value, fx.Node) else value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            graph.call_method("copy_", (getters[spec.target], env[value]))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            placeholder = next(n for n in graph.nodes if n.op == "placeholder" and n.name == spec.target)
            graph.call_method("copy_", (placeholder, env[value]))
        else:
            raise CaptureError(f"exported graph output kind {spec.kind.name} is not supported by capture; "
                               'use mode="symbolic".')
    out_spec = program.call_spec.out_spec
    return pytree.tree_unflatten(user_outputs, out_spec) if out_spec is not None else tuple(user_outputs)


_LOWERABLE_NAMES = {f"{t.__module__}.{t.__qualname__}" for t in lowerings.LOWERABLE_TYPES}


def _export_provenance(node: fx.Node) -> str:
    """The layer's path for ops a standard layer produced (as symbolic capture records), else the name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, type_name = list(stack.values())[-1]
        if type_name in _LOWERABLE_NAMES and path:
            return path
    return node.name
