"""Capture and canonicalization: every spelling in the tables computes exactly what the model
computes, in-place rewrites happen only where invisible, the user's model is never touched, and
failures are GraphoptErrors that name the user's line."""
from __future__ import annotations

import copy
import operator
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import graphopt
from graphopt.ir import ops
from graphopt.ir.canonical import canonicalize
from graphopt.capture import capture
from graphopt.errors import CaptureError, InputError
from graphopt.ir.purity import mutated_values

_GENERATOR = torch.Generator().manual_seed(0)


def _t(*shape: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=_GENERATOR) * scale
    return t.abs() + 0.5 if positive else t


# One call's worth of canonical arguments per op, with non-default values wherever a default
# exists, so a dropped or misnamed argument changes the result.
SAMPLES: dict[str, dict[str, Any]] = {
    "conv1d": dict(input=_t(2, 4, 9), weight=_t(6, 2, 3), bias=_t(6), stride=2, padding=1, dilation=1, groups=2),
    "conv2d": dict(input=_t(2, 4, 7, 7), weight=_t(6, 2, 3, 3), bias=_t(6), stride=1, padding=2, dilation=2, groups=2),
    "conv3d": dict(input=_t(1, 2, 5, 5, 5), weight=_t(3, 2, 3, 3, 3), bias=_t(3), stride=2, padding=1, dilation=1,
                   groups=1),
    "conv_transpose1d": dict(input=_t(2, 4, 5), weight=_t(4, 3, 3), bias=_t(3), stride=2, padding=1,
                             output_padding=1, groups=1, dilation=1),
    "conv_transpose2d": dict(input=_t(2, 4, 5, 5), weight=_t(4, 2, 3, 3), bias=_t(4), stride=2, padding=1,
                             output_padding=1, groups=2, dilation=1),
    "conv_transpose3d": dict(input=_t(1, 2, 3, 3, 3), weight=_t(2, 2, 2, 2, 2), bias=_t(2), stride=2, padding=0,
                             output_padding=1, groups=1, dilation=1),
    "linear": dict(input=_t(3, 5), weight=_t(4, 5), bias=_t(4)),
    "batch_norm": dict(input=_t(2, 3, 4, 4), running_mean=_t(3), running_var=_t(3, positive=True), weight=_t(3),
                       bias=_t(3), training=False, momentum=0.2, eps=1e-3),
    "layer_norm": dict(input=_t(2, 3, 4), normalized_shape=[4], weight=_t(4), bias=_t(4), eps=1e-3),
    "group_norm": dict(input=_t(2, 4, 3, 3), num_groups=2, weight=_t(4), bias=_t(4), eps=1e-3),
    "relu": dict(input=_t(3, 4)),
    "hardtanh": dict(input=_t(3, 4, scale=8), min_val=-0.5, max_val=0.75),
    "leaky_relu": dict(input=_t(3, 4), negative_slope=0.2),
    "elu": dict(input=_t(3, 4), alpha=0.7),
    "gelu": dict(input=_t(3, 4), approximate="tanh"),
    "silu": dict(input=_t(3, 4)),
    "mish": dict(input=_t(3, 4)),
    "sigmoid": dict(input=_t(3, 4)),
    "tanh": dict(input=_t(3, 4)),
    "hardsigmoid": dict(input=_t(3, 4, scale=4)),
    "hardswish": dict(input=_t(3, 4, scale=4)),
    "softmax": dict(input=_t(3, 4), dim=0),
    "log_softmax": dict(input=_t(3, 4), dim=0),
    "max_pool1d": dict(input=_t(2, 3, 9), kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True,
                       return_indices=False),
    "max_pool2d": dict(input=_t(2, 3, 9, 9), kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True,
                       return_indices=False),
    "avg_pool1d": dict(input=_t(2, 3, 9), kernel_size=3, stride=2, padding=1, ceil_mode=True,
                       count_include_pad=False),
    "avg_pool2d": dict(input=_t(2, 3, 9, 9), kernel_size=3, stride=2, padding=1, ceil_mode=True,
                       count_include_pad=False, divisor_override=4),
    "adaptive_avg_pool1d": dict(input=_t(2, 3, 9), output_size=4),
    "adaptive_avg_pool2d": dict(input=_t(2, 3, 9, 9), output_size=[4, 3]),
    "adaptive_max_pool2d": dict(input=_t(2, 3, 9, 9), output_size=[4, 3], return_indices=False),
    "flatten": dict(input=_t(2, 3, 4, 5), start_dim=1, end_dim=2),
    "add": dict(input=_t(3, 4), other=_t(3, 4)),
    "sub": dict(input=_t(3, 4), other=_t(3, 4)),
    "mul": dict(input=_t(3, 4), other=_t(3, 4)),
    "truediv": dict(input=_t(3, 4), other=_t(3, 4, positive=True)),
    "matmul": dict(input=_t(3, 4), other=_t(4, 5)),
    "cat": dict(tensors=[_t(2, 3), _t(2, 2)], dim=1),
    "dropout": dict(input=_t(3, 4), p=0.3, training=True),
}

