"""What the int8 CPU kernels of the backends can take, and how closely they follow the graph.

Backends use these checks before and after lowering a quantized (QDQ) graph:

- :func:`saturating_weights`: on x86 CPUs without VNNI, ONNX Runtime's QLinearConv (U8S8 and
  S8S8 alike) and torch's x86/fbgemm engine add pairs of uint8 x int8 products in int16, which
  saturates once weights exceed +-64: measured here, 26-28 output steps of error with
  full-range weights, and 17 dB instead of 39 dB logit SQNR for ONNX Runtime's own S8S8
  quantization of a digits CNN. ``config=x86`` keeps weights within +-64.
- :func:`output_steps`: a runtime's int8 kernels round their accumulators their own way, so a
  lowered model matches the QDQ graph within a few quantization steps of each output, not
  within fp32 tolerance. Measured in ONNX Runtime and the lite interpreter (x86 engine): at
  most 1 step on the small test models and MobileNetV2, 2 steps on ResNet-18 (one-step
  differences of inner layers add up). Backends should allow :data:`LOWERING_STEPS`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.fx as fx

from ..graph import get_attr_value
from . import qdq

#: largest weight magnitude non-VNNI x86 kernels take without saturating (2 * 255 * 64 < 2**15)
NON_VNNI_WEIGHT_LIMIT = 64
#: how many quantization steps of an output a lowered model may differ from its QDQ graph
LOWERING_STEPS = 4


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
        if not qdq.is_weight_dequantize(node):
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


def output_steps(gm: fx.GraphModule) -> list[float | None]:
    """Per graph output (flattened in order), the quantization step of the dequantize that
    produces it, or None for an output computed in float."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    return [qdq.tensor_qparams(v).scale if qdq.is_dequantize(v) else None for v in leaves]


def lowering_tolerance(gm: fx.GraphModule):
    """The :class:`graphopt.verify.Tolerance` a backend should check its int8 model against the
    QDQ graph ``gm`` with: :data:`LOWERING_STEPS` steps of the coarsest output (float outputs
    keep float32's relative tolerance). None when ``gm`` is not quantized."""
    from .. import verify

    steps = [s for s in output_steps(gm) if s is not None]
    if not steps:
        return None
    return verify.Tolerance(rtol=verify.Tolerance.for_dtype(torch.float32).rtol, atol=LOWERING_STEPS * max(steps))
