"""Pruning: :func:`prune` cuts units out of a graph module, slicing every tensor dim that holds
them and rewriting the op arguments that count channels; bias compensation lands in the next
layer's bias."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.fx as fx

from graphopt.channels.records import ChannelAnalysis, Layer, _Tensor
from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value, set_tensor


def prune(gm: fx.GraphModule, analysis: ChannelAnalysis, drop: Iterable[int],
          bias_deltas: dict[fx.Node, torch.Tensor] | None = None) -> int:
    """Remove the units ``drop`` from ``gm``: slice every tensor dim holding them (new tensors
    under the same names, ``requires_grad`` kept), rewrite the op arguments that count channels
    (groups, num_groups, normalized_shape, split sections, view/reshape sizes).

    ``bias_deltas`` maps a layer node to a tensor over its *original* output channels added to
    its bias (created when absent) after slicing: how bias compensation folds removed constant
    channels into the next layer. Never modifies a tensor in place. Returns the number of
    tensors replaced. Callers re-run shape propagation afterwards.
    """
    dropped = np.zeros(analysis.unit_of_atom.max() + 1 if analysis.unit_of_atom.size else 0, dtype=bool)
    dropped[list(drop)] = True

    def kept_index(atoms: np.ndarray) -> np.ndarray:
        return np.nonzero(~dropped[analysis.unit_of_atom[atoms]])[0]

    def kept(atoms: np.ndarray) -> int:
        return int((~dropped[analysis.unit_of_atom[atoms]]).sum())

    replaced = 0
    for info in analysis._tensors.values():
        new = info.tensor.detach()
        changed = False
        for dim, atoms in enumerate(info.atoms):
            index = kept_index(atoms)
            if index.size != atoms.size:
                new = new.index_select(dim, torch.as_tensor(index, device=new.device))
                changed = True
        if changed:
            _replace_tensor(gm, info, new)
            replaced += 1
    for update in analysis._arg_updates:
        if any(kept(atoms) != atoms.size for _, atoms in update.rows):
            update.apply(kept)
    for layer_node, delta in (bias_deltas or {}).items():
        layer = next(layer for layer in analysis.layers if layer.node is layer_node)
        _add_to_bias(gm, layer, delta.index_select(0, torch.as_tensor(kept_index(layer.out_atoms))))
        replaced += 1
    gm.graph.lint()
    gm.recompile()
    return replaced


def _replace_tensor(gm: fx.GraphModule, info: _Tensor, new: torch.Tensor) -> None:
    old = info.tensor
    if old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous() and new.dim() == 4:
        new = new.contiguous(memory_format=torch.channels_last)
    else:
        new = new.clone() if new.data_ptr() == old.data_ptr() else new.contiguous()
    value: torch.Tensor = torch.nn.Parameter(new, requires_grad=old.requires_grad) \
        if isinstance(old, torch.nn.Parameter) else new
    for name in info.names:
        set_tensor(gm, name, value)


def _add_to_bias(gm: fx.GraphModule, layer: Layer, delta: torch.Tensor) -> None:
    """``bias += delta`` as a new tensor; creates the bias (a Parameter) when the layer has none."""
    node = layer.node
    bias_node = ops.arg(node, "bias")
    weight = get_attr_value(gm, layer.weight)
    if isinstance(bias_node, fx.Node):
        old = get_attr_value(gm, bias_node)
        new = (old.detach().double() + delta.double()).to(old.dtype)
        value = torch.nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else new
        set_tensor(gm, str(bias_node.target), value)
        return
    owner_name = str(layer.weight.target).rpartition(".")[0]
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = torch.nn.Parameter(delta.to(weight.dtype), requires_grad=weight.requires_grad)
    if "bias" in owner._parameters and owner._parameters["bias"] is None:
        owner._parameters["bias"] = value
        target = f"{owner_name}.bias" if owner_name else "bias"
    else:
        from graphopt.ir.graph import add_parameter

        target = add_parameter(gm, f"{owner_name or node.name}.bias", value, requires_grad=weight.requires_grad)
    with gm.graph.inserting_before(node):
        new_node = gm.graph.get_attr(target)
    new_node.meta["provenance"] = layer.weight.meta.get("provenance", target)
    ops.set_arg(node, "bias", new_node)
