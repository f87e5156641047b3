"""``channels-last``: store 2-D convolution weights channels-last, so convs run in NHWC.

On CPUs PyTorch's convolution picks its memory format from its operands: when the weight is
channels-last (``(Cout, kh, kw, Cin)`` in memory) the conv runs oneDNN's NHWC kernels and
returns an NHWC tensor, converting an NCHW input on the way in. Elementwise ops, pooling,
adds and the in-place activations of fusion units keep that layout, so after the first conv a
CNN stays NHWC without further copies. NCHW convs instead reorder activations (and 1x1
convs fall back to an im2col GEMM) at every layer: on ResNet-18 and MobileNetV2 at 224x224,
1 thread, the NHWC model ran 16-20% faster in eager PyTorch. NHWC is also the layout mobile
kernels (XNNPACK) use.

Values never change: a strided tensor holds the same elements whatever its strides, and every
torch op computes on the logical elements. What can change is whether an op that depends on
strides works, and which strides the caller gets back:

- ``view`` (and friends) fails on a tensor whose strides it cannot reinterpret. The pass runs
  the graph on the example inputs after converting and, where a node fails and one of its
  tensor inputs changed strides, puts ``contiguous()`` (a *layout guard*) in front of that
  input, then runs again. Whether a view of NHWC strides works does not depend on the sizes
  as long as every dim is larger than one; a size-one dim accepts any stride, so a view that
  works on a batch of one (or a 1x1 map) could fail on a larger one. A batch of one is
  therefore also run as a batch of two, and views of re-strided tensors with another
  size-one dim are guarded without trying.
- Opaque module calls, functions outside torch and tensor methods that read strides or memory
  directly (``stride``, ``data_ptr``, ``numpy``, ``as_strided``, ...) get a guard on every
  input whose strides changed, without waiting for them to fail. So does group norm, whose
  NHWC kernel in PyTorch is far less precise on near-constant groups.
- Graph outputs whose strides changed get a guard back to the memory format they had, so the
  caller sees the tensors the model returned.

A weight is converted only when every reader of it is the weight of a batched (4-D input)
float conv2d and the graph never writes it; shared weights are converted once. The new
weight replaces the old attribute under the same name (the same values, so a checkpoint of the
graph still loads). Unless the converted convs outnumber the guards needed, the layout change
would cost about as many copies as it saves (one conv feeding an output, say); the pass then
undoes everything and records why. Guards carry ``meta["layout_guard"]``, so that passes with
rules about graph outputs can look through them. A second run
finds nothing to convert and needs no new guards, so the pass is idempotent.

Rewrites counted: one per converted weight and one per guard. Figures: ``weights_converted``,
``layout_guards``.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

import graphopt
from graphopt.ir import ops
from graphopt.ir.graph import set_tensor
from graphopt.ir.graph import as_input_tuple, get_attr_value, preserved_state, tensor_meta
from graphopt.ir.purity import may_alias_input, mutated_values

#: tensor methods whose result depends on strides or that hand memory to outside code
_STRIDE_READERS = frozenset({
    "stride", "data_ptr", "storage", "untyped_storage", "storage_offset", "numpy", "is_contiguous",
    "as_strided", "as_strided_", "set_",
})
#: methods that reinterpret strides: they work or fail by the strides they get (see _fragile_view)
_VIEWS = frozenset({"view", "view_as", "_unsafe_view"})
_STRIDE_READING_FUNCTIONS = (torch.as_strided,)


@graphopt.register_pass("channels-last", contract=graphopt.Exact())
def channels_last(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    """Store conv2d weights channels-last (convs then run NHWC); guard stride-sensitive readers."""
    targets = _convertible_weights(gm, ctx)
    if not targets:
        ctx.record("weights_converted", 0)
        ctx.record("layout_guards", 0)
        return 0
    granted = ctx.rewrites_granted - len(targets)
    trials = _baselines(gm, as_input_tuple(ctx.example_inputs))
    reason = None if trials else "the graph does not run on its example inputs"
    original = {t: get_attr_value(gm, t) for t in targets}
    guards: list[fx.Node] = []
    if reason is None:
        for target, weight in original.items():
            _replace_attr(gm, target, _channels_last_copy(weight))
        try:
            _guard_until_runs(gm, trials, guards)
        except _Undo as undo:
            reason = str(undo)
        else:
            if len(guards) >= len(targets):
                reason = (f"{len(guards)} layout copies would be needed for {len(targets)} converted conv "
                          "weights")
        if reason is not None:
            _undo(gm, original, guards)
    if reason is not None:
        ctx.note(f"channels-last not applied: {reason}")
        ctx.rewrites_granted = granted  # nothing of what the budget granted was kept
        ctx.record("weights_converted", 0)
        ctx.record("layout_guards", 0)
        return 0
    ctx.record("weights_converted", len(targets))
    ctx.record("layout_guards", len(guards))
    return len(targets) + len(guards)


class _Undo(Exception):
    """The converted graph fails for a reason a layout guard cannot fix."""


# --------------------------------------------------------------------------- candidates


def _convertible_weights(gm: fx.GraphModule, ctx: graphopt.PassContext) -> list[str]:
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).append(node)
    written = {str(v.target) for n in gm.graph.nodes for v in mutated_values(n) if v.op == "get_attr"}
    out = []
    for target, getters in readers.items():
        uses = [u for g in getters for u in g.users]
        if not uses or not all(ops.is_op(u, "conv2d") and ops.arg(u, "weight") in getters for u in uses):
            continue
        reason = _why_not(gm, target, getters, uses, written)
        if reason is None:
            if ctx.may_rewrite(f"store {target} channels-last"):
                out.append(target)
        elif reason:
            ctx.decline(uses[0], reason)
    return out


def _why_not(gm: fx.GraphModule, target: str, getters: list[fx.Node], convs: list[fx.Node],
             written: set[str]) -> str | None:
    """Why the weight ``target`` of ``convs`` stays as it is ('' for: nothing to do), or None."""
    weight = get_attr_value(gm, target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        return f"{target} is not a 4-D float tensor"
    if _is_channels_last(weight):
        return ""
    if target in written:
        return f"{target} is written by the graph"
    for conv in convs:
        if any(ops.arg(conv, name) in getters for name in ("input", "bias")):
            return f"{target} is also read as the input or bias of {conv.name}"
        meta = tensor_meta(ops.arg(conv, "input")) if isinstance(ops.arg(conv, "input"), fx.Node) else None
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
            return f"{conv.name} is not a batched conv (input is not 4-D), which has no NHWC kernel"
    return None


def _channels_last_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with explicit NHWC strides. ``contiguous(memory_format=channels_last)`` is not
    enough: a 1x1 or depthwise kernel (a size-one dim) that is contiguous already counts as
    channels-last and comes back unchanged, and convs, which look at the strides themselves,
    then still run NCHW."""
    return torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)


