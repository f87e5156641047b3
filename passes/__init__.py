"""Built-in passes, one module each; importing this package registers them and the presets."""
from graphopt import register_preset

from . import (  # noqa: F401
    canonicalize,
    channels_last,
    eliminate_dead_code,
    fold_constants,
    fold_weight_quant,
    fuse_conv_bn_relu,
    prune_channels,
    quantize,
)

# dead code goes first as well: a dead reader of a conv output would otherwise block its fusion,
# and the preset would not be idempotent (found by the property kit)
# channels-last goes last: it only restrides weights, and every rewrite before it sees the
# graph's usual layout
register_preset("mobile-fp32", "canonicalize,eliminate-dead-code,fold-constants,fuse-conv-bn-relu,eliminate-dead-code,"
                "channels-last", inference=True)
