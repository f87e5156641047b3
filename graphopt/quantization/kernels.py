"""What the int8 CPU kernels of the backends can take, and how closely they follow the graph.

Backends use these checks before and after lowering a quantized (QDQ) graph:

- :func:`saturating_weights`: on x86 CPUs without VNNI, ONNX Runtime's QLinearConv (U8S8 and
  S8S8 alike) and torch's x86/fbgemm engine add pairs of uint8 x int8 products in int16, which
  saturates once weights exceed +-64: measured here, 26-28 output steps of error with
  full-range weights, and 17 dB instead of 39 dB logit SQNR for ONNX Runtime's own S8S8
  quantization of a digits CNN. ``config=x86`` keeps weights within +-64. Transposed
  convolutions do not count: neither runtime has an int8 kernel for them on the CPU (ONNX
  Runtime's QLinearConvTranspose exists for its XNNPACK provider only), so they compute in
  float between dequantize and quantize.
- :func:`lowering_tolerance`: a runtime's int8 kernels round their accumulators their own way,
  so a lowered model matches the QDQ graph within the quantization steps on the paths to each
  output (:mod:`graphopt.quantization.error_bounds`), not within fp32 tolerance. The steps of
    the dequantize producing an output (:func:`output_steps`) are a floor: measured in ONNX
  Runtime and the lite interpreter (x86 engine), at most 1 such step on the small test models
  and MobileNetV2, 2 on ResNet-18 (one-step differences of inner layers add up), and
  :data:`LOWERING_STEPS` are allowed.
- Dynamic quantization has no output step to count in: the runtime chooses each activation's
  parameters itself and the output is float. ONNX Runtime's DynamicQuantizeLinear chooses the
  graph's ``choose_qparams`` parameters (measured on the test MLPs: 4e-7 of the largest output,
  ties included); torch's ``linear_dynamic`` rounds its own way (up to 3e-3) and ExecuTorch's
  XNNPACK further (up to 1.4e-2). Outputs of a dynamically quantized graph are allowed
  :data:`LOWERING_STEPS` steps of an 8-bit grid over their own largest magnitude (rtol 4/255):
  no looser than what a statically quantized output of the same range gets. And torch's dynamic
  kernels never step finer than :data:`TORCH_DYNAMIC_MIN_STEP` (fbgemm and qnnpack widen
  narrower ranges), so inputs narrower than ``255 * TORCH_DYNAMIC_MIN_STEP`` (0.016) are
  quantized coarser than in the graph: without a bias to dominate, outputs then differ by more
  than 4/255 of themselves (measured: 3% on inputs scaled by 1e-3). An absolute floor of one
  such step through the largest weight row of any dynamically quantized layer allows that.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.fx as fx

from graphopt.ir.graph import get_attr_value
from graphopt.quantization import qdq
from graphopt.quantization.placement import is_transposed_conv

#: largest weight magnitude non-VNNI x86 kernels take without saturating (2 * 255 * 64 < 2**15)
NON_VNNI_WEIGHT_LIMIT = 64
#: how many quantization steps of an output a lowered model may differ from its QDQ graph
LOWERING_STEPS = 4
#: how many times the root-sum-square of the steps reaching an output (one step per quantize,
#: carried there: ``error_bounds``) a lowered model may differ from its QDQ graph. Measured in
#: ONNX Runtime and the lite interpreter on the example CNNs and mobilenet-like test models: at
#: most 0.48 of that sum
PATH_SPREAD = 2
#: the smallest activation step of torch's dynamic kernels (``SMALL_SCALE_THRESHOLD`` in fbgemm's
#: and qnnpack's parameter choice)
TORCH_DYNAMIC_MIN_STEP = 6.1e-5


@functools.cache
def has_vnni() -> bool:
    """Does this CPU have VNNI (int8 dot products into int32, no int16 saturation)?"""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def saturating_weights(gm: fx.GraphModule) -> list[str]:
    """Weights (``node name: largest magnitude``) that x86 int8 kernels would saturate on on this
    CPU; empty when the CPU has VNNI or every weight is within +-64."""
    if has_vnni():
        return []
    found = []
    for node in gm.graph.nodes:
        if not qdq.is_weight_dequantize(node) or (node.users and all(is_transposed_conv(u) for u in node.users)):
            continue
        source = node.args[0]
        qmax = int(node.args[5])
        if isinstance(source, fx.Node) and source.op == "get_attr":
            integers = get_attr_value(gm, source)
            if isinstance(integers, torch.Tensor) and integers.numel():
                qmax = int(integers.abs().max())
        if qmax > NON_VNNI_WEIGHT_LIMIT:
            found.append(f"{node.name}: {qmax}")
    return found


#: float ops that move, select or average values without growing them: an output computed from
#: one dequantized value through these is off by no more than that value's steps
_NON_EXPANDING = frozenset({"mean", "reshape", "view", "flatten", "permute", "transpose", "contiguous", "squeeze",
                            "unsqueeze", "select", "getitem", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                            "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "clone", "t"})


def output_steps(gm: fx.GraphModule) -> list[float | None]:
    """Per graph output (flattened in order), the quantization step of the dequantize that
    produces it, directly or through ops that only move, select or average its values
    (``dequantize -> reshape -> mean``); None for an output computed in float otherwise."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    return [_source_step(v) if isinstance(v, fx.Node) else None for v in leaves]