# values for parameters that do not reach the canonical op
_IGNORED = {"_stacklevel": 3, "cudnn_enabled": True, "cudnn_enable": True}


def _alias_id(alias: ops.Alias) -> str:
    target = alias.target if isinstance(alias.target, str) else getattr(alias.target, "__qualname__", None) \
        or str(alias.target)
    module = "Tensor" if alias.kind == "call_method" else getattr(alias.target, "__module__", "") or ""
    return f"{module}.{target}->{alias.op}".replace("torch._ops.aten.", "aten.")


def _scalar_other(alias: ops.Alias) -> bool:
    schema = getattr(alias.target, "_schema", None)
    return schema is not None and any(a.name == "other" and isinstance(a.type, torch.NumberType)
                                      for a in schema.arguments)


def _as_schema_value(alias: ops.Alias, param: str, value: Any) -> Any:
    """aten overloads take int lists where Python functions also take an int."""
    schema = getattr(alias.target, "_schema", None)
    if schema is None or type(value) is not int:
        return value
    arg = next(a for a in schema.arguments if a.name == param)
    if isinstance(arg.type, torch.StringType):
        return "valid"  # the padding overloads of aten.convNd
    if not isinstance(arg.type, torch.ListType):
        return value
    return [value] * (arg.N or ops.TUPLE_PARAMS[alias.op][0])


def _call_graph(alias: ops.Alias, n_positional: int, inplace: bool) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A graph calling ``alias`` once on placeholders.

    The first argument and ``n_positional`` more go positionally, every other parameter the
    spelling has by keyword. With ``inplace`` the spelling writes (its in-place flag set) into
    ``x * 1``, a value nobody else sees.
    """
    sample = SAMPLES[alias.op]
    graph, inputs = fx.Graph(), []

    def value_of(param: str) -> Any:
        name = alias.rename.get(param, param)
        if param == alias.inplace_flag:
            return inplace
        if param in alias.require:
            return alias.require[param]
        if param in _IGNORED:
            return _IGNORED[param]
        if name == "other" and _scalar_other(alias):
            return 2.5
        value = _as_schema_value(alias, param, sample[name])
        if isinstance(value, torch.Tensor):
            inputs.append(value)
            return graph.placeholder(f"{name}_{len(inputs)}")
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            inputs.extend(value)
            return [graph.placeholder(f"{name}_{len(inputs) - len(value) + i}") for i in range(len(value))]
        return value

    first, *rest = alias.params
    head = value_of(first)
    if inplace:
        head = graph.call_function(operator.mul, (head, 1.0))
    args = (head, *[value_of(p) for p in rest[:n_positional]])
    kwargs = {p: value_of(p) for p in rest[n_positional:]}
    node = graph.create_node(alias.kind, alias.target, args, kwargs)
    if alias.first_output:
        node = graph.call_function(operator.getitem, (node, 0))
    graph.output(node)
    return fx.GraphModule(nn.Module(), graph), inputs


def _spelled(alias: ops.Alias, style: str) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``style`` "keyword": all but the first argument by keyword; "positional": the longest
    positional prefix the callable accepts (some parameters are keyword-only); "inplace": the
    in-place form writing into a private value."""
    if style == "keyword":
        return _call_graph(alias, 0, inplace=False)
    for n in range(len(alias.params) - 1, -1, -1):
        gm, inputs = _call_graph(alias, n, inplace=style == "inplace")
        try:
            _run(gm, inputs)
        except (TypeError, RuntimeError):
            continue
        return gm, inputs
    raise AssertionError(f"no positional spelling of {alias} runs")


def _styles(alias: ops.Alias) -> list[str]:
    if alias.inplace:
        return ["inplace"]
    keyword = [] if getattr(alias.target, "__module__", None) == "_operator" else ["keyword"]
    return keyword + ["positional"] + (["inplace"] if alias.inplace_flag else [])


_ALIAS_CASES = [pytest.param(a, s, id=f"{_alias_id(a)}[{s}]") for a in ops.ALL_ALIASES for s in _styles(a)]


def _run(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # dropout draws the same mask in both runs
        return gm(*[t.clone() for t in inputs])


def _call_node(gm: fx.GraphModule) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
             and not (n.target is operator.mul and n.args[1] == 1.0)]
    assert len(nodes) == 1, gm.graph
    return nodes[0]


