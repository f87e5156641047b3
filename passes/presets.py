"""The built-in presets: named pipelines of the built-in passes, all in one place.

Every preset here assumes an inference-mode model (``inference=True``): the PassManager refuses a
model in training mode before running one.
"""
from graphopt import register_preset

# dead code goes first as well: a dead reader of a conv output would otherwise block its fusion,
# and the preset would not be idempotent (found by the property kit).
# channels-last goes last: it only restrides weights, and every rewrite before it sees the
# graph's usual layout.
register_preset("mobile-fp32", "canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,eliminate-dead-code,"
                "channels-last", inference=True)

# mobile-fp32's rewrites, then int8: weights folded to int8 constants and the float originals
# dropped. Without mobile-fp32's channels-last: int8 kernels take their weights prepacked, and the
# QDQ graph's float convs are a simulation, not what runs on the device.
register_preset("mobile-int8", "canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,"
                "eliminate-dead-code,quantize,fold-weight-quantization,eliminate-dead-code", inference=True)

# round_to=8: channel counts that are not multiples of 8 can make a pruned MobileNetV2 slower in
# ONNX Runtime than the original (`python -m benchmarks.run --sections prune` shows it).
# canonicalize first (prune-channels runs after it), then dead code: an unused reader of a
# channel (say ``y.sum(1)``) would freeze its group.
register_preset("mobile-pruned", "canonicalize,eliminate-dead-code,prune-channels{round_to=8},mobile-fp32",
                inference=True)

# mobile-int8 with the accuracy-recovery passes: channel ranges balanced between consecutive
# layers and activation outliers moved into linear weights before calibration (both exact in
# float), and the mean error of int8 weights taken out of the biases before the weights become
# int8 constants (kept only where held-out SQNR does not get worse).
register_preset("mobile-int8-accurate", "canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,"
                "eliminate-dead-code,equalize-cross-layer,smooth-activations,quantize,correct-quantization-bias,"
                "fold-weight-quantization,eliminate-dead-code", inference=True)