def _source_step(node: fx.Node) -> float | None:
    for _ in range(64):
        if qdq.is_dequantize(node):
            return qdq.tensor_qparams(node).scale
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if node.op not in ("call_function", "call_method") or name not in _NON_EXPANDING or len(tensors) < 1:
            return None
        node = node.args[0] if isinstance(node.args[0], fx.Node) else tensors[0]
    return None


def lowering_tolerance(gm: fx.GraphModule):
    """The tolerance a backend should check its int8 model against the QDQ graph ``gm`` with,
    derived from the graph: per output, :data:`PATH_SPREAD` times the root-sum-square of the
    quantization steps on the paths that reach it, carried through the ops between (float heads
    after int8 bodies included; :func:`graphopt.quantization.error_bounds.output_error_bounds`),
    and never less than :data:`LOWERING_STEPS` steps of a dequantize producing the output nor
    than float32's tolerance; relative :data:`LOWERING_STEPS` / 255 when activations are
    quantized at run time (see the module docstring). One :class:`graphopt.verify.Tolerance`
    for all outputs (verification takes one), the loosest of theirs. None when ``gm`` is not
    quantized."""
    from graphopt import verify
    from graphopt.quantization.error_bounds import output_error_bounds

    bounds = output_error_bounds(gm)
    dynamic = qdq.has_dynamic_qdq(gm)
    if not any(bounds) and not dynamic:
        return None
    fp32 = verify.Tolerance.for_dtype(torch.float32)
    steps = [s for s in output_steps(gm) if s is not None]
    atol = max(fp32.atol, PATH_SPREAD * max(bounds, default=0.0), LOWERING_STEPS * max(steps, default=0.0))
    if dynamic:
        atol = max(atol, TORCH_DYNAMIC_MIN_STEP * _largest_dynamic_row(gm))
    return verify.Tolerance(rtol=LOWERING_STEPS / 255 if dynamic else fp32.rtol, atol=atol)


def measured_for_unknown_gains(gm: fx.GraphModule, tolerance: Any, batches: list[tuple[Any, ...]]) -> tuple[Any, str | None]:
    """``tolerance`` widened, where the graph alone cannot bound it, to what nudging every int8
    value one step does to the outputs on ``batches``
    (:func:`graphopt.quantization.error_bounds.simulated_spread`); with a note saying so, or
    None when nothing changed.

    Only graphs with ops of unknown gain between a quantized value and an output are measured
    (layer norms, divisions by a norm: :func:`~graphopt.quantization.error_bounds.assumed_ops`);
    for the rest the bound from the graph stands. Measured on ConvNeXt-V2 (timm
    ``convnextv2_atto``): ONNX Runtime 0.063 away from the QDQ graph at its largest, the graph's
    bound 0.051, the nudged run 0.18; both are 24.5-25 dB from the float model."""
    from graphopt import verify
    from graphopt.quantization.error_bounds import assumed_ops, simulated_spread

    if tolerance is None or not qdq.has_qdq(gm) or qdq.has_dynamic_qdq(gm):
        return tolerance, None
    unknown = assumed_ops(gm)
    if not unknown:
        return tolerance, None
    spread = simulated_spread(gm, batches)
    if spread <= tolerance.atol:
        return tolerance, None
    shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    return verify.Tolerance(rtol=tolerance.rtol, atol=spread), (
        f"int8 tolerance atol {spread:.3g} (the graph's bound was {tolerance.atol:.3g}): measured by running the graph "
        f"with every int8 value one step off, since the gains of {shown} are not known from the graph")


def _largest_dynamic_row(gm: fx.GraphModule) -> float:
    """The largest L1 norm of a weight row (one output's weights) among the layers whose input
    is quantized at run time: how far one step on every input element moves an output."""
    largest = 0.0
    for node in gm.graph.nodes:
        if not any(qdq.dynamic_source(a) is not None for a in node.all_input_nodes):
            continue
        for arg in node.all_input_nodes:
            weight = qdq.constant_value(gm, arg) if qdq.is_weight_dequantize(arg) else None
            if weight is not None and weight.dim() >= 2:
                largest = max(largest, float(weight.detach().abs().flatten(1).sum(1).max()))
    return largest
