"""Channel coupling: which tensor dimensions of a canonical graph must be pruned together, and
with which index mapping.

The model. Every dimension of every tensor the graph reads through ``get_attr`` is a row of
*atoms*, one per index. Propagating through the graph gives every dimension of every value a
row of atoms as well, or marks it :class:`Fixed` (its size cannot change: a graph input, a
spatial extent, the output of an op the analysis does not understand). Ops *couple* atoms:

- ``conv`` / ``linear``: input channel ``i`` is weight column ``i``; output channel ``o`` is
  weight row ``o`` and bias ``o``. Kernel extents are fixed.
- grouped conv (``groups > 1``, depthwise included): every input and output channel of one
  conv group becomes one unit, so whole groups are pruned and ``groups`` is rewritten.
- batch norm: channel ``c`` is every statistic and affine entry ``c``; group norm couples the
  channels of each norm group into one unit (``num_groups`` is rewritten); layer norm couples
  its affine entries with the normalized dims (``normalized_shape`` is rewritten).
- elementwise ops (add, mul, ...): equal-sized dims couple index by index. A size-1 dim that
  broadcasts couples nothing: ``mask[N,1,H,W] * x[N,C,H,W]`` leaves ``C`` free, while
  ``s[N,C,1,1] * x[N,C,H,W]`` couples ``C`` of both.
- ``cat`` along a channel dim concatenates the rows (offset mapping); ``split`` with explicit
  sections slices them (the sections are rewritten); ``chunk`` / an even ``split`` couples
  index ``i`` of every piece, so every piece keeps the same count.
- ``flatten`` / ``view`` / ``reshape`` / ``permute`` / ``transpose``: the rows are moved with
  the data. Flattening ``(C, H, W)`` maps channel ``c`` to features ``c*H*W .. (c+1)*H*W-1``;
  splitting features into ``(C, H, W)`` (Linear -> view -> ConvTranspose) couples each block
  of ``H*W`` features into one unit. Size arguments are rewritten.

Coupled atoms form a *unit* (a connected component of the atom coupling graph): removing a
unit removes every index that carries one of its atoms, in every tensor, and every op stays
consistent. Units that occur in exactly the same tensor dims (same places, same widths) form
a :class:`ChannelGroup`, the thing a pruner ranks and cuts. :attr:`ChannelAnalysis.graph` is
the resulting structure as a networkx graph (group nodes linked to the tensor dims they cut),
for inspection and drawing.

Conservative by default: an op without a rule here *freezes* every channel it touches, with
the reason recorded (:attr:`ChannelGroup.frozen`) instead of a crash. Graph outputs,
graph inputs, opaque ``call_module`` calls, reductions over channels, channel counts read as
numbers (``x.size(1)``), reshape sizes computed at run time and in-place ops freeze the
channels adjacent to them; the classifier's output never changes shape.

Use::

    analysis = graphopt.channels.analyze(gm)
    for group in analysis.groups:
        print(group)                      # layers, channels, frozen reasons, tensor dims
    graphopt.channels.prune(gm, analysis, drop_units)   # slices tensors and rewrites args

The package, one room per job: :mod:`~graphopt.channels.records` (the public records),
:mod:`~graphopt.channels.propagation` (atom rows, coupling, freezing), the op rules
(:mod:`~graphopt.channels.rules` with its table, :mod:`~graphopt.channels.rules_layers`,
:mod:`~graphopt.channels.rules_shapes`), :mod:`~graphopt.channels.analysis` (units and groups),
:mod:`~graphopt.channels.mutation` (pruning) and :mod:`~graphopt.channels.dead` (dead channels).
"""
from __future__ import annotations

from graphopt.channels.analysis import analyze
from graphopt.channels.dead import DeadUnit, dead_units
from graphopt.channels.mutation import prune
from graphopt.channels.propagation import layer_name
from graphopt.channels.records import ChannelAnalysis, ChannelGroup, Fixed, Labels, Layer, ParamDim

__all__ = ["Fixed", "ParamDim", "Layer", "ChannelGroup", "ChannelAnalysis", "DeadUnit", "analyze", "prune",
           "dead_units", "layer_name"]
