"""graphopt: capture a PyTorch model into canonical torch.fx, optimize it with verified passes,
lower it to TorchScript mobile (.ptl) or ONNX."""
from __future__ import annotations

from . import errors, graph, ops
from .errors import *  # noqa: F401,F403

__version__ = "0.1.0"
