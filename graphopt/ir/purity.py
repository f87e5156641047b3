"""Is a graph node pure, random, mutating or side-effecting?

Passes that evaluate nodes ahead of time (``fold-constants``) or delete them
(``eliminate-dead-code``) may only touch nodes whose sole effect is their return value. This
module answers that question once for every pass:

- :func:`is_impure` -- why a node must not be evaluated ahead of time or deleted, or None.
- :func:`is_random` -- does the node draw from the random number generator?
- :func:`mutated_values` -- which graph values does the node modify in place?
- :func:`may_alias_input` -- may the node's result share memory with one of its inputs (so
  that mutating the result mutates the input)?

Every answer errs towards "impure": a node not known to be harmless is kept as it is. In
particular, unlike ``torch.fx.Node.is_impure``, in-place ops on symbolic-trace graphs
(``x.add_(1)``, ``torch.relu_``, ``F.relu(inplace=True)``, ``out=``, ``copy_``, ``setitem``),
stateful modules (a batch norm in training mode), GraphModule submodules containing impure
nodes, unknown modules and functions from outside torch/operator/builtins/math are all impure.
Random ops are impure too: evaluating them once freezes one sample, and deleting an unused one
shifts the random stream seen by later ops.

Rules are tables of data below; OpOverloads (aten-level graphs) are judged by their schema.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value

# --------------------------------------------------------------------------- tables

try:  # torch's own list of random functions (torch.rand, randn_like, bernoulli, ...)
    from torch._library.utils import _RANDOM_FUNCTIONS as _TORCH_RANDOM_FUNCTIONS
except ImportError:  # older torch: the aten tags below still cover these
    _TORCH_RANDOM_FUNCTIONS = set()

#: Python-level random functions: torch's list plus ones not tagged in the aten registry.
_RANDOM_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.gumbel_softmax,
        nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.orthogonal_, nn.init.sparse_,
        nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
        *_TORCH_RANDOM_FUNCTIONS,
    }
)

#: Ops that are random only when a flag argument is truthy: target -> (name, index, default).
#: The flag is read with :func:`graphopt.ir.ops.arg` on canonical nodes (same name).
_RANDOM_IF_FLAG: dict[Callable[..., Any], tuple[str, int, Any]] = {
    F.dropout: ("training", 2, True),
    F.dropout1d: ("training", 2, True),
    F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    F.rrelu: ("training", 3, False),
    F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
    torch.dropout: ("train", 2, True),
    torch.dropout_: ("train", 2, True),
    torch.alpha_dropout: ("train", 2, True),
    torch.alpha_dropout_: ("train", 2, True),
    torch.feature_dropout: ("train", 2, True),
    torch.feature_dropout_: ("train", 2, True),
    torch.feature_alpha_dropout: ("train", 2, True),
    torch.feature_alpha_dropout_: ("train", 2, True),
    torch.rrelu: ("training", 3, False),
    torch.rrelu_: ("training", 3, False),
}

#: Normalizations that update running statistics in place when a flag is set:
#: target -> ((flag name, index, default), ((stat name, index), ...)).
_UPDATES_STATS_IF_FLAG: dict[Callable[..., Any], tuple[tuple[str, int, Any], tuple[tuple[str, int], ...]]] = {
    F.batch_norm: (("training", 5, False), (("running_mean", 1), ("running_var", 2))),
    torch.batch_norm: (("training", 5, False), (("running_mean", 3), ("running_var", 4))),
    F.instance_norm: (("use_input_stats", 5, True), (("running_mean", 1), ("running_var", 2))),
    torch.instance_norm: (("use_input_stats", 5, True), (("running_mean", 3), ("running_var", 4))),
}

#: Functions that write their first argument (besides names ending in ``_``).
_MUTATES_FIRST_ARG: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
        operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
        operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    }
)

#: Dunder methods that write ``self``.
_MUTATING_DUNDERS = frozenset(
    {"__setitem__", "__delitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
     "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
)

#: Effects on the world outside the graph (besides torch.fx's own list).
_SIDE_EFFECT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        builtins.print, builtins.setattr, builtins.delattr, builtins.exec, builtins.eval, builtins.open,
        builtins.input, builtins.breakpoint, builtins.next,
        torch.manual_seed, torch.seed, torch.set_rng_state, torch.save,
    }
)
_SIDE_EFFECT_METHODS = frozenset(
    {"backward", "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "record_stream"}
)

#: Roots of modules whose callables are judged by the rules here; anything else is unknown.
_KNOWN_LIBRARIES = ("torch", "operator", "_operator", "builtins", "math")

#: Modules (exact types) whose call only computes its output, given the extra conditions in
#: :func:`_module_impurity` (eval mode for dropout, no running-stat update for norms, no
#: ``inplace=True``, no ``max_norm`` for embeddings).
_PURE_MODULE_TYPES: frozenset[type] = frozenset(
    getattr(nn, name)
    for name in (
        "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d Linear Bilinear Identity "
        "Flatten Unflatten ReLU ReLU6 LeakyReLU PReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardtanh "
        "Hardsigmoid Hardswish Softplus Softsign Softmax Softmax2d LogSoftmax Softmin Threshold Tanhshrink "
        "Hardshrink Softshrink LogSigmoid GLU MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d "
        "AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d "
        "AdaptiveMaxPool3d LPPool1d LPPool2d Upsample UpsamplingNearest2d UpsamplingBilinear2d "
        "PixelShuffle PixelUnshuffle ChannelShuffle ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d "
        "ConstantPad2d ConstantPad3d ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d "
        "ReplicationPad2d ReplicationPad3d LayerNorm GroupNorm RMSNorm LocalResponseNorm Embedding "
        "EmbeddingBag CosineSimilarity PairwiseDistance Fold Unfold BatchNorm1d BatchNorm2d BatchNorm3d "
        "InstanceNorm1d InstanceNorm2d InstanceNorm3d Dropout Dropout1d Dropout2d Dropout3d AlphaDropout "
        "FeatureAlphaDropout RReLU"
    ).split()
    if hasattr(nn, name)
)
_RANDOM_IN_TRAINING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.FeatureAlphaDropout, nn.RReLU)
_RUNNING_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                  nn.InstanceNorm3d)

#: Out-of-place ops whose result never shares memory with an input (see may_alias_input).
_FRESH_RESULT_NAMES = frozenset(
    "add sub mul div truediv floordiv mod pow neg matmul mm bmm addmm true_divide floor_divide remainder "
    "relu sigmoid tanh exp log sqrt rsqrt abs sin cos erf reciprocal square clamp clip softmax log_softmax "
    "sum mean amax amin prod var std norm cat stack clone where conv1d conv2d conv3d linear batch_norm "
    "layer_norm group_norm gelu silu hardtanh hardswish hardsigmoid leaky_relu elu outer".split()
)


# --------------------------------------------------------------------------- public API


def is_impure(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """Why ``node`` must not be evaluated ahead of time or deleted, or None if it is pure.

    ``gm`` is the module owning the graph (default: the graph's owning module); it is needed
    to look up ``call_module`` targets.
    """
    if node.op == "placeholder":
        return "graph input"
    if node.op == "output":
        return "graph output"
    if node.op == "get_attr":
        return None
    if node.op == "call_module":
        owner = gm if gm is not None else node.graph.owning_module
        if owner is None:
            return f"module {node.target!r} cannot be looked up (graph has no owning module)"
        reason = _module_impurity(owner.get_submodule(str(node.target)))
        return None if reason is None else f"module {node.target!r}: {reason}"
    name = _callable_name(node)
    effect = _side_effect(node)
    if effect is not None:
        return effect
    if is_random(node):
        return f"random op {name} draws from the random number generator"
    mutation = _mutation(node)
    if mutation is not None:
        return mutation[0]
    if node.op == "call_method":
        if not (hasattr(torch.Tensor, name) or hasattr(tuple, name)):
            return f"method {name!r} is not a tensor method; not known to be pure"
        return None
    spec = ops.spec_of(node)
    if spec is not None:  # canonical ops are known; randomness was judged above, flags included
        return None if spec.pure or spec.random else f"canonical op {spec.name} is marked impure in graphopt.ir.ops"
    return _unknown_function(node.target)


def is_random(node: fx.Node) -> bool:
    """True if the node draws from the random number generator (so its value differs per call).

    Dropout-like ops count only when their ``training`` flag is set (or not a literal); modules
    not known to be deterministic count as random.
    """
    if node.op == "call_module":
        owner = node.graph.owning_module
        return owner is None or _module_is_random(owner.get_submodule(str(node.target)))
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if node.op == "call_method":
        return _is_seeded_name(str(target))
    if not _is_hashable(target):
        return False
    flag = _RANDOM_IF_FLAG.get(target)
    if flag is not None:
        return _flag_set(node, *flag)
    if target in _RANDOM_FUNCTIONS:
        return True
    spec = ops.spec_of(node)
    if spec is not None and spec.random:
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _seeded_op(target)
    return _library_root(target) == "torch" and _is_seeded_name(getattr(target, "__name__", ""))


def mutated_values(node: fx.Node) -> list[fx.Node]:
    """Graph values ``node`` modifies in place (for ``add_``: its ``self``; for ``out=``: the out
    tensor; for a module updating its state: the ``get_attr`` nodes reading that state).

    An opaque module is assumed to mutate its tensor arguments and its own state.
    """
    if node.op == "call_module":
        return _module_mutations(node)
    mutation = _mutation(node)
    return [] if mutation is None else mutation[1]


def dead_write(node: fx.Node) -> bool:
    """True if ``node``'s only effect is an in-place write into freshly allocated temporaries that
    nothing else reads (``t = relu(x); t.add_(1)`` with ``t`` unused otherwise): with no users of
    its own, it can be deleted like a pure node. Writes into inputs, parameters, views, values
    read elsewhere, and random or side-effecting ops are observable and never dead."""
    if node.users or node.op not in ("call_function", "call_method"):
        return False
    if _side_effect(node) is not None or is_random(node):
        return False
    mutation = _mutation(node)
    if mutation is None or not mutation[1]:
        return False
    return all(
        written.op in ("call_function", "call_method") and not may_alias_input(written)
        and set(written.users) == {node} and is_impure(written) is None
        for written in mutation[1]
    )


def may_alias_input(node: fx.Node) -> bool:
    """True unless the node's result is known to be freshly allocated (views such as ``t``,
    ``view``, ``getitem``, ``contiguous``, eval-mode dropout, and anything unknown may return an
    input or a view of it, so writing into the result writes into that input)."""
    if node.op not in ("call_function", "call_method"):
        return node.op == "call_module"
    if _mutation(node) is not None:  # in-place ops return the tensor they wrote
        return True
    spec = ops.spec_of(node)
    if spec is not None:
        return spec.name in ("flatten", "dropout")
    if node.op == "call_method":
        return node.target not in _FRESH_RESULT_NAMES
    return _library_root(node.target) is None or getattr(node.target, "__name__", "") not in _FRESH_RESULT_NAMES


# --------------------------------------------------------------------------- functions and methods


def _callable_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or getattr(getattr(target, "__objclass__", None), "__name__", "")
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _side_effect(node: fx.Node) -> str | None:
    if node.op == "call_method":
        if node.target in _SIDE_EFFECT_METHODS:
            return f"method {node.target!r} has side effects"
        return None
    target = node.target
    if not _is_hashable(target):
        return None
    from torch.fx.node import _side_effectful_functions

    if target in _side_effectful_functions or target in _SIDE_EFFECT_FUNCTIONS:
        return f"{_callable_name(node)} has side effects"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        import torch._library.utils as library_utils

        torch_is_impure = getattr(library_utils, "is_impure", None)  # absent before torch 2.9
        if torch_is_impure is not None and not _mutable_schema_writes(target) and not _seeded_op(target) \
                and torch_is_impure(target, args=node.args, kwargs=node.kwargs):
            return f"{target} is registered as effectful"
    return None


def _mutation(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """(reason, values written) if the node writes any value in place, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = _callable_name(node)
    first = [node.args[0]] if node.args else []
    if node.kwargs.get("out") is not None:
        return f"{name} writes its out= argument", _nodes_in(node.kwargs["out"])
    if node.op == "call_method":
        if _is_inplace_name(node.target) or node.target in _MUTATING_DUNDERS:
            return f"method {node.target!r} modifies its tensor in place", _nodes_in(first)
        return None
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        written = _mutable_schema_writes(target)
        if not written:
            return None
        values = [v for i, n in written for v in _nodes_in(ops.call_arg(node, n, i, None))]
        return f"{target} has a mutable schema (writes {', '.join(sorted({n for _, n in written}))})", values
    if not _is_hashable(target):
        return None
    if target in _MUTATES_FIRST_ARG or (_library_root(target) and _is_inplace_name(getattr(target, "__name__", ""))):
        return f"{name} modifies its first argument in place", _nodes_in(first)
    inplace_index = _inplace_param_index(target)
    if inplace_index is not None and _flag_set(node, "inplace", inplace_index, False):
        return f"{name} is called with inplace=True", _nodes_in(first)
    stats = _UPDATES_STATS_IF_FLAG.get(target)
    if stats is not None:
        (flag_name, flag_index, flag_default), stat_params = stats
        written_stats = [v for n, i in stat_params for v in _nodes_in(ops.call_arg(node, n, i, None))]
        if written_stats and _flag_set(node, flag_name, flag_index, flag_default):
            return f"{name} with {flag_name}=True updates its running statistics in place", written_stats
    return None


