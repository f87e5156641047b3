"""Every error graphopt raises: one base class, one subclass per kind of failure.

Each message says what failed, where (pass, node, user source line) and what to do next.
"""
from __future__ import annotations

import re


class GraphoptError(Exception):
    """Base class of all graphopt errors."""


class CaptureError(GraphoptError):
    """The model could not be captured into a canonical FX graph."""


class InputError(GraphoptError):
    """Example inputs are missing, of the wrong type, or do not fit the model."""


class PipelineError(GraphoptError):
    """A pipeline names an unknown pass, option or preset, or breaks an ordering constraint."""


class PassDefinitionError(PipelineError, TypeError):
    """A pass, its options or an option's constraint are defined wrongly (an option without a
    default, a class pass that is not a dataclass or has no ``run``). Also a TypeError, as a
    malformed definition is one."""


class NotCanonicalError(GraphoptError, LookupError):
    """An op helper (:func:`graphopt.ir.ops.arg`, ``set_arg``) was given a node that is not a
    canonical op, or asked for a parameter the op does not have. Also a LookupError."""


class OptionError(PipelineError):
    """A pass option is unknown or has a value of the wrong type."""


class TrainingModeError(GraphoptError):
    """The model is in training mode (batch norms using batch statistics, active dropout) but
    the pipeline optimizes for inference: call ``model.eval()`` first. ``parts`` lists where."""

    def __init__(self, message: str, *, parts=()):
        super().__init__(message)
        self.parts = list(parts)


class PassError(GraphoptError):
    """A pass raised, left an invalid graph, or broke the rules passes must follow."""

    def __init__(self, message: str, *, pass_name: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name


class VerificationError(GraphoptError):
    """A transformed graph does not keep its pass's contract (outputs diverge)."""

    def __init__(self, message: str, *, pass_name: str | None = None, verdict=None):
        super().__init__(message)
        self.pass_name = pass_name
        self.verdict = verdict


class LoweringError(GraphoptError):
    """A graph could not be lowered to, or does not run correctly in, a backend."""


class UnknownBackendError(LoweringError):
    """No backend is registered under the requested name."""


class ReportError(GraphoptError):
    """A report that cannot be written: its layout engine (Graphviz ``dot``) is missing or
    failed, or the path cannot be written. The message says what to install or change."""


class ModelLoadError(GraphoptError):
    """A model reference or a saved file could not be loaded (missing, corrupted or untrusted)."""


class ModelRunError(GraphoptError):
    """A model, graph or runtime session raised, or returned something that is not tensors,
    while graphopt ran it on an input (verification, calibration)."""


class NodeRunError(ModelRunError, RuntimeError):
    """A node raised while graphopt ran a graph node by node; the message names the node and the
    node's own exception is the ``__cause__``. Also a RuntimeError."""


class PropertyTestError(GraphoptError):
    """The testing kit (graphopt.testing) was asked for something it cannot do: an unknown op
    kind or profile, impossible strategy bounds, or case code that does not define a model."""


class UnsupportedNodesError(LoweringError):
    """A backend cannot take some nodes of the graph. ``nodes`` lists them
    (``graphopt.lowering.OffendingNode``: node name, op, user source line, reason)."""

    def __init__(self, message: str, *, nodes=()):
        super().__init__(message)
        self.nodes = list(nodes)


class QuantizationError(GraphoptError):
    """Quantization could not be done as asked: bad calibration data (NaN/inf, none at all, wrong
    arity), an unknown configuration, or a quantized graph that breaks a backend's rules."""


class CalibrationDataError(InputError, QuantizationError):
    """Calibration data that does not fit the model: a batch holding NaN/inf, of another shape
    (beyond the batch dim) or dtype than the example inputs, of the wrong arity, or no batch at
    all. The message names the batch. An InputError (the pass manager raises it rather than
    rolling the pass back), and a QuantizationError as these errors were before."""


# -------------------------------------------------------------------- describing exceptions

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def exception_summary(exc: BaseException, limit: int = 300) -> str:
    """``Type: first meaningful line`` of an exception, without colour codes or tracebacks.

    The dynamo ONNX exporter puts generic advice first and the cause under "## Exception
    summary"; that cause is preferred.
    """
    text = ANSI_ESCAPE.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith("<class '")), None)
    if cause is not None:  # "<class 'pkg.DispatchError'>: message" -> "DispatchError: message"
        return re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", cause)[:limit]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"[:limit]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without its type ("(no message)" if empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
