"""How far a runtime's int8 kernels may put each output of a QDQ graph, derived from the graph.

A runtime runs the int8 ops of a quantize/dequantize (QDQ) graph on its own kernels, which
round their accumulators their own way: every value the graph quantizes (every
``quantize_per_tensor``) may come out one step of its scale away from the graph's. Such a
difference then travels to the outputs through whatever follows it, int8 ops and float ops
alike (a float head after an int8 body, a float ``hardswish`` between a dequantize and a
quantize), grown or shrunk by each op on the way.

:func:`output_error_bounds` follows every path to each output and returns, per output, the
root-sum-square of those steps as they arrive there (one-step differences at different places
are independent roundings, so they add in quadrature, not in the worst case). The gain of an op
is read from the graph:

- a conv or linear with constant weights: the largest L2 norm of one output's weights (how
  much one step on each input element moves an output, for independent steps);
- an elementwise activation: its Lipschitz constant (``sigmoid`` 1/4, ``hardswish`` 3/2, ...);
- ``a * b`` of two tensors: the other factor's largest magnitude, read from the
  quantization ranges and the weights on its paths (``x * hardsigmoid(...)`` in an SE block);
- averaging ops (``avg_pool2d``, ``adaptive_avg_pool2d``, ``mean``): 1 / sqrt(window);
- ops that move, select or pick the largest values (max pools, ``interpolate``, ``cat``,
  reshapes) and ``add``: 1.

A quantize of a graph input is exact in every runtime (QuantizeLinear rounds half to even, as
torch does) and adds no step.

An op outside these tables is assumed not to grow differences (gain 1) and is named in
:func:`assumed_ops`, so a reader can see where the bound is an assumption.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir.graph import tensor_meta
from graphopt.quantization import qdq
from graphopt.quantization.placement import op_key

#: ops that move, select, pick or average values: a difference on any input arrives at most as large
_NON_EXPANDING = frozenset({
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool1d", "avg_pool2d", "cat", "chunk",
    "clone", "contiguous", "dropout", "expand", "flatten", "getitem", "interpolate", "max_pool1d", "max_pool2d",
    "mean", "narrow", "permute", "repeat", "reshape", "select", "split", "squeeze", "stack", "t", "transpose",
    "unsqueeze", "view", "to", "float", "detach", "pad",
})
#: elementwise functions and their Lipschitz constants (largest slope)
_LIPSCHITZ = {
    "relu": 1.0, "relu6": 1.0, "hardtanh": 1.0, "clamp": 1.0, "leaky_relu": 1.0, "elu": 1.0, "tanh": 1.0,
    "sigmoid": 0.25, "hardsigmoid": 1.0 / 6.0, "hardswish": 1.5, "silu": 1.1, "gelu": 1.13, "mish": 1.09,
    "softmax": 1.0,
}
#: ops averaging windows of their input: independent differences shrink by sqrt(window)
_AVERAGING = frozenset({"adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "mean"})
_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                       "linear"})
_IGNORED_TARGETS = frozenset({qdq.CHOOSE_QPARAMS, qdq.QUANTIZE_DYNAMIC, operator.getitem})


def output_error_bounds(gm: fx.GraphModule) -> list[float]:
    """Per graph output (flattened in order), the root-sum-square of one quantization step at
    every ``quantize_per_tensor`` on its paths, carried to the output through the ops between
    (see the module docstring). 0.0 for an output no quantized value reaches."""
    return _Bounds(gm).outputs()


def assumed_ops(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes between a quantized value and an output whose gain is not known
    (assumed 1 in :func:`output_error_bounds`)."""
    bounds = _Bounds(gm)
    bounds.outputs()
    return bounds.assumed