# -- the alias table ----------------------------------------------------------------------------


@pytest.mark.parametrize("alias, style", _ALIAS_CASES)
def test_every_spelling_becomes_the_canonical_call_and_computes_the_same(alias: ops.Alias, style: str) -> None:
    gm, inputs = _spelled(alias, style)
    expected = _run(gm, inputs)
    canonicalize(gm)
    node = _call_node(gm)
    spec = ops.SPECS[alias.op]
    assert node.op == "call_function" and node.target is spec.target
    assert node.kwargs == {} and len(node.args) == len(spec.params)
    torch.testing.assert_close(_run(gm, inputs), expected, rtol=0, atol=0)
    assert canonicalize(gm) == 0  # idempotent


def test_alias_table_names_only_known_ops_and_parameters() -> None:
    for alias in ops.ALL_ALIASES:
        spec = ops.SPECS[alias.op]
        for p in alias.params:
            routed = p == alias.inplace_flag or p in alias.require or p in alias.ignore
            assert routed or alias.rename.get(p, p) in spec.index, (alias, p)
        assert set(alias.fixed) <= set(spec.index)


def test_inplace_spellings_on_a_graph_input_stay_in_place_and_are_reported_as_mutations() -> None:
    for alias in [a for a in ops.ALL_ALIASES if a.inplace]:
        gm, inputs = _call_graph(alias, len(alias.params) - 1, inplace=False)
        declined: list[str] = []
        assert canonicalize(gm, decline=lambda node, reason: declined.append(reason)) == 0
        node = _call_node(gm)
        assert node.target == alias.target
        assert mutated_values(node) == [node.args[0]]
        assert declined and "visible to the caller" in declined[0]


def test_scaled_add_and_rounding_division_keep_their_own_spelling() -> None:
    class M(nn.Module):
        def forward(self, x, y):
            return torch.add(x, y, alpha=2), torch.div(x, y, rounding_mode="floor"), x.softmax(0, dtype=torch.float64)

    gm = capture(M(), (_t(3), _t(3, positive=True)))
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets == [torch.add, torch.div, "softmax"]


# -- in-place rewrites ------------------------------------------------------------------------


class _ConvThen(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("count", torch.zeros(1))
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.conv(x), x)


_X = torch.randn(2, 3, 6, 6)


def _capture_tail(tail) -> tuple[fx.GraphModule, nn.Module]:
    model = _ConvThen(tail).eval()
    gm = capture(model, (_X,))
    out, want = gm(_X.clone()), model(_X.clone())
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)
    return gm, model


def _targets(gm: fx.GraphModule) -> list[Any]:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


@pytest.mark.parametrize(
    "tail",
    [
        lambda m, y, x: F.relu(y, inplace=True),
        lambda m, y, x: torch.relu_(y),
        lambda m, y, x: y.relu_(),
        lambda m, y, x: m.act(y),
        lambda m, y, x: y.add_(1.0).mul_(2.0),
    ],
    ids=["F.relu(inplace)", "torch.relu_", "x.relu_()", "nn.ReLU(inplace)", "chain add_ mul_"],
)
def test_inplace_op_on_a_private_value_becomes_out_of_place(tail) -> None:
    gm, _ = _capture_tail(tail)
    assert all(not mutated_values(n) for n in gm.graph.nodes)
    assert all(not str(t).endswith("_") for t in _targets(gm))


@pytest.mark.parametrize(
    "tail, why",
    [
        (lambda m, y, x: (torch.relu_(y), y * 2), "read afterwards"),
        (lambda m, y, x: _view_then_write(y), "read afterwards"),
        (lambda m, y, x: torch.relu_(x), "visible to the caller"),
        (lambda m, y, x: x.view(-1).relu_(), "visible to the caller"),
        (lambda m, y, x: y + m.count.add_(1.0), "visible to the caller"),
    ],
    ids=["value read after the write", "view read after the write", "graph input", "view of graph input",
         "buffer"],
)
def test_inplace_op_whose_write_is_observable_stays_in_place(tail, why) -> None:
    gm, _ = _capture_tail(tail)
    kept = [n for n in gm.graph.nodes if mutated_values(n)]
    assert len(kept) == 1
    declined: list[str] = []
    assert canonicalize(gm, decline=lambda node, reason: declined.append(reason)) == 0
    assert why in declined[0]


def _view_then_write(y):
    view = y[0]
    torch.relu_(y)
    return view


# -- module lowering --------------------------------------------------------------------------

