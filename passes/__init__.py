"""Built-in passes, one module each; importing this package registers them and the presets."""
from graphopt import register_preset

from . import canonicalize, eliminate_dead_code, fold_constants, fuse_conv_bn_relu  # noqa: F401

register_preset("mobile-fp32", "canonicalize,fold-constants,fuse-conv-bn-relu,eliminate-dead-code")
