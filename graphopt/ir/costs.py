"""What a graph costs to run and to ship: parameters, multiply-accumulates, bytes.

MACs are counted from shape metadata (``meta["tensor_meta"]``, see
:func:`graphopt.ir.graph.propagate_shapes`) for the ops that dominate inference: convolutions
(``out_elements * in_channels/groups * kernel``), transposed convolutions
(``in_elements * out_channels/groups * kernel``), linear layers and matmuls
(``out_elements * reduced_dim``), including standard ``nn`` layers left as ``call_module``.
Normalization, activations, pooling and elementwise arithmetic are not counted, the usual
convention (they are memory-bound and small next to the layers above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from graphopt.ir import ops
from graphopt.ir.graph import param_bytes, shape_of

__all__ = ["Costs", "costs", "macs", "parameters"]

_CONVS = {"conv1d", "conv2d", "conv3d"}
_CONV_TRANSPOSES = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}

@dataclass(frozen=True)
class Costs:
    """Parameter count (elements), multiply-accumulates per call, and bytes of parameters and
    buffers (each storage counted once)."""

    parameters: int
    macs: int
    bytes: int

    def ratio(self, base: "Costs") -> dict[str, float]:
        """Each figure as a fraction of ``base``'s."""
        return {k: getattr(self, k) / getattr(base, k) if getattr(base, k) else float("nan")
                for k in ("parameters", "macs", "bytes")}

def costs(gm: fx.GraphModule) -> Costs:
    return Costs(parameters(gm), macs(gm), param_bytes(gm))

def parameters(module: nn.Module) -> int:
    """Elements of the module's parameters (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())

def macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of one call of ``gm`` at the shapes recorded in its metadata."""
    total = 0
    for node in gm.graph.nodes:
        total += _node_macs(gm, node)
    return total

def _node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    out = shape_of(node)
    if out is None:
        return 0
    name = ops.op_name(node)
    if name in _CONVS or name in _CONV_TRANSPOSES or name == "linear":
        weight = shape_of(ops.arg(node, "weight")) if isinstance(ops.arg(node, "weight"), fx.Node) else None
        if weight is None:
            return 0
        if name == "linear":
            return math.prod(out) * weight[1]
        if name in _CONVS:
            return math.prod(out) * math.prod(weight[1:])
        x = shape_of(ops.arg(node, "input"))
        return math.prod(x) * math.prod(weight[1:]) if x is not None else 0
    if name == "matmul":
        a = shape_of(ops.arg(node, "input"))
        return math.prod(out) * a[-1] if a is not None else 0
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return math.prod(out) * math.prod(module.weight.shape[1:])
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            x = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return math.prod(x) * math.prod(module.weight.shape[1:]) if x is not None else 0
    return 0

