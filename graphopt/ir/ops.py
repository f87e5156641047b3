"""The canonical op table: one spelling per operation.

Every operation graphopt understands has one canonical callable and one argument layout. A
canonical node is a ``call_function`` node whose ``target`` is that callable and whose ``args``
hold *every* parameter of the signature, positionally, in the order of its :data:`SPECS` entry, with
defaults filled in; its ``kwargs`` are empty. A pass therefore reads ``ops.arg(node, "groups")`` and never has to
care whether the user wrote ``nn.Conv2d``, ``F.conv2d`` or ``torch.conv2d``.

Capture (``graphopt.capture``) rewrites every alias listed in :data:`ALIASES` and every module
type listed in :data:`MODULE_LOWERINGS` into this form. The tables are data: adding an op here
is the only change needed for capture and the matching helpers to know it.

This module holds the helpers passes use on canonical nodes (:func:`spec_of`, :func:`is_op`,
:func:`op_name`, :func:`arg`, :func:`call_arg`, :func:`set_arg`, :func:`normalized_args`) and
the fused in-place activation spelling (:data:`FUSED_ACTIVATIONS`). The tables live in their
own modules and are re-exported here, so ``ops.<name>`` reaches all of them:
:mod:`graphopt.ir.specs` (:data:`SPECS`, :class:`OpSpec`), :mod:`graphopt.ir.aliases`
(:data:`ALIASES`, :class:`Alias`, :func:`alias_of`, ...) and :mod:`graphopt.ir.lowerings`
(:data:`MODULE_LOWERINGS`, :func:`lowering_for`, ...).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.errors import NotCanonicalError
from graphopt.ir.aliases import (  # noqa: F401  (re-exported: ops.<name>)
    ALIASES, ALL_ALIASES, TUPLE_PARAMS, Alias, alias_of, aten, bind_alias, canonical_args, normalize_value,
    writes_input,
)
from graphopt.ir.lowerings import (  # noqa: F401  (re-exported: ops.<name>)
    INPUT, LOWERABLE_TYPES, MODULE_LOWERINGS, Attr, Lowering, Step, has_hooks, is_opaque, lowering_for,
)
from graphopt.ir.specs import _NO_DEFAULT, BY_TARGET, SPECS, OpSpec, gelu  # noqa: F401  (re-exported: ops.<name>)


def spec_of(node: fx.Node) -> OpSpec | None:
    """The spec of a canonical node, or None if the node is not a canonical op (or not a node:
    a constant argument)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return BY_TARGET.get(node.target)


def is_op(node: fx.Node, *names: str) -> bool:
    """True if ``node`` is a canonical call of one of the named ops (``is_op(n, "conv2d")``),
    the fused in-place activation of a conv/linear unit included (see :func:`op_name`)."""
    return op_name(node) in names


def arg(node: fx.Node, name: str) -> Any:
    """The value of parameter ``name`` of canonical node ``node`` (default if absent)."""
    spec = spec_of(node)
    if spec is None:
        raise NotCanonicalError(f"node {node.name!r} ({node.target}) is not a canonical op; check "
                                "ops.spec_of(node) first, or run the canonicalize pass before yours")
    i = _param_index(spec, node, name)
    if i < len(node.args):
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    default = spec.params[i][1]
    if default is _NO_DEFAULT:
        raise NotCanonicalError(f"node {node.name!r} lacks required argument {name!r}")
    return default


def _param_index(spec: OpSpec, node: fx.Node, name: str) -> int:
    if name not in spec.index:
        raise NotCanonicalError(f"{spec.name} (node {node.name!r}) has no parameter {name!r}; "
                                f"its parameters: {', '.join(spec.index)}")
    return spec.index[name]


def call_arg(node: fx.Node, name: str, index: int, default: Any = None) -> Any:
    """Argument ``name`` of any call (at position ``index`` when given positionally), read with
    the canonical op table when the node is canonical."""
    spec = spec_of(node)
    if spec is not None and name in spec.index:
        return arg(node, name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set parameter ``name`` of canonical node ``node`` (args are kept fully positional)."""
    spec = spec_of(node)
    if spec is None:
        raise NotCanonicalError(f"node {node.name!r} ({node.target}) is not a canonical op; check "
                                "ops.spec_of(node) first, or run the canonicalize pass before yours")
    args = list(normalized_args(node))
    args[_param_index(spec, node, name)] = value
    node.args = tuple(args)
    node.kwargs = {}


def normalized_args(node: fx.Node) -> tuple[Any, ...]:
    """All parameters of a canonical node, positionally, defaults filled in."""
    spec = spec_of(node)
    assert spec is not None
    return tuple(arg(node, n) for n, _ in spec.params)


def op_name(node: fx.Node) -> str | None:
    """Canonical name of the node's op, or None. The in-place activation of a conv/linear
    fusion unit (``torch.relu_(conv)``, see :func:`fused_activation_op`) is named by the op it
    computes, so a pass looking for ``relu`` sees the fused ones too."""
    spec = spec_of(node)
    if spec is not None:
        return spec.name
    return fused_activation_op(node) if isinstance(node, fx.Node) and node.op == "call_function" else None


# --------------------------------------------------------------------------------------------
# Fusion units: the one in-place spelling that is canonical.
# --------------------------------------------------------------------------------------------

#: How the activation of a conv/linear fusion unit is spelled, in place: canonical name ->
#: (callable, keyword arguments after the canonical positional ones). ``torch.relu_`` is a
#: builtin, as ``torch.relu`` is (TorchScript calls ``aten::relu_`` directly, with no function
#: call around it); ``hardtanh`` keeps its canonical callable, so :func:`graphopt.ir.ops.arg` still
#: reads its bounds. TorchScript, both ONNX exporters and torch.export take both.
FUSED_ACTIVATIONS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "relu": (torch.relu_, {}),
    "hardtanh": (F.hardtanh, {"inplace": True}),
}


def fused_activation_op(node: fx.Node) -> str | None:
    """The canonical op name (``"relu"``, ``"hardtanh"``) of ``node`` if it is the in-place
    activation of a conv/linear fusion unit, else None.

    That form, written by ``fuse-conv-bn-relu``, is the :data:`FUSED_ACTIVATIONS` spelling
    (``torch.relu_(conv)``, ``F.hardtanh(conv, 0.0, 6.0, inplace=True)``) applied to the output
    of the layer whose ``meta["fusion_unit"]`` names it, which names that layer in its
    ``meta["fused_into"]``, and which is that layer's only reader. Anything short of that, such
    as an in-place activation whose layer gained another reader, is an ordinary in-place op.
    """
    alias = alias_of(node)
    spelling = FUSED_ACTIVATIONS.get(alias.op) if alias is not None else None
    if spelling is None or spelling[0] is not node.target:
        return None
    bound = bind_alias(alias, node.args, dict(node.kwargs))
    if bound is None or writes_input(alias, bound) is not True:
        return None
    layer = bound.get(alias.params[0])
    if not isinstance(layer, fx.Node) or node.meta.get("fused_into") != layer.name:
        return None
    unit = layer.meta.get("fusion_unit")
    if not isinstance(unit, dict) or unit.get("activation") != node.name or len(layer.users) != 1:
        return None
    return alias.op