def _is_inplace_name(name: str) -> bool:
    """``add_``, ``relu_``: one trailing underscore (dunders excluded). Every such name in the
    torch namespace, ``torch.Tensor``, ``torch.nn.functional`` and ``torch.nn.init`` is in place."""
    return name.endswith("_") and not name.endswith("__") and name.strip("_") != ""


def _unknown_function(target: Any) -> str | None:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    if _library_root(target) is not None:
        return None
    return f"function {getattr(target, '__qualname__', target)!r} is not from torch; not known to be pure"


def _library_root(target: Any) -> str | None:
    """The top-level package of a callable if it is one this module has rules for, else None."""
    module = getattr(target, "__module__", None)
    if module is None and hasattr(target, "__objclass__"):  # method descriptors: torch.Tensor.add_
        module = getattr(target.__objclass__, "__module__", None)
    root = (module or "").split(".")[0]
    return root if root in _KNOWN_LIBRARIES else None


def _flag_set(node: fx.Node, name: str, index: int, default: Any) -> bool:
    """Is the flag argument truthy? A flag computed in the graph counts as set (conservative)."""
    value = ops.call_arg(node, name, index, default)
    return True if isinstance(value, fx.Node) else bool(value)


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _inplace_param_index(target: Callable[..., Any]) -> int | None:
    """Position of an ``inplace`` parameter in the signature of ``target`` (F.relu, F.hardtanh...)."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return params.index("inplace") if "inplace" in params else None


@functools.lru_cache(maxsize=None)
def _is_seeded_name(name: str) -> bool:
    """Is ``torch.ops.aten.<name>`` tagged ``nondeterministic_seeded`` (bernoulli, normal_, rand,
    random_, ...)? Method and torch-function names match their aten op's name."""
    return _seeded_op(getattr(torch.ops.aten, name, None))