MODULE_SAMPLES: dict[type[nn.Module], tuple[nn.Module, tuple[int, ...]]] = {
    nn.Conv1d: (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 11)),
    nn.Conv2d: (nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), (2, 4, 7, 7)),
    nn.Conv3d: (nn.Conv3d(2, 3, 3, padding=1, bias=False), (1, 2, 4, 4, 4)),
    nn.ConvTranspose1d: (nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2), (2, 4, 5)),
    nn.ConvTranspose2d: (nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=4), (2, 4, 5, 5)),
    nn.ConvTranspose3d: (nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (1, 2, 3, 3, 3)),
    nn.Linear: (nn.Linear(5, 4), (3, 2, 5)),
    nn.BatchNorm1d: (nn.BatchNorm1d(3, affine=False), (4, 3, 5)),
    nn.BatchNorm2d: (nn.BatchNorm2d(3, eps=1e-3, momentum=None), (2, 3, 4, 4)),
    nn.BatchNorm3d: (nn.BatchNorm3d(2), (2, 2, 3, 3, 3)),
    nn.LayerNorm: (nn.LayerNorm([3, 4]), (2, 3, 4)),
    nn.GroupNorm: (nn.GroupNorm(2, 4, eps=1e-3), (2, 4, 3, 3)),
    nn.ReLU: (nn.ReLU(inplace=True), (3, 4)),
    nn.ReLU6: (nn.ReLU6(), (3, 4)),
    nn.Hardtanh: (nn.Hardtanh(-0.5, 2.0), (3, 4)),
    nn.LeakyReLU: (nn.LeakyReLU(0.2), (3, 4)),
    nn.ELU: (nn.ELU(0.5), (3, 4)),
    nn.GELU: (nn.GELU("tanh"), (3, 4)),
    nn.SiLU: (nn.SiLU(), (3, 4)),
    nn.Mish: (nn.Mish(), (3, 4)),
    nn.Sigmoid: (nn.Sigmoid(), (3, 4)),
    nn.Tanh: (nn.Tanh(), (3, 4)),
    nn.Hardsigmoid: (nn.Hardsigmoid(), (3, 4)),
    nn.Hardswish: (nn.Hardswish(), (3, 4)),
    nn.Softmax: (nn.Softmax(dim=1), (3, 4)),
    nn.LogSoftmax: (nn.LogSoftmax(dim=0), (3, 4)),
    nn.MaxPool1d: (nn.MaxPool1d(3, 2, 1, ceil_mode=True), (2, 3, 9)),
    nn.MaxPool2d: (nn.MaxPool2d(2), (2, 3, 8, 8)),
    nn.AvgPool1d: (nn.AvgPool1d(3, 2, count_include_pad=False, padding=1), (2, 3, 9)),
    nn.AvgPool2d: (nn.AvgPool2d(3, 2, 1, divisor_override=5), (2, 3, 9, 9)),
    nn.AdaptiveAvgPool1d: (nn.AdaptiveAvgPool1d(4), (2, 3, 9)),
    nn.AdaptiveAvgPool2d: (nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 9, 9)),
    nn.Flatten: (nn.Flatten(), (2, 3, 4)),
    nn.Dropout: (nn.Dropout(0.3), (3, 4)),
    nn.Dropout1d: (nn.Dropout1d(), (2, 3, 4)),
    nn.Dropout2d: (nn.Dropout2d(), (2, 3, 4, 4)),
    nn.Dropout3d: (nn.Dropout3d(), (2, 3, 2, 2, 2)),
    nn.AlphaDropout: (nn.AlphaDropout(), (3, 4)),
    nn.Identity: (nn.Identity(), (3, 4)),
}


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.0


def _randomized(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5 if "var" in name else torch.randn_like(buf))
    return module


def test_every_module_in_the_lowering_table_has_a_sample() -> None:
    assert set(MODULE_SAMPLES) == set(ops.MODULE_LOWERINGS)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("module_type", list(ops.MODULE_LOWERINGS), ids=lambda t: t.__name__)
