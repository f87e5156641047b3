"""The canonical op table: one spelling per operation.

Every operation graphopt understands has one canonical callable and one argument layout. A
canonical node is a ``call_function`` node whose ``target`` is that callable and whose ``args``
hold *every* parameter of the signature, positionally, in the order below, with defaults filled
in; its ``kwargs`` are empty. A pass therefore reads ``ops.arg(node, "groups")`` and never has to
care whether the user wrote ``nn.Conv2d``, ``F.conv2d`` or ``torch.conv2d``.

Capture (``graphopt.capture``) rewrites every alias listed in :data:`ALIASES` and every module
type listed in :data:`MODULE_LOWERINGS` into this form. The tables are data: adding an op here
is the only change needed for capture and the matching helpers to know it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from graphopt.errors import NotCanonicalError

_NO_DEFAULT = object()


@dataclass(frozen=True)
class OpSpec:
    """Canonical callable and argument layout of one operation.

    ``params`` lists ``(name, default)`` pairs in call order; ``_NO_DEFAULT`` marks required
    ones. ``tensor_params`` names the parameters that carry tensors (graph values).
    ``pure`` is False for ops with side effects or randomness.
    """

    name: str
    target: Callable[..., Any]
    params: tuple[tuple[str, Any], ...]
    tensor_params: tuple[str, ...] = ("input",)
    pure: bool = True
    random: bool = False
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {n: i for i, (n, _) in enumerate(self.params)})

    def defaults_for(self, given: int) -> tuple[Any, ...]:
        """Defaults of the parameters after the first ``given`` ones."""
        rest = self.params[given:]
        missing = [n for n, d in rest if d is _NO_DEFAULT]
        if missing:
            raise TypeError(f"{self.name}: missing required argument(s) {missing}")
        return tuple(d for _, d in rest)


def _spec(name, target, *params, tensors=("input",), pure=True, random=False) -> OpSpec:
    norm = tuple(p if isinstance(p, tuple) else (p, _NO_DEFAULT) for p in params)
    return OpSpec(name, target, norm, tuple(tensors), pure, random)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` with ``approximate`` positional: F.gelu accepts it only by keyword, and the
    canonical form keeps every argument positional."""
    return F.gelu(input, approximate=approximate)


_CONV = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_CONVT = (("stride", 1), ("padding", 0), ("output_padding", 0), ("groups", 1), ("dilation", 1))
_W = ("input", "weight", "bias")