def _is_channels_last(weight: torch.Tensor) -> bool:
    return weight.stride() == torch.empty_like(weight, memory_format=torch.channels_last).stride()


def _replace_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Put ``value`` in the slot of ``target``; a parameter stays a parameter, trainable as before."""
    old = get_attr_value(gm, target)
    if isinstance(old, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    set_tensor(gm, target, value)


def _undo(gm: fx.GraphModule, original: dict[str, torch.Tensor], guards: list[fx.Node]) -> None:
    for guard in reversed(guards):
        guard.replace_all_uses_with(guard.args[0])
        gm.graph.erase_node(guard)
    guards.clear()
    for target, weight in original.items():
        _replace_attr(gm, target, weight)


# --------------------------------------------------------------------------- guards


Strides = dict[fx.Node, tuple[int, ...]]


def _baselines(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Strides]]:
    """The input sets to check the converted graph on, each with the strides every node had
    before the change: the example inputs and, when their batch is one, a batch of two (see
    :meth:`_StrideRecorder._fragile_view`). Empty if the unchanged graph does not run on the
    example inputs; the batch of two is left out if the graph does not take it."""
    sets = [inputs]
    doubled = _doubled_batch(inputs)
    if doubled is not None:
        sets.append(doubled)
    out = []
    for values in sets:
        recorder = _StrideRecorder(gm, {}, batch_checked=False)
        if _run(recorder, values) is not None:
            break
        out.append((values, recorder.strides))
    return out


def _doubled_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return None
    return tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) else t for t in inputs)


def _guard_until_runs(gm: fx.GraphModule, trials: list[tuple[tuple[Any, ...], Strides]],
                      guards: list[fx.Node]) -> None:
    batch_checked = len(trials) > 1
    for inputs, before in trials:
        for _ in range(len(gm.graph.nodes) + 1):
            recorder = _StrideRecorder(gm, before, batch_checked)
            failed = _run(recorder, inputs)
            if failed is None:
                output = next(n for n in gm.graph.nodes if n.op == "output")
                for value in recorder.changed_outputs:
                    guards.append(_insert_guard(gm, value, output, recorder.output_formats[value]))
                break
            if not failed.changed:
                raise _Undo(f"{failed.node.name} fails after the change "
                            f"({type(failed.cause).__name__}: {failed.cause})")
            if _written_through(gm, failed.node):
                raise _Undo(f"{failed.node.name} needs a copy of its input, but its result is a view "
                            "that the graph writes through")
            for value in failed.changed:
                guards.append(_insert_guard(gm, value, failed.node))
        else:
            raise _Undo("layout guards did not converge")


def _run(recorder: "_StrideRecorder", inputs: tuple[Any, ...]) -> "_NodeFailed | None":
    fresh = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    try:
        with torch.no_grad(), preserved_state(recorder.module):
            recorder.run(*fresh)
    except _NodeFailed as failed:
        return failed
    return None


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, changed: list[fx.Node], cause: BaseException):
        super().__init__(str(cause))
        self.node, self.changed, self.cause = node, changed, cause


class _StrideRecorder(fx.Interpreter):
    """Runs the graph, comparing each tensor's strides with those recorded before the change."""

    def __init__(self, gm: fx.GraphModule, before: dict[fx.Node, Any], batch_checked: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.before = before
        self.batch_checked = batch_checked
        self.strides: dict[fx.Node, tuple[int, ...]] = {}
        self.changed_outputs: list[fx.Node] = []
        self.output_formats: dict[fx.Node, torch.memory_format] = {}

    def _changed_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes
                if a in self.strides and self.before.get(a) is not None and self.strides[a] != self.before[a]]

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "output":
            self._check_outputs(node)
            return super().run_node(node)
        changed = self._changed_inputs(node)
        if changed and (_reads_strides(node) or self._fragile_view(node, changed)):
            raise _NodeFailed(node, changed, RuntimeError("reads strides"))
        try:
            value = super().run_node(node)
        except Exception as exc:  # noqa: BLE001 - any failure is examined by the caller
            raise _NodeFailed(node, changed, exc) from exc
        if isinstance(value, torch.Tensor) and value.layout is torch.strided:
            self.strides[node] = tuple(value.stride())
        return value

    def _fragile_view(self, node: fx.Node, changed: list[fx.Node]) -> bool:
        """A view of a re-strided tensor with a size-one dim: it may work here only because a
        size-one dim accepts any stride, and fail on inputs where that dim is larger (a 1x1
        feature map here, larger at run time). With every dim larger than one, whether a view
        of NHWC strides works does not depend on the sizes, so the run decides. A batch of one
        is checked by running a batch of two as well, so dim 0 counts only when that run was
        not possible."""
        if not (node.op == "call_method" and node.target in _VIEWS):
            return False
        first = 1 if self.batch_checked else 0
        return any(isinstance(self.env.get(a), torch.Tensor) and 1 in self.env[a].shape[first:] for a in changed)

    def _check_outputs(self, output: fx.Node) -> None:
        """Outputs whose strides changed, with the memory format they had (outputs that had
        none of the two standard formats keep their new strides: no copy restores those)."""
        for value in output.all_input_nodes:
            if value not in self.strides or self.before.get(value) is None \
                    or self.strides[value] == self.before[value]:
                continue
            fmt = _format_of_strides(self.env[value], self.before[value])
            if fmt is not None:
                self.changed_outputs.append(value)
                self.output_formats[value] = fmt


