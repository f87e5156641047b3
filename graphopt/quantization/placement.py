"""Where quantize/dequantize pairs go: a plan computed from a backend configuration.

The plan is a set of *units* (one int8 kernel each: a conv with its fused activation, an add,
a concatenation, a pooling...) and the *values* that are stored as integers, each with a
*group* of values that must share one set of parameters. Rules (see ``configs``):

- A weighted, binary or cat unit asks for its activation inputs to be quantized and quantizes
  its output. An output is read dequantized by every consumer ("output-quantized"); an input
  whose producer is a float op is quantized for the int8 consumers only, and float consumers
  keep reading the float value.
- A conv/linear marked by ``fuse-conv-bn-relu`` (``meta["fusion_unit"]``) is one unit with its
  activation: nothing is inserted between them, the output is observed after the activation.
  The same holds for ``add``/``mul`` whose only user is a ``binary_activations`` op.
- Shared and fixed-parameter ops are int8 only when their input is output-quantized: they join
  their input's group (shared) or take the fixed parameters.
- An add, mul, cat or fixed-range op whose output no int8 unit reads stays float (see
  :func:`plan_quantization`): rounding it would buy nothing, and before a layer norm it costs.
- Observation is per value, i.e. per call site: a module called twice (two conv nodes reading
  one weight) gets separate activation parameters at each site.

A *dynamic* plan (``quantize{mode=dynamic}``) holds only the linear layers (:data:`DYNAMIC_OPS`):
each unit's activation input is quantized at run time for that consumer alone, its output stays
float, so there are no groups to share and nothing to observe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.ir import ops
from graphopt.ir.graph import get_attr_value, tensor_meta
from graphopt.quantization.configs import BackendConfig, FixedQParams

UnitKind = Literal["weighted", "binary", "cat", "shared", "fixed"]
_TRANSPOSED = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
#: ops quantized by a dynamic plan: the runtimes have dynamic int8 kernels for matrix products
#: only (ONNX Runtime's DynamicQuantizeMatMul, torch's quantized::linear_dynamic, XNNPACK's
#: dynamically quantized fully-connected)
DYNAMIC_OPS = frozenset({"linear"})


#: functions outside the canonical op table that configurations name
_OTHER_FUNCTIONS = {F.interpolate: "interpolate"}


def op_key(node: fx.Node) -> str | None:
    """The name configurations use for ``node``'s op: canonical name, else tensor-method name.
    The in-place activation of a fusion unit goes by its canonical name (``"relu"``)."""
    if node.op == "call_function" and node.target in _OTHER_FUNCTIONS:
        return _OTHER_FUNCTIONS[node.target]
    if node.op == "call_function":
        return ops.op_name(node)
    if node.op == "call_method":
        return str(node.target)
    return None


def is_transposed_conv(node: fx.Node) -> bool:
    return ops.is_op(node, *_TRANSPOSED)


def weight_axis(node: fx.Node) -> int:
    """The output-channel axis of a weighted op's weight: 1 for transposed convs, else 0."""
    return 1 if is_transposed_conv(node) else 0


@dataclass
class Unit:
    """One int8 kernel: ``node`` computes, ``output`` is the value stored as integers (the fused
    activation when there is one), ``inputs`` are the activation inputs it reads as integers."""

    kind: UnitKind
    node: fx.Node
    output: fx.Node
    inputs: list[fx.Node]
    activation: fx.Node | None = None

    @property
    def op(self) -> str:
        return op_key(self.node) or str(self.node.target)


@dataclass
class QuantizedValue:
    """A value stored as integers, read dequantized by ``consumers`` (all of them when
    ``all_consumers``, the case for unit outputs)."""

    node: fx.Node
    all_consumers: bool
    consumers: list[fx.Node] = field(default_factory=list)

    def readers(self) -> list[fx.Node]:
        return list(self.node.users) if self.all_consumers else list(self.consumers)


