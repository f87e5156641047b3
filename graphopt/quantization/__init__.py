"""Int8 quantization support, static and dynamic: backend configurations, observers, parameter
math, QDQ helpers, placement and calibration, per-layer sensitivity (:func:`analyze`). The ``quantize`` and ``fold-weight-quantization`` passes
(``graphopt.passes``) are built on it; so is lowering of quantized graphs.
"""
from __future__ import annotations

from graphopt.quantization.configs import BackendConfig, FixedQParams, IntegerType, available_configs, get_config, register_config
from graphopt.quantization.kernels import has_vnni, lowering_tolerance, output_steps, saturating_weights
from graphopt.quantization.observers import METHODS, make_observer
from graphopt.quantization.qdq import has_qdq
from graphopt.quantization.qparams import TensorQParams, affine_qparams, guard_bias_scales, symmetric_per_channel_scales
from graphopt.quantization.sensitivity import LayerSensitivity, SensitivityReport, analyze

__all__ = [
    "BackendConfig", "FixedQParams", "IntegerType", "LayerSensitivity", "METHODS", "SensitivityReport",
    "TensorQParams", "affine_qparams", "analyze", "available_configs", "get_config", "guard_bias_scales", "has_qdq", "has_vnni", "lowering_tolerance", "make_observer", "output_steps",
    "register_config", "saturating_weights", "symmetric_per_channel_scales",
]
