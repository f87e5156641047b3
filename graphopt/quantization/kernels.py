"""What the int8 CPU kernels of the backends can take, and how closely they follow the graph.

Backends use these checks before and after lowering a quantized (QDQ) graph:

- :func:`saturating_weights`: on x86 CPUs without VNNI, ONNX Runtime's QLinearConv (U8S8 and
  S8S8 alike) and torch's x86/fbgemm engine add pairs of uint8 x int8 products in int16, which
  saturates once weights exceed +-64: measured here, 26-28 output steps of error with
  full-range weights, and 17 dB instead of 39 dB logit SQNR for ONNX Runtime's own S8S8
  quantization of a digits CNN. ``config=x86`` keeps weights within +-64.
- :func:`output_steps`: a runtime's int8 kernels round their accumulators their own way, so a
  lowered model matches the QDQ graph within one quantization step of each output (measured:
  at most 1.0 step on every test model, in ONNX Runtime and the lite interpreter), not within
  fp32 tolerance.
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
