"""Built-in passes, one module each; importing this package registers them and the presets."""
from graphopt.passes import (  # noqa: F401
    canonicalize,
    channels_last,
    correct_quantization_bias,
    eliminate_dead_code,
    equalize_cross_layer,
    fold_constants,
    fold_weight_quant,
    fuse_conv_bn_relu,
    prune_channels,
    quantize,
    smooth_activations,
)
from graphopt.passes import presets  # noqa: F401,E402  (after the passes they name)
