"""``canonicalize``: rewrite a graph into graphopt's canonical form.

Standard layers called as modules become their functional calls on ``get_attr`` parameters,
every alias collapses to one callable with all arguments positional, eval-mode dropout goes,
and in-place ops become out-of-place where no one can see the difference, except the
activation of a conv/linear fusion unit, which ``fuse-conv-bn-relu`` runs in place in the
conv's output on purpose (one allocation less per layer) and which stays so. Capture already
leaves graphs canonical; run this after a pass or a hand edit that introduced other spellings.
See :mod:`graphopt.ir.canonical` for the rules.
"""
from __future__ import annotations

import torch.fx as fx

import graphopt
from graphopt.ir.canonical import canonicalize


@graphopt.register_pass("canonicalize", contract=graphopt.Exact())
def canonicalize_pass(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    """Inline standard layers, collapse aliases to one spelling, drop eval-mode dropout.

    In-place spellings whose write another node or the caller could observe are kept and
    listed as declined, with the reason; the in-place activation of a fusion unit is kept as
    the canonical fused form."""
    return canonicalize(gm, may_rewrite=ctx.may_rewrite, decline=ctx.decline)