def _seeded_op(op: Any) -> bool:
    """Is an OpOverload (or any overload of a packet) tagged ``nondeterministic_seeded``?"""
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    overloads = [getattr(op, o) for o in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
    return any(torch.Tag.nondeterministic_seeded in o.tags for o in overloads)


def _mutable_schema_writes(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> list[tuple[int, str]]:
    """(position, name) of the arguments the op's schema marks as written (``Tensor(a!)``).
    For a packet, the union over its overloads (which overload runs is decided at call time)."""
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return []
    overloads = [getattr(op, o) for o in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
    written = set()
    for overload in overloads:
        for i, a in enumerate(overload._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                written.add((i, a.name))
    return sorted(written)


# --------------------------------------------------------------------------- modules


def _module_impurity(module: nn.Module) -> str | None:
    if getattr(module, "_is_impure", False):
        return f"{type(module).__name__} declares itself impure (_is_impure)"
    if isinstance(module, fx.GraphModule):
        for inner in module.graph.nodes:
            if inner.op in ("placeholder", "output"):
                continue
            reason = is_impure(inner, module)
            if reason is not None:
                return f"contains impure node {inner.name} ({reason})"
        return None
    if type(module) is nn.Sequential:
        for name, child in module.named_children():
            reason = _module_impurity(child)
            if reason is not None:
                return f"child {name}: {reason}"
        return None
    if type(module) not in _PURE_MODULE_TYPES:
        return f"{type(module).__name__} is not known to be pure (opaque module)"
    if getattr(module, "inplace", False):
        return f"{type(module).__name__}(inplace=True) modifies its input"
    if _module_is_random(module):
        return f"{type(module).__name__} in training mode is random"
    if _updates_running_stats(module):
        return f"{type(module).__name__} in training mode updates its running statistics"
    if getattr(module, "max_norm", None) is not None:
        return f"{type(module).__name__}(max_norm=...) renormalizes its weight in place"
    return None


def _module_is_random(module: nn.Module) -> bool:
    if isinstance(module, fx.GraphModule):
        return any(is_random(n) for n in module.graph.nodes)
    if type(module) is nn.Sequential:
        return any(_module_is_random(child) for child in module.children())
    if type(module) not in _PURE_MODULE_TYPES:
        return True
    return isinstance(module, _RANDOM_IN_TRAINING) and module.training


def _updates_running_stats(module: nn.Module) -> bool:
    return isinstance(module, _RUNNING_STATS) and module.training and getattr(module, "running_mean", None) is not None


def _module_mutations(node: fx.Node) -> list[fx.Node]:
    """Values a ``call_module`` node writes: its input for ``inplace=True``, the ``get_attr``
    nodes reading its own state when it updates that state, everything it sees when opaque."""
    owner = node.graph.owning_module
    module = owner.get_submodule(str(node.target)) if owner is not None else None
    if module is not None and _module_impurity(module) is None:
        return []
    inputs = _nodes_in((node.args, node.kwargs))
    prefix = f"{node.target}."
    own_state = [n for n in node.graph.nodes if n.op == "get_attr" and str(n.target).startswith(prefix)]
    if module is None or type(module) not in _PURE_MODULE_TYPES:
        return inputs + own_state
    written = inputs[:1] if getattr(module, "inplace", False) else []
    if _updates_running_stats(module) or getattr(module, "max_norm", None) is not None:
        written += own_state
    return written


def written_values(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Every value some node writes in place -> that writer: the written values themselves,
    everything they may alias up the graph, and every ``get_attr`` sharing storage with a
    written one (tied weights, the same attribute read twice)."""
    written: dict[fx.Node, fx.Node] = {}
    for writer in gm.graph.nodes:
        stack = list(mutated_values(writer))
        while stack:
            value = stack.pop()
            if value in written:
                continue
            written[value] = writer
            if may_alias_input(value):
                stack.extend(value.all_input_nodes)
    storages = {}
    for node in written:
        if node.op == "get_attr":
            tensor = get_attr_value(gm, node)
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = written[node]
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node not in written:
            tensor = get_attr_value(gm, node)
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in storages:
                written[node] = storages[tensor.untyped_storage().data_ptr()]
    return written