#: canonical name -> spec
SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        _spec("conv1d", F.conv1d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv2d", F.conv2d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv3d", F.conv3d, "input", "weight", ("bias", None), *_CONV, tensors=_W),
        _spec("conv_transpose1d", F.conv_transpose1d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("conv_transpose2d", F.conv_transpose2d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("conv_transpose3d", F.conv_transpose3d, "input", "weight", ("bias", None), *_CONVT, tensors=_W),
        _spec("linear", F.linear, "input", "weight", ("bias", None), tensors=_W),
        _spec(
            "batch_norm", F.batch_norm, "input", "running_mean", "running_var", ("weight", None),
            ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5),
            tensors=("input", "running_mean", "running_var", "weight", "bias"),
        ),
        _spec("layer_norm", F.layer_norm, "input", "normalized_shape", ("weight", None), ("bias", None),
              ("eps", 1e-5), tensors=("input", "weight", "bias")),
        _spec("group_norm", F.group_norm, "input", "num_groups", ("weight", None), ("bias", None),
              ("eps", 1e-5), tensors=("input", "weight", "bias")),
        _spec("relu", torch.relu, "input"),
        _spec("hardtanh", F.hardtanh, "input", ("min_val", -1.0), ("max_val", 1.0)),
        _spec("leaky_relu", F.leaky_relu, "input", ("negative_slope", 0.01)),
        _spec("elu", F.elu, "input", ("alpha", 1.0)),
        _spec("gelu", gelu, "input", ("approximate", "none")),
        _spec("silu", F.silu, "input"),
        _spec("mish", F.mish, "input"),
        _spec("sigmoid", torch.sigmoid, "input"),
        _spec("tanh", torch.tanh, "input"),
        _spec("hardsigmoid", F.hardsigmoid, "input"),
        _spec("hardswish", F.hardswish, "input"),
        _spec("softmax", torch.softmax, "input", "dim"),
        _spec("log_softmax", torch.log_softmax, "input", "dim"),
        _spec("max_pool1d", F.max_pool1d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("dilation", 1), ("ceil_mode", False), ("return_indices", False)),
        _spec("max_pool2d", F.max_pool2d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("dilation", 1), ("ceil_mode", False), ("return_indices", False)),
        _spec("avg_pool1d", F.avg_pool1d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("ceil_mode", False), ("count_include_pad", True)),
        _spec("avg_pool2d", F.avg_pool2d, "input", "kernel_size", ("stride", None), ("padding", 0),
              ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)),
        _spec("adaptive_avg_pool1d", F.adaptive_avg_pool1d, "input", "output_size"),
        _spec("adaptive_avg_pool2d", F.adaptive_avg_pool2d, "input", "output_size"),
        _spec("adaptive_max_pool2d", F.adaptive_max_pool2d, "input", "output_size", ("return_indices", False)),
        _spec("flatten", torch.flatten, "input", ("start_dim", 0), ("end_dim", -1)),
        _spec("add", operator.add, "input", "other", tensors=("input", "other")),
        _spec("sub", operator.sub, "input", "other", tensors=("input", "other")),
        _spec("mul", operator.mul, "input", "other", tensors=("input", "other")),
        _spec("truediv", operator.truediv, "input", "other", tensors=("input", "other")),
        _spec("matmul", operator.matmul, "input", "other", tensors=("input", "other")),
        _spec("cat", torch.cat, "tensors", ("dim", 0), tensors=("tensors",)),
        _spec("dropout", F.dropout, "input", ("p", 0.5), ("training", True), ("inplace", False),
              pure=False, random=True),
    ]
}

#: canonical callable -> spec, for matching nodes
BY_TARGET: dict[Any, OpSpec] = {s.target: s for s in SPECS.values()}


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
# Aliases: every other spelling of a canonical op, as data.
# --------------------------------------------------------------------------------------------

aten = torch.ops.aten


@dataclass(frozen=True)
class Alias:
    """One non-canonical spelling of a canonical op and how its arguments map onto the spec.

    ``target`` is the callable of a ``call_function`` node, or a method name (``"relu"``) for a
    ``call_method`` node. ``params`` are the spelling's own parameter names in call order
    (``_aten`` reads them off an overload's schema). Each parameter either is a
    parameter of the canonical spec (possibly under another name, see ``rename``), or is listed
    in ``require`` (it must have that value, else the spelling means something else and the
    node is left alone), ``ignore`` (no effect on the value computed) or is the ``inplace_flag``.

    ``fixed`` supplies canonical parameters the spelling implies (``relu6`` is
    ``hardtanh(0, 6)``). ``inplace`` marks spellings that always write into their first
    tensor argument (``torch.relu_``, ``x.add_(y)``); ``inplace_flag`` names the parameter
    that makes them do so (``F.relu(x, inplace=True)``). ``first_output`` marks ops returning a
    tuple whose element 0 is the canonical value (``aten._native_batch_norm_legit_no_training``).
    """

    target: Callable[..., Any] | str
    op: str
    params: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    require: dict[str, Any] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()
    inplace: bool = False
    inplace_flag: str | None = None
    first_output: bool = False

    @property
    def kind(self) -> str:
        return "call_method" if isinstance(self.target, str) else "call_function"

    @property
    def spec(self) -> OpSpec:
        return SPECS[self.op]


