"""Aliases: every other spelling of a canonical op, as data.

:class:`Alias` describes one non-canonical spelling (a torch function, a Tensor method, an aten
overload) and how its arguments map onto the op's :class:`~graphopt.ir.specs.OpSpec`;
:data:`ALIASES` lists them and :data:`ALL_ALIASES` adds the canonical spellings themselves.
:func:`alias_of`, :func:`bind_alias`, :func:`canonical_args` and :func:`writes_input` are what
capture's canonicalization (:mod:`graphopt.ir.canonical`) uses to rewrite a call;
:func:`normalize_value` gives one spelling of each argument value (:data:`TUPLE_PARAMS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.ir.specs import _NO_DEFAULT, SPECS, OpSpec

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