#: ops whose NHWC kernels are less precise: PyTorch's CPU group norm on a channels-last input
#: computes the variance in one pass, 0.7-1.2e-2 from float64 on groups near a constant where the
#: NCHW kernel is 3e-5 away (found by generated models, whose lowering to ONNX then failed)
_ROW_MAJOR_INPUTS = ("group_norm",)


def _reads_strides(node: fx.Node) -> bool:
    if ops.is_op(node, *_ROW_MAJOR_INPUTS):
        return True
    if node.op == "call_module":
        return True  # opaque: whatever it does with strides is out of sight
    if node.op == "call_method":
        return node.target in _STRIDE_READERS
    if node.op == "call_function":
        if node.target in _STRIDE_READING_FUNCTIONS:
            return True
        module = getattr(node.target, "__module__", None) or ""
        return not (ops.spec_of(node) is not None or module.startswith("torch") or node.target in _BUILTINS)
    return False


_BUILTINS = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv,
                       operator.floordiv, operator.neg, operator.matmul, getattr})


def _insert_guard(gm: fx.GraphModule, value: fx.Node, reader: fx.Node,
                  memory_format: torch.memory_format = torch.contiguous_format) -> fx.Node:
    """``value.contiguous(memory_format=...)``, read by ``reader`` in place of ``value``.

    The copy is made right before the reader, not after ``value``: an in-place op between the
    two (``v = conv(x); v.relu_(); return v``) must be in the copy too."""
    with gm.graph.inserting_before(reader):
        kwargs = {} if memory_format is torch.contiguous_format else {"memory_format": memory_format}
        guard = gm.graph.call_method("contiguous", (value,), kwargs)
    guard.meta["layout_guard"] = True  # passes that care about graph outputs look through it
    guard.meta["provenance"] = value.meta.get("provenance", value.name)
    if "stack_trace" in value.meta:
        guard.meta["stack_trace"] = value.meta["stack_trace"]
    if "tensor_meta" in value.meta:
        guard.meta["tensor_meta"] = value.meta["tensor_meta"]
    reader.replace_input_with(value, guard)
    return guard


def _written_through(gm: fx.GraphModule, reader: fx.Node) -> bool:
    """Whether the graph writes into ``reader``'s result or a view of it. A reader given a copy
    of its input would then write into the copy, and the original would miss the write."""
    if not may_alias_input(reader):
        return False
    pending = [v for n in gm.graph.nodes for v in mutated_values(n)]
    seen: set[fx.Node] = set()
    while pending:
        value = pending.pop()
        if value is reader:
            return True
        if value in seen:
            continue
        seen.add(value)
        if may_alias_input(value):
            pending.extend(value.all_input_nodes)
    return False


def _format_of_strides(value: torch.Tensor, strides: tuple[int, ...]) -> torch.memory_format | None:
    """The standard memory format whose strides for ``value``'s shape are ``strides``."""
    if tuple(value.contiguous().stride()) == strides:
        return torch.contiguous_format
    if value.dim() == 4 and tuple(value.contiguous(memory_format=torch.channels_last).stride()) == strides:
        return torch.channels_last
    return None
