"""Built-in backends, one module each; importing this package registers them all."""
from . import onnx, torchscript_mobile  # noqa: F401
