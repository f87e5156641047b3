"""Built-in backends, one module each; importing this package registers them all."""
from graphopt.backends import executorch, onnx, torchscript_mobile  # noqa: F401