def test_every_standard_layer_is_inlined_and_computes_exactly_what_it_computes(module_type, mode) -> None:
    module, shape = MODULE_SAMPLES[module_type]
    model = _Wrap(_randomized(module)).train(mode == "train")
    x = torch.randn(*shape)
    gm = capture(model, (x,))
    steps = ops.lowering_for(model.inner)
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(modules) == (1 if steps is None else 0)
    if steps is not None:
        # each op node carries the layer's path and the user's line
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is not operator.mul:
                assert node.meta["provenance"] == "inner"
                assert "return self.inner(x) * 1.0" in node.meta["stack_trace"]
    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    want = reference(x.clone())
    torch.manual_seed(3)
    got = gm(x.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (name, a), b in zip(gm.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # a training-mode BN updated the same statistics


def test_training_batch_norm_stays_a_training_batch_norm_that_counts_batches() -> None:
    model = _Wrap(nn.BatchNorm2d(3)).train()
    gm = capture(model, (torch.randn(2, 3, 4, 4),))
    bn = next(n for n in gm.graph.nodes if ops.is_op(n, "batch_norm"))
    assert ops.arg(bn, "training") is True
    assert [str(a.target) for a in mutated_values(bn)] == ["inner.running_mean", "inner.running_var"]
    counter = next(n for n in gm.graph.nodes if n.target == "add_")
    assert counter.args[0].target == "inner.num_batches_tracked"
    assert gm.get_submodule("inner").training and model.inner.num_batches_tracked.item() == 0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_padding_strings_become_numbers_where_symmetric() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding="same"), nn.Conv2d(2, 2, (2, 3), padding="same"),
                          nn.Conv2d(2, 2, 3, padding="valid"))
    gm = capture(model.eval(), (torch.randn(1, 2, 6, 6),))
    paddings = [ops.arg(n, "padding") for n in gm.graph.nodes if ops.is_op(n, "conv2d")]
    assert paddings == [(1, 1), "same", (0, 0)]


class _LoudConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1.0


def _opaque_models() -> dict[str, nn.Module]:
    hooked = nn.Conv2d(3, 3, 1)
    hooked.register_forward_hook(lambda m, i, o: o * 2)

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    param = nn.Conv2d(3, 3, 1)
    parametrize.register_parametrization(param, "weight", Double())
    with pytest.warns(FutureWarning):
        old_weight_norm = torch.nn.utils.weight_norm(nn.Conv2d(3, 3, 1))
    class CheckedNorm(nn.BatchNorm2d):  # torch's BatchNorm2d.forward branches on the input's rank
        pass

    return {"subclass whose forward does not trace": CheckedNorm(3), "forward hook": hooked, "parametrized": param,
            "weight_norm pre-hook": old_weight_norm, "softmax with dim=None": nn.Softmax()}


@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")
@pytest.mark.parametrize("name", list(_opaque_models()))
def test_layers_whose_forward_differs_from_the_table_stay_opaque_calls(name) -> None:
    model = _Wrap(_opaque_models()[name]).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = capture(model, (x,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner"]
    assert torch.equal(gm(x), model(x))


def test_a_subclassed_layer_whose_forward_traces_is_traced_through() -> None:
    """Only exact standard types are inlined from the table; a subclass computes what its own
    forward says (timm's BatchNormAct2d: the batch norm and its activation)."""
    class NormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           False, 0.0, self.eps))

    for inner in (_LoudConv(3, 3, 1), NormAct(3)):
        model = _Wrap(inner).eval()
        x = torch.randn(1, 3, 4, 4)
        gm = capture(model, (x,))
        assert not [n for n in gm.graph.nodes if n.op == "call_module"]
        assert {"conv2d", "batch_norm"} & {ops.op_name(n) for n in gm.graph.nodes}
        assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_module_called_twice_is_inlined_at_each_site_with_its_own_getters() -> None:
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    gm = capture(Twice().eval(), (torch.randn(1, 2, 5, 5),))
    assert len(graphopt.ir.graph.attr_users(gm)["conv.weight"]) == 2


def test_user_leaf_modules_by_type_and_name_stay_opaque_through_later_canonicalization() -> None:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    model = nn.Sequential(Block(), nn.Conv2d(2, 2, 1), nn.ReLU()).eval()
    x = torch.randn(1, 2, 3, 3)
    gm = capture(model, (x,), leaf_modules=(Block, "1"))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert canonicalize(gm) == 0
    assert torch.equal(gm(x), model(x))


def test_eval_dropout_and_identity_disappear_training_dropout_stays_canonical() -> None:
    class M(nn.Module):
        def __init__(self, training_dropout: bool):
            super().__init__()
            self.drop = nn.Dropout(0.25).train(training_dropout)
            self.same = nn.Identity()

        def forward(self, x):
            return F.dropout(self.same(self.drop(x)), 0.5, training=False) + 1

    x = torch.randn(4, 4)
    eval_gm = capture(M(False).eval(), (x,))
    assert _targets(eval_gm) == [operator.add]
    training = M(True).eval()
    training.drop.train()
    train_gm = capture(training, (x,))
    drop = next(n for n in train_gm.graph.nodes if ops.is_op(n, "dropout"))
    assert drop.args[1:] == (0.25, True, False)


# -- capture contract -------------------------------------------------------------------------


class _Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


def test_capture_never_mutates_the_model_its_inputs_or_the_global_rng() -> None:
    model = _Stateful().train()
    model.head.eval()
    model.conv.register_forward_hook(lambda m, i, o: o + 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    hooks = dict(model.conv._forward_hooks)
    x = torch.randn(2, 3, 6, 6)
    x_before = x.clone()
    rng = torch.get_rng_state()

    gm = capture(model, (x,))

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert dict(model.conv._forward_hooks) == hooks
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng)
    # the graph starts from the model's state and keeps each module's flag
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert gm.get_submodule("bn").training and not gm.get_submodule("head").training