class Groups:
    """Union-find over values: values in one group share quantization parameters."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.fixed: dict[fx.Node, FixedQParams] = {}

    def add(self, value: fx.Node, fixed: FixedQParams | None = None) -> None:
        self.parent.setdefault(value, value)
        if fixed is not None:
            self.fixed[value] = fixed

    def find(self, value: fx.Node) -> fx.Node:
        root = value
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[value] is not root:
            self.parent[value], value = root, self.parent[value]
        return root

    def fixed_of(self, value: fx.Node) -> FixedQParams | None:
        return self.fixed.get(self.find(value))

    def union(self, a: fx.Node, b: fx.Node) -> bool:
        """Merge the groups of ``a`` and ``b``; refused (False) when both are fixed differently."""
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return True
        fa, fb = self.fixed.get(ra), self.fixed.get(rb)
        if fa is not None and fb is not None and fa != fb:
            return False
        self.parent[rb] = ra
        if fb is not None:
            self.fixed[ra] = fb
        return True

    def roots(self) -> dict[fx.Node, list[fx.Node]]:
        out: dict[fx.Node, list[fx.Node]] = {}
        for value in self.parent:
            out.setdefault(self.find(value), []).append(value)
        return out


@dataclass
class Plan:
    config: BackendConfig
    units: list[Unit] = field(default_factory=list)
    values: dict[fx.Node, QuantizedValue] = field(default_factory=dict)
    groups: Groups = field(default_factory=Groups)
    #: activations quantized at run time (see the module docstring)
    dynamic: bool = False


#: why a node is left in float (None: no objection); called before each unit is planned
Veto = Callable[[Unit], str | None]
#: records a candidate left in float with the reason
Decline = Callable[[fx.Node, str], None]


def _is_float_tensor(value: object) -> bool:
    if not isinstance(value, fx.Node):
        return False
    tm = tensor_meta(value)
    return tm is not None and tm.dtype == torch.float32


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class _Planner:
    def __init__(self, gm: fx.GraphModule, config: BackendConfig, veto: Veto, decline: Decline, dynamic: bool = False):
        self.gm, self.config, self.veto, self.decline = gm, config, veto, decline
        self.plan = Plan(config, dynamic=dynamic)
        self.absorbed: set[fx.Node] = set()
        self.by_name = {n.name: n for n in gm.graph.nodes}

    # ---------------------------------------------------------------- values

    def demand(self, value: fx.Node, consumer: fx.Node) -> None:
        """``consumer`` reads ``value`` as integers."""
        qv = self.plan.values.get(value)
        if qv is None:
            qv = self.plan.values[value] = QuantizedValue(value, all_consumers=False)
            self.plan.groups.add(value)
        if not qv.all_consumers and consumer not in qv.consumers:
            qv.consumers.append(consumer)

    def produce(self, value: fx.Node, fixed: FixedQParams | None = None) -> None:
        """``value`` is a unit output: stored as integers, every consumer reads it dequantized."""
        self.plan.values[value] = QuantizedValue(value, all_consumers=True)
        self.plan.groups.add(value, fixed)

    def output_quantized(self, value: object) -> bool:
        qv = self.plan.values.get(value) if isinstance(value, fx.Node) else None
        return qv is not None and qv.all_consumers

    def accept(self, unit: Unit) -> bool:
        reason = self.veto(unit)
        if reason is not None:
            self.decline(unit.node, reason)
            return False
        self.plan.units.append(unit)
        if unit.activation is not None:
            self.absorbed.add(unit.activation)
        return True

    # ---------------------------------------------------------------- units

    def weighted(self, node: fx.Node) -> None:
        x, w = ops.arg(node, "input"), ops.arg(node, "weight")
        if not _is_float_tensor(x):
            self.decline(node, "activation input is not a float32 tensor")
            return
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            self.decline(node, "weight is not a constant attribute (already quantized, or computed)")
            return
        weight = get_attr_value(self.gm, w)
        if not (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32):
            self.decline(node, f"weight {w.target} is not a float32 tensor")
            return
        if self.plan.dynamic:
            if self.accept(Unit("weighted", node, node, [x])):
                self.demand(x, node)
            return
        activation = self._fused_activation(node)
        unit = Unit("weighted", node, activation or node, [x], activation)
        if self.accept(unit):
            self.demand(x, node)
            self.produce(unit.output)

    def _fused_activation(self, node: fx.Node) -> fx.Node | None:
        info = node.meta.get("fusion_unit")
        if not info:
            user = _single_user(node)
            if user is not None and op_key(user) in ("relu", "hardtanh"):
                self.decline(user, f"not fused with {node.name}: run fuse-conv-bn-relu before quantize, "
                                   "or the activation gets the conv's wider range")
            return None
        act = self.by_name.get(str(info.get("activation")))
        if act is None or _single_user(node) is not act:
            return None  # the graph changed since fusion marked it; observe the conv alone
        return act

    def binary(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        if not (_is_float_tensor(a) and _is_float_tensor(b)):
            return  # x + scalar and integer arithmetic stay float
        user = _single_user(node)
        activation = user if user is not None and op_key(user) in self.config.binary_activations else None
        unit = Unit("binary", node, activation or node, [a, b], activation)
        if self.accept(unit):
            self.demand(a, node)
            self.demand(b, node)
            self.produce(unit.output)

    def cat(self, node: fx.Node) -> None:
        tensors = ops.arg(node, "tensors")
        if not (isinstance(tensors, (list, tuple)) and tensors and all(_is_float_tensor(t) for t in tensors)):
            return
        unit = Unit("cat", node, node, list(tensors))
        if not self.accept(unit):
            return
        for t in tensors:
            self.demand(t, node)
        self.produce(node)
        if self.config.cat_shares_qparams:
            for t in tensors:
                if self.plan.groups.fixed_of(t) is not None or not self.plan.groups.union(node, t):
                    self.decline(node, f"input {t.name} has fixed parameters; it is requantized, not shared")

    def propagating(self, node: fx.Node, key: str) -> None:
        x = node.args[0] if node.args else None
        if not (self.output_quantized(x) and _is_float_tensor(node)):
            return
        fixed = self.config.fixed_ops.get(key)
        unit = Unit("fixed" if fixed else "shared", node, node, [x])
        if not self.accept(unit):
            return
        self.produce(node, fixed)
        if fixed is None:
            self.plan.groups.union(x, node)

    def run(self) -> Plan:
        config = self.config
        for node in self.gm.graph.nodes:
            if node in self.absorbed:
                continue
            key = op_key(node)
            if key is None:
                continue
            if self.plan.dynamic:
                if key in DYNAMIC_OPS and key in config.weighted_ops and ops.spec_of(node) is not None:
                    self.weighted(node)
            elif key in config.weighted_ops and ops.spec_of(node) is not None:
                self.weighted(node)
            elif key in config.binary_ops and len(node.args) >= 2:
                self.binary(node)
            elif key == "cat":
                self.cat(node)
            elif key in config.shared_ops or key in config.fixed_ops:
                self.propagating(node, key)
        return self.plan


def plan_quantization(gm: fx.GraphModule, config: BackendConfig, veto: Veto, decline: Decline) -> Plan:
    """The placement plan of ``gm`` under ``config`` (see the module docstring).

    ``veto(unit)`` returns why a candidate unit stays float (skip list, rewrite budget, worst
    layers kept float) or None; ``decline(node, reason)`` records candidates left float.

    An add, mul, cat or fixed-range op (sigmoid) stays float when no int8 unit reads its output:
    every reader would dequantize it at once, so its own output rounding would buy nothing. A
    transformer's residual adds, read by layer norms, are the common case: rounding the residual
    stream per tensor drowns a small token (ViT's class token) that the norm scales back up.
    Shared-parameter ops (pooling, reshapes, interpolate) add no rounding of their own and stay
    int8. Planning repeats until no such unit is left, since keeping one float can leave its
    producers without int8 readers in turn.
    """
    idle: dict[fx.Node, str] = {}

    def vetoed(unit: Unit) -> str | None:
        return idle.get(unit.node) or veto(unit)

    while True:
        declined: list[tuple[fx.Node, str]] = []
        plan = _Planner(gm, config, vetoed, lambda node, why: declined.append((node, why))).run()
        read_as_int8 = {value for unit in plan.units for value in unit.inputs}
        new = {unit.node: _idle_reason(unit) for unit in plan.units
               if unit.kind in _ROUNDING and unit.output not in read_as_int8}
        if not new:
            for node, why in declined:
                decline(node, why)
            return plan
        idle.update(new)


#: units without weights whose output is rounded to a range of its own
_ROUNDING = ("binary", "cat", "fixed")


def _idle_reason(unit: Unit) -> str:
    readers = ", ".join(sorted(n.name for n in unit.output.users)[:3]) or "none"
    return f"kept float: no int8 op reads its output (readers: {readers}), so int8 would only add rounding"


def plan_dynamic_quantization(gm: fx.GraphModule, config: BackendConfig, veto: Veto, decline: Decline) -> Plan:
    """The dynamic plan of ``gm``: its linear layers, inputs quantized at run time (see the
    module docstring); ``veto`` and ``decline`` as for :func:`plan_quantization`."""
    return _Planner(gm, config, veto, decline, dynamic=True).run()