def _method(name: str, op: str, *params: str, **kw: Any) -> Alias:
    """A Tensor method spelling; its first parameter is the tensor itself (``input``)."""
    return Alias(name, op, ("input",) + params, **kw)


def _aten(overload: Any, op: str, **kw: Any) -> Alias:
    """An aten overload; parameter names come from its schema, with ``self`` read as ``input``."""
    names = tuple(a.name for a in overload._schema.arguments)
    rename = {"self": "input", **kw.pop("rename", {})}
    return Alias(overload, op, names, rename=rename, **kw)


_UNARY_INPLACE_KW = ("input", "inplace")
_CUDNN = frozenset({"cudnn_enabled", "cudnn_enable"})
_ONE = {"alpha": 1}

ALIASES: tuple[Alias, ...] = (
    # relu
    Alias(F.relu, "relu", _UNARY_INPLACE_KW, inplace_flag="inplace"),
    Alias(torch.relu_, "relu", ("input",), inplace=True),
    _method("relu", "relu"),
    _method("relu_", "relu", inplace=True),
    _aten(aten.relu.default, "relu"),
    _aten(aten.relu_.default, "relu", inplace=True),
    # hardtanh and relu6 (= hardtanh(0, 6))
    Alias(F.hardtanh, "hardtanh", ("input", "min_val", "max_val", "inplace"), inplace_flag="inplace"),
    Alias(F.hardtanh_, "hardtanh", ("input", "min_val", "max_val"), inplace=True),
    Alias(F.relu6, "hardtanh", _UNARY_INPLACE_KW, fixed={"min_val": 0.0, "max_val": 6.0}, inplace_flag="inplace"),
    _aten(aten.hardtanh.default, "hardtanh"),
    _aten(aten.hardtanh_.default, "hardtanh", inplace=True),
    _aten(aten.relu6.default, "hardtanh", fixed={"min_val": 0.0, "max_val": 6.0}),
    # other activations
    Alias(F.leaky_relu, "leaky_relu", ("input", "negative_slope", "inplace"), inplace_flag="inplace"),
    Alias(F.leaky_relu_, "leaky_relu", ("input", "negative_slope"), inplace=True),
    _aten(aten.leaky_relu.default, "leaky_relu"),
    Alias(F.elu, "elu", ("input", "alpha", "inplace"), inplace_flag="inplace"),
    Alias(F.elu_, "elu", ("input", "alpha"), inplace=True),
    _aten(aten.elu.default, "elu", require={"scale": 1, "input_scale": 1}),
    Alias(F.gelu, "gelu", ("input", "approximate")),
    _aten(aten.gelu.default, "gelu"),
    _aten(aten.silu.default, "silu"),
    Alias(F.silu, "silu", _UNARY_INPLACE_KW, inplace_flag="inplace"),
    Alias(F.mish, "mish", _UNARY_INPLACE_KW, inplace_flag="inplace"),
    _aten(aten.mish.default, "mish"),
    Alias(F.sigmoid, "sigmoid", ("input",)),
    Alias(torch.sigmoid_, "sigmoid", ("input",), inplace=True),
    _method("sigmoid", "sigmoid"),
    _method("sigmoid_", "sigmoid", inplace=True),
    _aten(aten.sigmoid.default, "sigmoid"),
    Alias(F.tanh, "tanh", ("input",)),
    Alias(torch.tanh_, "tanh", ("input",), inplace=True),
    _method("tanh", "tanh"),
    _method("tanh_", "tanh", inplace=True),
    _aten(aten.tanh.default, "tanh"),
    Alias(F.hardsigmoid, "hardsigmoid", _UNARY_INPLACE_KW, inplace_flag="inplace"),
    _aten(aten.hardsigmoid.default, "hardsigmoid"),
    Alias(F.hardswish, "hardswish", _UNARY_INPLACE_KW, inplace_flag="inplace"),
    _aten(aten.hardswish.default, "hardswish"),
    # softmax family: only without a dtype cast, which the canonical form does not express
    Alias(torch.softmax, "softmax", ("input", "dim", "dtype"), require={"dtype": None}),
    Alias(F.softmax, "softmax", ("input", "dim", "_stacklevel", "dtype"), require={"dtype": None},
          ignore=frozenset({"_stacklevel"})),
    _method("softmax", "softmax", "dim", "dtype", require={"dtype": None}),
    _aten(aten.softmax.int, "softmax", require={"dtype": None}),
    _aten(aten._softmax.default, "softmax", require={"half_to_float": False}),
    Alias(torch.log_softmax, "log_softmax", ("input", "dim", "dtype"), require={"dtype": None}),
    Alias(F.log_softmax, "log_softmax", ("input", "dim", "_stacklevel", "dtype"), require={"dtype": None},
          ignore=frozenset({"_stacklevel"})),
    _method("log_softmax", "log_softmax", "dim", "dtype", require={"dtype": None}),
    _aten(aten.log_softmax.int, "log_softmax", require={"dtype": None}),
    _aten(aten._log_softmax.default, "log_softmax", require={"half_to_float": False}),
    # convolution and linear layers
    _aten(aten.conv1d.default, "conv1d"),
    _aten(aten.conv2d.default, "conv2d"),
    _aten(aten.conv3d.default, "conv3d"),
    _aten(aten.conv1d.padding, "conv1d"),
    _aten(aten.conv2d.padding, "conv2d"),
    _aten(aten.conv3d.padding, "conv3d"),
    _aten(aten.conv_transpose1d.default, "conv_transpose1d"),
    _aten(aten.conv_transpose2d.input, "conv_transpose2d"),
    _aten(aten.conv_transpose3d.input, "conv_transpose3d"),
    _aten(aten.linear.default, "linear"),
    # normalization
    Alias(torch.batch_norm, "batch_norm", ("input", "weight", "bias", "running_mean", "running_var",
                                           "training", "momentum", "eps", "cudnn_enabled"), ignore=_CUDNN),
    _aten(aten.batch_norm.default, "batch_norm", ignore=_CUDNN),
    _aten(aten._native_batch_norm_legit_no_training.default, "batch_norm", fixed={"training": False},
          first_output=True),
    Alias(torch.layer_norm, "layer_norm", ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
          ignore=_CUDNN),
    _aten(aten.layer_norm.default, "layer_norm", ignore=_CUDNN),
    _aten(aten.native_layer_norm.default, "layer_norm", first_output=True),
    Alias(torch.group_norm, "group_norm", ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
          ignore=_CUDNN),
    _aten(aten.group_norm.default, "group_norm", ignore=_CUDNN),
    # pooling
    Alias(torch.max_pool1d, "max_pool1d", ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    Alias(torch.max_pool2d, "max_pool2d", ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    _aten(aten.max_pool1d.default, "max_pool1d"),
    _aten(aten.max_pool2d.default, "max_pool2d"),
    _aten(aten.max_pool2d_with_indices.default, "max_pool2d", first_output=True),
    _aten(aten.avg_pool1d.default, "avg_pool1d"),
    _aten(aten.avg_pool2d.default, "avg_pool2d"),
    Alias(torch._C._nn.adaptive_avg_pool2d, "adaptive_avg_pool2d", ("input", "output_size")),
    _aten(aten.adaptive_avg_pool1d.default, "adaptive_avg_pool1d"),
    _aten(aten.adaptive_avg_pool2d.default, "adaptive_avg_pool2d"),
    # shape
    _method("flatten", "flatten", "start_dim", "end_dim"),
    _aten(aten.flatten.using_ints, "flatten"),
    Alias(torch.concat, "cat", ("tensors", "dim")),
    Alias(torch.concatenate, "cat", ("tensors", "axis"), rename={"axis": "dim"}),
    _aten(aten.cat.default, "cat"),
    # arithmetic: only alpha == 1 (a scaled add/sub is not the plain operator)
    Alias(torch.add, "add", ("input", "other", "alpha"), require=_ONE),
    _method("add", "add", "other", "alpha", require=_ONE),
    _method("add_", "add", "other", "alpha", require=_ONE, inplace=True),
    _aten(aten.add.Tensor, "add", require=_ONE),
    _aten(aten.add.Scalar, "add", require=_ONE),
    _aten(aten.add_.Tensor, "add", require=_ONE, inplace=True),
    Alias(torch.sub, "sub", ("input", "other", "alpha"), require=_ONE),
    Alias(torch.subtract, "sub", ("input", "other", "alpha"), require=_ONE),
    _method("sub", "sub", "other", "alpha", require=_ONE),
    _method("subtract", "sub", "other", "alpha", require=_ONE),
    _method("sub_", "sub", "other", "alpha", require=_ONE, inplace=True),
    _aten(aten.sub.Tensor, "sub", require=_ONE),
    Alias(torch.mul, "mul", ("input", "other")),
    Alias(torch.multiply, "mul", ("input", "other")),
    _method("mul", "mul", "other"),
    _method("multiply", "mul", "other"),
    _method("mul_", "mul", "other", inplace=True),
    _aten(aten.mul.Tensor, "mul"),
    _aten(aten.mul.Scalar, "mul"),
    Alias(torch.div, "truediv", ("input", "other", "rounding_mode"), require={"rounding_mode": None}),
    Alias(torch.divide, "truediv", ("input", "other", "rounding_mode"), require={"rounding_mode": None}),
    Alias(torch.true_divide, "truediv", ("input", "other")),
    _method("div", "truediv", "other", "rounding_mode", require={"rounding_mode": None}),
    _method("divide", "truediv", "other", "rounding_mode", require={"rounding_mode": None}),
    _method("true_divide", "truediv", "other"),
    _method("div_", "truediv", "other", "rounding_mode", require={"rounding_mode": None}, inplace=True),
    _aten(aten.div.Tensor, "truediv"),
    Alias(torch.matmul, "matmul", ("input", "other")),
    _method("matmul", "matmul", "other"),
    _aten(aten.matmul.default, "matmul"),
    # dropout (training=False is an identity, removed by canonicalization)
    Alias(torch.dropout, "dropout", ("input", "p", "train"), rename={"train": "training"}),
    Alias(torch.dropout_, "dropout", ("input", "p", "train"), rename={"train": "training"}, inplace=True),
    _aten(aten.dropout.default, "dropout", rename={"train": "training"}),
)


def _canonical_identity_aliases() -> tuple[Alias, ...]:
    """The canonical spellings themselves, so capture normalizes their args like any alias.

    Canonical callables that take an ``inplace`` flag or a dtype the spec leaves out get an
    explicit entry above, which wins.
    """
    explicit = {a.target for a in ALIASES if a.kind == "call_function"}
    extra: dict[Any, Alias] = {
        F.dropout: Alias(F.dropout, "dropout", ("input", "p", "training", "inplace"), inplace_flag="inplace"),
    }
    out = []
    for spec in SPECS.values():
        if spec.target in explicit:
            continue
        out.append(extra.get(spec.target) or Alias(spec.target, spec.name, tuple(n for n, _ in spec.params)))
    return tuple(out)


def _index_aliases(aliases: tuple[Alias, ...]) -> dict[tuple[str, Any], Alias]:
    index: dict[tuple[str, Any], Alias] = {}
    for a in aliases:
        key = (a.kind, a.target)
        if key in index:
            raise AssertionError(f"alias table lists {a.target!r} twice")
        index[key] = a
    return index


#: every spelling capture understands: the aliases above plus the canonical forms
ALL_ALIASES: tuple[Alias, ...] = ALIASES + _canonical_identity_aliases()
_ALIAS_INDEX = _index_aliases(ALL_ALIASES)


def alias_of(node: fx.Node) -> Alias | None:
    """The alias-table entry for ``node``'s spelling, or None if it is not a known spelling."""
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return _ALIAS_INDEX.get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


def bind_alias(alias: Alias, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Map a call's ``args``/``kwargs`` onto ``alias.params``; None if they do not fit."""
    if len(args) > len(alias.params):
        return None
    bound = dict(zip(alias.params, args))
    for name, value in kwargs.items():
        if name not in alias.params or name in bound:
            return None
        bound[name] = value
    return bound


def _is_value(value: Any, expected: Any) -> bool:
    if isinstance(value, fx.Node):
        return False
    if expected is None:
        return value is None
    return type(value) in (int, float, bool) and value == expected


def writes_input(alias: Alias, bound: dict[str, Any]) -> bool | None:
    """Whether this call writes into its first tensor argument; None if that is not static."""
    if alias.inplace:
        return True
    if alias.inplace_flag is None or alias.inplace_flag not in bound:
        return False
    flag = bound[alias.inplace_flag]
    return flag if isinstance(flag, bool) else None


def canonical_args(alias: Alias, bound: dict[str, Any]) -> tuple[Any, ...] | None:
    """The full positional canonical args for a bound alias call, or None if it does not apply."""
    values = dict(alias.fixed)
    for name, value in bound.items():
        if name == alias.inplace_flag or name in alias.ignore:
            continue
        if name in alias.require:
            if not _is_value(value, alias.require[name]):
                return None
            continue
        values[alias.rename.get(name, name)] = value
    args = []
    for name, default in alias.spec.params:
        if name in values:
            args.append(values[name])
        elif default is _NO_DEFAULT:
            return None
        else:
            args.append(default)
    return tuple(args)


# Canonical values: conv and pooling geometry as n-tuples (modules store tuples, functional
# calls often pass ints, export passes lists), so passes compare one form.
TUPLE_PARAMS: dict[str, tuple[int, tuple[str, ...]]] = {
    **{f"conv{n}d": (n, ("stride", "padding", "dilation")) for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": (n, ("stride", "padding", "output_padding", "dilation")) for n in (1, 2, 3)},
    **{f"max_pool{n}d": (n, ("kernel_size", "stride", "padding", "dilation")) for n in (1, 2)},
    **{f"avg_pool{n}d": (n, ("kernel_size", "stride", "padding")) for n in (1, 2)},
    **{f"adaptive_avg_pool{n}d": (n, ("output_size",)) for n in (1, 2)},
    "adaptive_max_pool2d": (2, ("output_size",)),
}


def normalize_value(op: str, param: str, value: Any) -> Any:
    """The canonical spelling of one argument value (ints -> n-tuples, lists -> tuples)."""
    if op in TUPLE_PARAMS:
        n, names = TUPLE_PARAMS[op]
        if param in names:
            if param == "stride" and op.startswith(("max_pool", "avg_pool")) and value in ((), []):
                return None  # an empty stride means "same as kernel_size"
            if isinstance(value, int) and not isinstance(value, bool):
                return (value,) * n
            if isinstance(value, list) and all(isinstance(v, int) or v is None for v in value):
                return tuple(value)
            return value
    if param == "normalized_shape" and isinstance(value, int):
        return (value,)
    if isinstance(value, list) and param not in SPECS[op].tensor_params:
        if not any(isinstance(v, fx.Node) for v in value):
            return tuple(value)
    return value


# --------------------------------------------------------------------------------------------
# Module lowerings: standard nn layers as the functional calls their forward makes.
# --------------------------------------------------------------------------------------------

class _Input:
    """Marks where the value flowing into the module call goes in a lowered call."""

    def __repr__(self) -> str:
        return "INPUT"


INPUT = _Input()


@dataclass(frozen=True)
class Attr:
    """A parameter or buffer of the lowered module; becomes ``get_attr <module path>.<name>``."""

    name: str


@dataclass(frozen=True)
class Step:
    """One call a lowered module makes: ``target`` is a callable (``call_function``) or a method
    name (``call_method``). The result of each step feeds the next through :data:`INPUT`, unless
    ``effect_only`` (a state update such as ``num_batches_tracked.add_(1)``)."""

    target: Callable[..., Any] | str
    args: tuple[Any, ...]
    effect_only: bool = False


Lowering = Callable[[nn.Module], "tuple[Step, ...] | None"]


def _ref(module: nn.Module, name: str) -> Attr | None:
    return Attr(name) if getattr(module, name) is not None else None


def _functional(fn: Callable[..., Any], *params: str | Attr) -> Lowering:
    """Lower to ``fn(input, *params)``: a str is read off the module as a Python value, an
    :class:`Attr` refers to a parameter/buffer (``None`` when the module has none)."""

    def lower(module: nn.Module) -> tuple[Step, ...]:
        args = [_ref(module, p.name) if isinstance(p, Attr) else getattr(module, p) for p in params]
        return (Step(fn, (INPUT, *args)),)

    return lower


def _conv(fn: Callable[..., Any]) -> Lowering:
    """Conv forward: non-zero padding modes pad explicitly, then convolve with padding 0."""

    def lower(m: nn.Module) -> tuple[Step, ...]:
        w, b = Attr("weight"), _ref(m, "bias")
        if m.padding_mode == "zeros":
            return (Step(fn, (INPUT, w, b, m.stride, m.padding, m.dilation, m.groups)),)
        zero = (0,) * len(m.stride)
        return (
            Step(F.pad, (INPUT, tuple(m._reversed_padding_repeated_twice), m.padding_mode, None)),
            Step(fn, (INPUT, w, b, m.stride, zero, m.dilation, m.groups)),
        )

    return lower


def _batch_norm(m: nn.Module) -> tuple[Step, ...] | None:
    """Exactly what ``_BatchNorm.forward`` does.

    A training-mode BN that tracks statistics stays a BN in training mode: the counter update
    is an explicit in-place step and ``batch_norm(training=True)`` updates the running stats.
    With ``momentum=None`` its factor is ``1/num_batches_tracked`` read at run time, which a
    constant argument cannot express, so that case stays an opaque module call.
    """
    tracking = m.training and m.track_running_stats
    if tracking and m.momentum is None:
        return None
    steps: list[Step] = []
    if tracking and m.num_batches_tracked is not None:
        steps.append(Step("add_", (Attr("num_batches_tracked"), 1), effect_only=True))
    pass_stats = not m.training or m.track_running_stats
    mean = _ref(m, "running_mean") if pass_stats else None
    var = _ref(m, "running_var") if pass_stats else None
    batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    factor = 0.0 if m.momentum is None else m.momentum
    steps.append(Step(F.batch_norm, (INPUT, mean, var, _ref(m, "weight"), _ref(m, "bias"), batch_stats, factor, m.eps)))
    return tuple(steps)


def _dropout(m: nn.Module) -> tuple[Step, ...]:
    return (Step(F.dropout, (INPUT, m.p, True, m.inplace)),) if m.training else ()


def _identity_in_eval(m: nn.Module) -> tuple[Step, ...] | None:
    """Feature/alpha dropout: an identity in eval; in training it stays an opaque call."""
    return None if m.training else ()


def _softmax(fn: Callable[..., Any]) -> Lowering:
    def lower(m: nn.Module) -> tuple[Step, ...] | None:
        # dim=None picks a legacy dim from the input rank at run time: keep the module
        return None if m.dim is None else (Step(fn, (INPUT, m.dim)),)

    return lower


_WEIGHT, _BIAS = Attr("weight"), Attr("bias")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONVT_ATTRS = (_WEIGHT, _BIAS, "stride", "padding", "output_padding", "groups", "dilation")

#: exact module type -> lowering (None from a lowering keeps that instance an opaque call)
MODULE_LOWERINGS: dict[type[nn.Module], Lowering] = {
    nn.Conv1d: _conv(F.conv1d),
    nn.Conv2d: _conv(F.conv2d),
    nn.Conv3d: _conv(F.conv3d),
    nn.ConvTranspose1d: _functional(F.conv_transpose1d, *_CONVT_ATTRS),
    nn.ConvTranspose2d: _functional(F.conv_transpose2d, *_CONVT_ATTRS),
    nn.ConvTranspose3d: _functional(F.conv_transpose3d, *_CONVT_ATTRS),
    nn.Linear: _functional(F.linear, _WEIGHT, _BIAS),
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _functional(F.layer_norm, "normalized_shape", _WEIGHT, _BIAS, "eps"),
    nn.GroupNorm: _functional(F.group_norm, "num_groups", _WEIGHT, _BIAS, "eps"),
    nn.ReLU: _functional(F.relu, "inplace"),
    nn.ReLU6: _functional(F.hardtanh, "min_val", "max_val", "inplace"),
    nn.Hardtanh: _functional(F.hardtanh, "min_val", "max_val", "inplace"),
    nn.LeakyReLU: _functional(F.leaky_relu, "negative_slope", "inplace"),
    nn.ELU: _functional(F.elu, "alpha", "inplace"),
    nn.GELU: _functional(gelu, "approximate"),
    nn.SiLU: _functional(F.silu, "inplace"),
    nn.Mish: _functional(F.mish, "inplace"),
    nn.Sigmoid: _functional(torch.sigmoid),
    nn.Tanh: _functional(torch.tanh),
    nn.Hardsigmoid: _functional(F.hardsigmoid, "inplace"),
    nn.Hardswish: _functional(F.hardswish, "inplace"),
    nn.Softmax: _softmax(torch.softmax),
    nn.LogSoftmax: _softmax(torch.log_softmax),
    nn.MaxPool1d: _functional(F.max_pool1d, *_MAX_POOL),
    nn.MaxPool2d: _functional(F.max_pool2d, *_MAX_POOL),
    nn.AvgPool1d: _functional(F.avg_pool1d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AvgPool2d: _functional(F.avg_pool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                              "divisor_override"),
    nn.AdaptiveAvgPool1d: _functional(F.adaptive_avg_pool1d, "output_size"),
    nn.AdaptiveAvgPool2d: _functional(F.adaptive_avg_pool2d, "output_size"),
    nn.Flatten: _functional(torch.flatten, "start_dim", "end_dim"),
    nn.Dropout: _dropout,
    nn.Dropout1d: _identity_in_eval,
    nn.Dropout2d: _identity_in_eval,
    nn.Dropout3d: _identity_in_eval,
    nn.AlphaDropout: _identity_in_eval,
    nn.Identity: lambda m: (),
}

#: types whose instances (and subclasses) capture keeps as leaves while tracing
LOWERABLE_TYPES: tuple[type[nn.Module], ...] = tuple(MODULE_LOWERINGS)


def has_hooks(module: nn.Module) -> bool:
    """True if the module has hooks (which also implement the old ``weight_norm``) that a
    functional call in its place would skip."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


def is_opaque(module: nn.Module) -> bool:
    """True if calling the module does more than its class's forward with its stored weights:
    it has hooks, or parametrized weights computed on each call."""
    return has_hooks(module) or parametrize.is_parametrized(module)


def lowering_for(module: nn.Module) -> tuple[Step, ...] | None:
    """The calls that replace a call of ``module``, or None to keep it an opaque ``call_module``.

    Only exact types are lowered: a subclass may override ``forward``, and parametrized modules
    (``torch.nn.utils.parametrize``, ``weight_norm``'s pre-hook) compute their weight per call.
    """
    lower = MODULE_LOWERINGS.get(type(module))
    if lower is None or is_opaque(module):
        return None
    return lower(module)


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
