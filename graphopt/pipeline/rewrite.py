"""Rewrite rules for pass authors: a pattern, a check that returns a reason, a rewrite.

A :class:`Rule` matches a chain of canonical ops, producer first: ``Rule(("conv2d", "relu"),
...)`` matches a relu whose input is a conv2d read by nothing else. Ops are matched by name with
:func:`graphopt.ir.ops.is_op`, so every spelling capture folds into one op is seen, the in-place
activation of a fused conv unit included. :func:`apply` walks the graph once and, for each match:

- asks ``check(match)``; a string is the reason not to rewrite, recorded as a decline in the
  pass's report (a chain whose inner value has other readers is declined the same way);
- asks the rewrite budget (:meth:`graphopt.PassContext.may_rewrite`), so ``graphopt.bisect``
  can stop after any rewrite without the rule having to know;
- calls ``rewrite(match)`` with the graph's insertion point before the chain's last node; it
  returns the value that replaces that node (a node it made, an input, a constant) or None when
  it changed the graph itself. New nodes take the replaced node's provenance; the chain's nodes
  nobody reads any more are erased, with the attribute reads only they used.

::

    @graphopt.register_pass("relu-to-relu6")
    def relu_to_relu6(gm, ctx):
        return rewrite.apply(gm, ctx, rewrite.Rule(
            "relu", lambda m: m.graph.call_function(F.hardtanh, (m.input, 0.0, 6.0)),
            check=lambda m: None if m.bounded_by_six else "not known to stay below 6"))

The returned count is the number of rewrites, as a pass returns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx

from graphopt.ir import ops, specs
from graphopt.errors import NotCanonicalError, PassDefinitionError
from graphopt.ir.graph import copy_provenance

__all__ = ["Match", "Rule", "apply"]


@dataclass
class Match:
    """One place a rule matched: ``nodes`` runs producer first; ``root`` is the last node,
    the one the rewrite replaces."""

    gm: fx.GraphModule
    nodes: tuple[fx.Node, ...]

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def input(self) -> Any:
        """The first argument of the chain's first node (the value the chain starts from)."""
        return ops.arg(self.nodes[0], "input") if ops.spec_of(self.nodes[0]) else self.nodes[0].args[0]

    def __getitem__(self, op: str | int) -> fx.Node:
        """The matched node of op ``op`` (``match["conv2d"]``) or at position ``op``."""
        if isinstance(op, int):
            return self.nodes[op]
        for node in self.nodes:
            if ops.is_op(node, op):
                return node
        raise NotCanonicalError(f"no {op!r} in this match ({', '.join(n.name for n in self.nodes)})")

    def arg(self, op: str, name: str) -> Any:
        """Parameter ``name`` of the matched ``op`` node (``match.arg("conv2d", "weight")``)."""
        return ops.arg(self[op], name)


Check = Callable[[Match], "str | None"]


@dataclass
class Rule:
    """``pattern``: an op name, or a chain of op names producer first, each node the next one's
    first argument and (``exclusive``, the default) read by it alone; or a predicate on the root node for patterns op names
    cannot say. ``rewrite(match)`` returns the replacement of ``match.root`` (or None);
    ``check(match)`` returns why not to rewrite (or None). ``name`` labels declines and budget
    entries (the pattern by default)."""

    pattern: str | Sequence[str] | Callable[[fx.Node], bool]
    rewrite: Callable[[Match], Any]
    check: Check | None = None
    name: str = ""
    #: False: a chain's inner values may have other readers (they then stay in the graph)
    exclusive: bool = True
    _chain: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.pattern, str):
            self._chain = (self.pattern,)
        elif callable(self.pattern):
            self._chain = ()
        else:
            self._chain = tuple(self.pattern)
            if not self._chain or not all(isinstance(p, str) for p in self._chain):
                raise PassDefinitionError(f"Rule pattern {self.pattern!r}: give op names (strings), producer first")
        unknown = [p for p in self._chain if p not in specs.SPECS]
        if unknown:
            raise PassDefinitionError(
                f"Rule pattern names unknown op(s) {unknown}; canonical op names are those of "
                "graphopt.ir.ops.SPECS (e.g. 'conv2d', 'relu', 'linear')"
            )
        if not self.name:
            self.name = "+".join(self._chain) if self._chain else getattr(self.pattern, "__name__", "rule")

    def match(self, gm: fx.GraphModule, node: fx.Node) -> tuple[Match | None, str | None]:
        """``(match, None)``, ``(None, None)`` for no match, or ``(None, reason)`` for a chain
        that is there but cannot be rewritten as one (an inner value read elsewhere)."""
        if not self._chain:
            return (Match(gm, (node,)), None) if self.pattern(node) else (None, None)  # type: ignore[operator]
        if not ops.is_op(node, self._chain[-1]):
            return None, None
        chain = [node]
        for op in reversed(self._chain[:-1]):
            producer = _first_input(chain[0])
            if not isinstance(producer, fx.Node) or not ops.is_op(producer, op):
                return None, None
            if self.exclusive and len(producer.users) != 1:
                readers = ", ".join(u.name for u in producer.users if u is not chain[0])
                return None, f"{producer.name} is also read by {readers}"
            chain.insert(0, producer)
        return Match(gm, tuple(chain)), None


def _first_input(node: fx.Node) -> Any:
    if ops.spec_of(node) is not None:
        return ops.normalized_args(node)[0]
    return node.args[0] if node.args else None  # a fused in-place activation


def apply(gm: fx.GraphModule, ctx: Any, *rules: Rule) -> int:
    """Apply ``rules`` once over ``gm`` in graph order (the first rule that matches a node
    wins); decline, budget and provenance handled as the module docstring says. Returns the
    number of rewrites."""
    if not rules:
        raise PassDefinitionError("rewrite.apply needs at least one Rule")
    graph = gm.graph
    erased: set[fx.Node] = set()
    count = 0
    budget_left = True
    for node in list(graph.nodes):
        if not budget_left:
            break
        if node in erased or node.op in ("placeholder", "output", "get_attr"):
            continue
        for rule in rules:
            match, blocked = rule.match(gm, node)
            if blocked is not None:
                ctx.decline(node, f"{rule.name}: {blocked}")
                continue
            if match is None:
                continue
            reason = rule.check(match) if rule.check is not None else None
            if reason:
                ctx.decline(match.root, f"{rule.name}: {reason}")
                continue
            if not ctx.may_rewrite(f"{rule.name} at {match.root.name}"):
                budget_left = False  # bisection's budget ran out: keep what was done, consistent
                break
            _rewrite_one(graph, rule, match, erased)
            count += 1
            break
    if count:
        graph.lint()
        gm.recompile()
    return count


def _rewrite_one(graph: fx.Graph, rule: Rule, match: Match, erased: set[fx.Node]) -> None:
    root = match.root
    before = root.prev
    with graph.inserting_before(root):
        replacement = rule.rewrite(match)
    made = []
    cursor = before.next
    while cursor is not root:
        made.append(cursor)
        cursor = cursor.next
    for new in made:
        copy_provenance(new, root)  # keeps what the rewrite set itself
    if replacement is None or replacement is root:
        return
    root.replace_all_uses_with(replacement)
    for old in reversed(match.nodes):
        if not old.users and old not in erased:
            reads = [a for a in old.all_input_nodes if a.op == "get_attr"]
            graph.erase_node(old)
            erased.add(old)
            for attr in reads:  # an attribute read only by the erased node (a pure read)
                if not attr.users and attr not in erased:
                    graph.erase_node(attr)
                    erased.add(attr)
