"""``eliminate-dead-code``: remove computations nothing reads, then the parameters, buffers and
submodules nothing reads.

Sound for graphs with side effects: a node is removed only if it has no users *and*
``graphopt.ir.purity`` says it is pure, or its only effect is an in-place write into a fresh
temporary that nothing else reads (:func:`graphopt.ir.purity.dead_write`; without this, whether
such a write survives would depend on the order in which its readers die, and a pipeline would
not reach a fixed point in one run). Other in-place and ``out=`` ops, ``setitem``, random ops
(whose removal would shift the random stream), asserts and opaque modules not known to be pure
are kept. Placeholders and the output are never touched, so the signature is unchanged.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import graph as G
from graphopt.ir.purity import dead_write, is_impure


@graphopt.register_pass("eliminate-dead-code", contract=graphopt.Exact())
def eliminate_dead_code(gm: fx.GraphModule, ctx: graphopt.PassContext, *, remove_attributes: bool = True) -> int:
    """Remove unused pure nodes, then parameters, buffers and submodules nothing reads."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if is_impure(node, gm) is not None and not dead_write(node):
            continue
        if not ctx.may_rewrite(f"remove {node.name}"):
            continue
        gm.graph.erase_node(node)
        removed += 1
    if remove_attributes:
        removed += _remove_unread_attributes(gm, ctx)
    return removed


def _remove_unread_attributes(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    read = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    # every dotted prefix of something read: a module on this set contains something read
    read_prefixes = {".".join(parts[:i]) for t in read for parts in [t.split(".")] for i in range(1, len(parts) + 1)}

    def is_read(qualname: str) -> bool:
        # reading a module (call_module / get_attr of a module) reads everything inside it
        parts = qualname.split(".")
        return any(".".join(parts[:i]) in read for i in range(1, len(parts) + 1))

    bytes_before = G.param_bytes(gm)
    removed = 0
    emptied: set[str] = set()
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for qualname, _ in tensors:
        if is_read(qualname) or not ctx.may_rewrite(f"drop attribute {qualname}"):
            continue
        owner_name, _, field = qualname.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if field in owner._parameters:
            del owner._parameters[field]
        elif field in owner._buffers:
            del owner._buffers[field]
        emptied.add(owner_name)
        removed += 1
    _plain_containers(gm, emptied - {""})
    # deepest first, so a parent emptied by removing its children goes too
    for name, module in sorted(gm.named_modules(remove_duplicate=False), key=lambda kv: -kv[0].count(".")):
        if not name or name in read_prefixes or is_read(name):
            continue
        if module._parameters or module._buffers or module._modules:
            continue
        if not ctx.may_rewrite(f"drop submodule {name}"):
            continue
        parent_name, _, field = name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        if field in parent._modules:
            del parent._modules[field]
            removed += 1
    saved = bytes_before - G.param_bytes(gm)
    if saved:
        ctx.record("bytes_removed", saved)
    return removed


def _plain_containers(gm: fx.GraphModule, names: set[str]) -> None:
    """Turn layers that lost parameters into plain ``nn.Module`` containers of what is left.

    Capture keeps each inlined layer (an ``nn.Conv2d`` whose weight and bias the graph reads
    by ``get_attr``) at its path, as ``fx.GraphModule`` does. Once fusion has replaced its weight
    and the weight is dropped here, the layer's own ``forward`` refers to an attribute that is
    gone; nothing calls it, but ``torch.jit.script`` compiles every submodule's ``forward`` and
    failed on the optimized module. Called modules (``call_module`` targets) are never touched.
    """
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name in sorted(names, key=lambda n: n.count(".")):
        if name in called or any(c.startswith(name + ".") for c in called):
            continue
        module = gm.get_submodule(name)
        if type(module) is torch.nn.Module:
            continue
        plain = torch.nn.Module()
        plain.training = module.training
        plain._parameters = module._parameters
        plain._buffers = module._buffers
        plain._non_persistent_buffers_set = module._non_persistent_buffers_set
        plain._modules = module._modules
        parent_name, _, field = name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        parent._modules[field] = plain