class _Bounds:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.error: dict[fx.Node, float] = {}
        self.magnitude: dict[fx.Node, float] = {}
        self.assumed: list[str] = []

    def outputs(self) -> list[float]:
        result: list[float] = []
        for node in self.gm.graph.nodes:
            if node.op == "output":
                leaves = pytree.tree_leaves(node.args[0])
                result = [self.error.get(v, 0.0) if isinstance(v, fx.Node) else 0.0 for v in leaves]
            else:
                self.error[node], self.magnitude[node] = self.visit(node)
        return result

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.error]

    def visit(self, node: fx.Node) -> tuple[float, float]:
        if node.op == "placeholder":
            return 0.0, math.inf
        if node.op == "get_attr" or qdq.is_weight_dequantize(node) or node.target is qdq.QUANTIZE_PER_CHANNEL:
            value = qdq.constant_value(self.gm, node)
            return 0.0, _largest(value)
        inputs = self._inputs(node)
        errors = [self.error[a] for a in inputs]
        if qdq.is_quantize(node):
            qp = qdq.tensor_qparams(node)
            reach = max(abs(qp.qmin - qp.zero_point), abs(qp.qmax - qp.zero_point)) * qp.scale
            source = node.args[0]
            if source.op == "placeholder":  # QuantizeLinear of an input is exact in every runtime
                return 0.0, reach
            return math.hypot(self.error[source], qp.scale), reach
        if qdq.is_dequantize(node) or qdq.is_dynamic_dequantize(node):
            source = node.args[0]
            return self.error.get(source, 0.0), self.magnitude.get(source, math.inf)
        if node.op not in ("call_function", "call_method", "call_module") or node.target in _IGNORED_TARGETS:
            return max(errors, default=0.0), max((self.magnitude[a] for a in inputs), default=math.inf)
        if not any(errors):
            return 0.0, self._magnitude(node, inputs)
        key = op_key(node) or getattr(node.target, "__name__", str(node.target))
        if key in _WEIGHTED:
            return self.weighted(node, inputs)
        if key in ("add", "sub"):
            return math.hypot(*errors), sum(self.magnitude[a] for a in inputs) + _scalar_sum(node)
        if key in ("mul", "truediv"):
            return self.product(node, key, inputs)
        if key in _AVERAGING:
            return _averaged(node, inputs[0]) * max(errors), self._magnitude(node, inputs)
        if key in _LIPSCHITZ:
            return _LIPSCHITZ[key] * max(errors), self._magnitude(node, inputs)
        if key not in _NON_EXPANDING:
            self.assumed.append(f"{node.name} ({key})")
        return max(errors), self._magnitude(node, inputs)

    def _magnitude(self, node: fx.Node, inputs: list[fx.Node]) -> float:
        key = op_key(node)
        if key in ("sigmoid", "hardsigmoid", "softmax", "tanh"):
            return 1.0
        if key in _WEIGHTED:
            return self.weighted(node, inputs)[1]
        largest = max((self.magnitude[a] for a in inputs), default=math.inf)
        return largest + (0.375 if key in ("hardswish", "silu", "gelu", "mish") else 0.0)

    def weighted(self, node: fx.Node, inputs: list[fx.Node]) -> tuple[float, float]:
        x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        weight = qdq.constant_value(self.gm, w)
        error_in = self.error.get(x, 0.0) if isinstance(x, fx.Node) else 0.0
        mag_in = self.magnitude.get(x, math.inf) if isinstance(x, fx.Node) else math.inf
        if weight is None or weight.dim() < 2:
            self.assumed.append(f"{node.name} (weights not constant)")
            return max(self.error[a] for a in inputs), math.inf
        transposed = (op_key(node) or "").startswith("conv_transpose")
        rows = (weight.transpose(0, 1) if transposed else weight).detach().double().flatten(1)
        l2, l1 = float(rows.norm(dim=1).max()), float(rows.abs().sum(1).max())
        bias = _largest(qdq.constant_value(self.gm, b)) if isinstance(b, fx.Node) else 0.0
        return l2 * error_in, (l1 * mag_in + bias) if mag_in != math.inf else math.inf

    def product(self, node: fx.Node, key: str, inputs: list[fx.Node]) -> tuple[float, float]:
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):  # times or over a number
            factor = b if isinstance(a, fx.Node) else a
            factor = abs(float(factor)) if isinstance(factor, (int, float)) else 1.0
            if key == "truediv":
                factor = 1.0 / factor if factor else math.inf
            (x,) = inputs
            return factor * self.error[x], factor * self.magnitude[x]
        if key == "truediv":
            self.assumed.append(f"{node.name} (division by a tensor)")
            return max(self.error[a], self.error[b]), math.inf
        terms = [self._times(node, self.magnitude[b], self.error[a]), self._times(node, self.magnitude[a], self.error[b])]
        return math.hypot(*terms), self.magnitude[a] * self.magnitude[b]

    def _times(self, node: fx.Node, magnitude: float, error: float) -> float:
        if error == 0.0:
            return 0.0
        if math.isinf(magnitude):  # a factor with no range on its paths (a float input): gain 1
            self.assumed.append(f"{node.name} (factor of unknown range)")
            return error
        return magnitude * error


def _largest(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if not value.numel():
            return 0.0
        if not (value.is_floating_point() or value.is_complex()):
            value = value.to(torch.float64)  # masks (bool) and indices (int) bound their products too
        return float(value.detach().abs().max())
    return math.inf


def _scalar_sum(node: fx.Node) -> float:
    return sum(abs(float(a)) for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool))


def _averaged(node: fx.Node, source: fx.Node) -> float:
    """sqrt(outputs / inputs) of an averaging op: 1 / sqrt(window) for independent differences
    (1 when the shapes are not recorded)."""
    out, inp = tensor_meta(node), tensor_meta(source)
    if out is None or inp is None:
        return 1.0
    n_out, n_in = math.prod(out.shape), math.prod(inp.shape)
    return math.sqrt(n_out / n_in) if 0 < n_out <= n_in else 1.0


def simulated_spread(gm: fx.GraphModule, batches: list[tuple[Any, ...]], seed: int = 0) -> float:
    """The largest output difference when every value the graph quantizes (graph inputs aside)
    comes out a random step in {-1, 0, +1} away, run on ``batches``.

    For graphs where :func:`assumed_ops` is not empty: a layer norm or a division by a norm
    on the way to an output (ConvNeXt's head, ConvNeXt-V2's response normalization) scales
    differences by the inverse of its input's spread, which the graph alone does not tell.
    Running the graph with every int8 value nudged measures what those ops do to one-step
    differences on real values."""
    generator = torch.Generator().manual_seed(seed)

    class Nudged(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if qdq.is_quantize(n) and n.args[0].op != "placeholder":
                qp = qdq.tensor_qparams(n)
                step = torch.randint(-1, 2, out.shape, generator=generator, dtype=torch.int32)
                out = (out.to(torch.int32) + step).clamp(qp.qmin, qp.qmax).to(out.dtype)
            return out

    spread = 0.0
    with torch.no_grad():
        for batch in batches:
            plain = [t for t in pytree.tree_leaves(gm(*batch)) if isinstance(t, torch.Tensor)]
            nudged = [t for t in pytree.tree_leaves(Nudged(gm).run(*batch)) if isinstance(t, torch.Tensor)]
            for a, b in zip(plain, nudged):
                if a.is_floating_point() and a.numel():
                    spread = max(spread, float((a - b).abs().max()))
    return spread