def test_every_node_has_shape_and_provenance() -> None:
    gm = capture(_Stateful().eval(), (torch.randn(2, 3, 6, 6),))
    for node in gm.graph.nodes:
        assert "provenance" in node.meta, node
        if node.op != "output":
            assert "tensor_meta" in node.meta, node
    assert {n.meta["provenance"] for n in gm.graph.nodes if n.op == "call_function"} == {"conv", "bn", "head.0"}


def test_model_writing_into_its_input_is_captured_with_the_write_kept() -> None:
    class M(nn.Module):
        def forward(self, x):
            torch.relu_(x)
            return x * 2

    x = torch.randn(5)
    gm = capture(M(), (x,))
    assert [n.target for n in gm.graph.nodes if mutated_values(n)] == [torch.relu_]
    y = x.clone()
    assert torch.equal(gm(y), M()(x.clone())) and torch.equal(y, x.relu())


def test_concrete_args_fix_python_arguments() -> None:
    class M(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x + 1

    x = torch.randn(3)
    gm = capture(M(), (x,), concrete_args={"double": True})
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert torch.equal(gm(x), x * 2)


class _ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.flatten(F.relu(self.bn(self.conv(x))), 1)


def _op_sequence(gm: fx.GraphModule) -> list[str | None]:
    return [ops.op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def test_symbolic_and_export_give_the_same_canonical_graph() -> None:
    model = _ConvBnRelu().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    symbolic = capture(model, (x,))
    exported = capture(model, (x,), mode="export")
    assert _op_sequence(symbolic) == _op_sequence(exported) == ["conv2d", "batch_norm", "relu", "flatten"]
    sym_args = [n.args[1:] for n in symbolic.graph.nodes if ops.spec_of(n)]
    exp_args = [n.args[1:] for n in exported.graph.nodes if ops.spec_of(n)]
    assert [[str(a.target) if isinstance(a, fx.Node) else a for a in args] for args in sym_args] == \
           [[str(a.target) if isinstance(a, fx.Node) else a for a in args] for args in exp_args]
    assert torch.equal(symbolic(x), model(x)) and torch.equal(exported(x), model(x))


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:  # symbolic tracing cannot follow this branch
            return self.fc(x).sum(0)
        return self.fc(x)


def test_model_fx_cannot_trace_names_the_line_and_export_captures_it() -> None:
    model = _ShapeBranch().eval()
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError) as info:
        capture(model, (x,), mode="symbolic")
    message = str(info.value)
    assert "test_capture.py" in message and "if x.shape[0] > 1" in message
    assert "leaf_modules=" in message and "concrete_args=" in message and 'mode="export"' in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    gm = capture(model, (x,), mode="export")
    assert torch.equal(gm(x), model(x))
    assert "linear" in _op_sequence(gm)


def test_auto_mode_falls_back_to_export_and_says_why() -> None:
    from graphopt.ir import shapes
    from graphopt.capture import front_end

    model = _ShapeBranch().eval()
    gm = capture(model, (torch.randn(3, 4),))  # mode="auto"
    used = front_end(gm)
    assert used["front_end"] == "torch.export" and "if x.shape[0] > 1" in used["symbolic_failure"]
    for batch in (2, 5):  # the branch export took holds from batch 2 on, which it keeps dynamic
        x = torch.randn(batch, 4)
        assert torch.allclose(gm(x), model(x))
    assert shapes.describe(gm) == ["x: batch(>=2)x4"]
    with pytest.raises(InputError, match="outside the sizes"):  # batch 1 takes the other branch
        gm(torch.randn(1, 4))
    assert front_end(capture(_ConvBnRelu(), (torch.randn(1, 3, 4, 4),)))["front_end"] == "symbolic"


def test_a_model_neither_front_end_captures_gets_both_reasons() -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a branch on values: neither fx nor torch.export follows it
                return x * 2
            return x - 1

    with pytest.raises(CaptureError, match="neither front end") as info:
        capture(DataDependent(), (torch.randn(2, 3),))
    assert "symbolic tracing:" in str(info.value) and "torch.export:" in str(info.value)
    assert "torch.cond" in str(info.value)


class _Regions(nn.Module):
    """Attention kept in float32 under a disabled autocast (timm's EfficientViT), and a
    no-grad block: torch.export wraps both in higher-order ops on submodules."""

    def __init__(self, enabled: bool = False):
        super().__init__()
        self.proj, self.out, self.enabled = nn.Linear(8, 8), nn.Linear(8, 4), enabled

    def forward(self, x):
        q = self.proj(x)
        with torch.autocast("cpu", enabled=self.enabled):
            a = torch.softmax(q @ q.transpose(-1, -2), -1) @ q
        with torch.no_grad():
            b = a * 2
        return self.out(b + q)


def test_export_inlines_disabled_autocast_and_no_grad_regions() -> None:
    model, x = _Regions().eval(), torch.randn(2, 5, 8)
    gm = capture(model, (x,), mode="export")
    assert not any(n.op == "get_attr" and str(n.target).startswith("submod") for n in gm.graph.nodes)
    assert not any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    result = graphopt.optimize(gm, (x,), "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed


def test_export_refuses_an_enabled_autocast_region_with_the_way_out() -> None:
    with pytest.raises(CaptureError, match=r"torch.autocast\(enabled=True\).*mode=\"symbolic\""):
        capture(_Regions(enabled=True).eval(), (torch.randn(2, 5, 8),), mode="export")


def test_export_mode_refuses_symbolic_only_options() -> None:
    with pytest.raises(CaptureError, match="symbolic"):
        capture(_ConvBnRelu(), (torch.randn(1, 3, 4, 4),), mode="export", leaf_modules=(nn.Conv2d,))


@pytest.mark.parametrize(
    "model, inputs, error, fragment",
    [
        (lambda x: x, (torch.randn(2),), CaptureError, "nn.Module instance"),
        (nn.Linear, (torch.randn(2),), CaptureError, "nn.Module instance"),
        (nn.Linear(4, 2), [1, 2], InputError, "not a tensor"),
        (nn.Linear(4, 2), "x", InputError, "tuple of tensors"),
        (nn.Linear(4, 2), (torch.randn(3, 5),), InputError, r"float32\[3, 5\]"),
    ],
    ids=["function", "class", "ints", "string", "wrong shape"],
)
def test_bad_model_or_inputs_raise_graphopt_errors(model, inputs, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        capture(model, inputs)


def test_wrong_input_shape_names_the_failing_user_line() -> None:
    with pytest.raises(InputError) as info:
        capture(_ConvBnRelu().eval(), (torch.randn(1, 4, 5, 5),))
    assert "test_capture.py" in str(info.value) and "self.conv(x)" in str(info.value)
    assert "float32[1, 4, 5, 5]" in str(info.value)


def test_unknown_mode_and_hooks_on_the_model_itself_are_capture_errors() -> None:
    with pytest.raises(CaptureError, match="'symbolic', 'export'"):
        capture(_ConvBnRelu(), (torch.randn(1, 3, 4, 4),), mode="jit")
    model = _ConvBnRelu()
    model.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(CaptureError, match="hooks"):
        capture(model, (torch.randn(1, 3, 4, 4),))


def test_graph_that_does_not_reproduce_the_model_is_refused() -> None:
    class Counter(nn.Module):
        calls = 0

        def forward(self, x):
            Counter.calls += 1
            return x * Counter.calls  # Python state the trace bakes in

    with pytest.raises(CaptureError, match="does not reproduce"):
        capture(Counter(), (torch.randn(3),))


def test_aten_addmm_with_transposed_weight_becomes_linear() -> None:
    graph = fx.Graph()
    x, w, b = graph.placeholder("x"), graph.get_attr("w"), graph.get_attr("b")
    t = graph.call_function(torch.ops.aten.t.default, (w,))
    graph.output(graph.call_function(torch.ops.aten.addmm.default, (b, x, t)))
    root = nn.Module()
    root.w, root.b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    gm = fx.GraphModule(root, graph)
    x_value = torch.randn(2, 3)
    want = gm(x_value)
    assert canonicalize(gm) == 1
    assert _op_sequence(gm) == ["linear"]
    assert torch.equal(gm(x_value), want)


class _Conv1D(nn.Module):
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored (in, out), as addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size(0), x.size(1), -1)


class _TwoConv1D(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.a, self.b = _Conv1D(6, 6), _Conv1D(6, 6 if tied else 4)
        if tied:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_addmm_with_a_constant_weight_becomes_linear_reading_it_transposed(mode) -> None:
    torch.manual_seed(0)
    model, x = _TwoConv1D().eval(), torch.randn(2, 5, 6)
    gm = capture(model, (x,), mode=mode)
    linears = [n for n in gm.graph.nodes if ops.is_op(n, "linear")]
    assert len(linears) == 2 and not any("addmm" in str(n.target) for n in gm.graph.nodes)
    assert [str(ops.arg(n, "weight").target) for n in linears] == ["a.weight_t", "b.weight_t"]
    assert torch.equal(gm.get_parameter("b.weight_t"), model.b.weight.T)  # (out, in), as linear's weight
    assert "b.weight" not in gm.state_dict() and model.b.weight.shape == (6, 4)  # the model's own is untouched
    other = torch.randn(3, 5, 6)  # another batch
    torch.testing.assert_close(gm(other), model(other))
    assert canonicalize(gm) == 0  # idempotent


def test_addmm_whose_weight_is_read_elsewhere_stays_addmm_with_a_decline() -> None:
    torch.manual_seed(0)
    model, x = _TwoConv1D(tied=True).eval(), torch.randn(2, 5, 6)
    traced = fx.symbolic_trace(model)
    declined: list[str] = []
    assert canonicalize(traced, decline=lambda node, reason: declined.append(reason)) >= 0
    assert sum(n.target is torch.addmm for n in traced.graph.nodes) == 2
    assert len(declined) == 2 and all("a.weight is read elsewhere too" in reason for reason in declined)
    torch.testing.assert_close(traced(x), model(x))


def test_aten_convolution_becomes_conv_or_conv_transpose_by_its_flag() -> None:
    for transposed in (False, True):
        graph = fx.Graph()
        x, w = graph.placeholder("x"), graph.get_attr("w")
        graph.output(graph.call_function(torch.ops.aten.convolution.default,
                                         (x, w, None, [2, 2], [1, 1], [1, 1], transposed, [1, 1], 1)))
        root = nn.Module()
        root.w = nn.Parameter(torch.randn(3, 3, 3, 3))
        gm = fx.GraphModule(root, graph)
        x_value = torch.randn(1, 3, 5, 5)
        want = gm(x_value)
        assert canonicalize(gm) == 2  # the structural rewrite, then the value normalization
        assert _op_sequence(gm) == ["conv_transpose2d" if transposed else "conv2d"]
        assert torch.equal(gm(x_value), want)


def test_canonicalize_respects_the_rewrite_budget() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)).eval()
    gm = fx.symbolic_trace(model)
    allowed = iter([True, False, True])
    assert canonicalize(gm, may_rewrite=lambda where: next(allowed, False)) == 2
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1


def test_a_spelling_found_canonical_does_not_hide_one_that_differs_only_in_its_constants() -> None:
    """canonicalize settles each distinct call spelling once; constants that differ in type
    (``0`` and ``False``) or form (``1`` and ``(1, 1)``) make different spellings."""
    conv2d, dropout = ops.SPECS["conv2d"].target, ops.SPECS["dropout"].target
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.get_attr("weight")
    canonical_conv = graph.call_function(conv2d, (x, w, None, (1, 1), (0, 0), (1, 1), 1))
    int_conv = graph.call_function(conv2d, (canonical_conv, w, None, 1, 0, 1, 1))
    int_flag = graph.call_function(dropout, (int_conv, 0.5, 0, False))
    graph.output(graph.call_function(dropout, (int_flag, 0.5, False, False)))
    root = nn.Module()
    root.weight = nn.Parameter(torch.randn(2, 2, 1, 1))
    gm = fx.GraphModule(root, graph)

    assert canonicalize(gm) == 2  # the int conv spelled with tuples, the eval-mode dropout removed
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [conv2d, conv2d, dropout]
    assert calls[1].args[3:] == ((1, 1), (0, 0), (1, 1), 1)
    assert calls[2].args[1:] == (0.5, 0, False)
    assert canonicalize(gm) == 0


def test_canonicalize_pass_is_registered() -> None:
    if not hasattr(graphopt, "register_pass"):
        pytest.skip("pass infrastructure not landed yet")
    from graphopt.passes import canonicalize as module

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval())

    class Ctx:
        def may_rewrite(self, where):
            return True

        def decline(self, node, reason):
            pass

    assert graphopt.get_pass("canonicalize").fn is module.canonicalize_pass
    assert module.canonicalize_pass(gm, Ctx()) == 3  # two layers inlined, F.relu spelled torch.relu
    assert _op_sequence(gm) == ["linear", "relu"]


def test_postponed_annotations_become_types_so_the_module_scripts():
    # this file uses `from __future__ import annotations`: fx records forward's annotations as
    # strings and wrote them as aliases (`x : _torch_Tensor_`) that torch.jit.script cannot read
    class Annotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, scale: "NoSuchType") -> torch.Tensor:  # noqa: F821
            return self.conv(x) * scale

    x, s = torch.randn(1, 3, 8, 8), torch.randn(1)
    gm = graphopt.capture(Annotated(), (x, s))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.type for n in placeholders] == [torch.Tensor, None]  # unresolvable: dropped
    assert "_torch_Tensor_" not in gm.code
    torch.testing.assert_close(torch.jit.script(gm)(x, s), gm(x, s))
