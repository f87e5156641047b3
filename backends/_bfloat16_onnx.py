"""bfloat16 graphs for ONNX Runtime, which has no bfloat16 kernels on its CPU provider.

ONNX has the type, but ONNX Runtime's CPU provider (1.32) implements neither Conv nor Add, Gemm
or MatMul for it (its session refuses the file: "Could not find an implementation for Add"),
and its Python API cannot hand bfloat16 arrays back (numpy has no such type). A bfloat16 graph
is therefore written in float32: every bfloat16 parameter, buffer, constant and dtype argument
becomes float32, the file takes and returns float32 (every bfloat16 value is exact in
float32), and the session's runner casts inputs up and outputs back down to the graph's
dtypes. The file computes each op in float32 and rounds once at the end where the graph
rounds after every op, so it is at least as close to the exact result; it is verified against
the graph at bfloat16's tolerance. The report says all this in its notes.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from graphopt.ir import graph as G


def has_bfloat16(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> bool:
    """Whether the graph takes, holds or computes bfloat16 values."""
    if any(isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 for x in inputs):
        return True
    if any(t.dtype == torch.bfloat16 for t in (*gm.parameters(), *gm.buffers())):
        return True
    return any(getattr(G.tensor_meta(n), "dtype", None) == torch.bfloat16 for n in gm.graph.nodes)


def in_float32(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[fx.GraphModule, tuple[Any, ...]]:
    """A copy of ``gm`` computing in float32 wherever it computed in bfloat16, and the inputs
    for it (bfloat16 tensors cast to float32). ``gm`` is not changed."""
    copied = copy.deepcopy(gm)
    for module in copied.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.dtype == torch.bfloat16:
                    table[name] = _as_float32(tensor)
    for node in copied.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = str(node.target).rpartition(".")
            holder = copied.get_submodule(owner) if owner else copied
            value = getattr(holder, name)
            if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and name in holder.__dict__:
                setattr(holder, name, value.float())  # a plain tensor attribute (fx constant)
        node.args = map_aggregate(node.args, _float32_dtype)
        node.kwargs = map_aggregate(node.kwargs, _float32_dtype)
    copied.recompile()
    return copied, tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x for x in inputs)


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(tensor.detach().float(), tensor.requires_grad)
    return tensor.float()


def _float32_dtype(value: Any) -> Any:
    return torch.float32 if value is torch.bfloat16 else value


NOTE = ("bfloat16 graph written in float32: ONNX Runtime's CPU provider has no bfloat16 kernels (Conv, Add, "
        "MatMul, ...), so the file computes in float32, takes and returns float32, and the runner casts inputs "
        "up and outputs back to bfloat16; verified against the bfloat16 graph at bfloat16's tolerance")
