"""What a property test receives, and the source it is built from.

:class:`Case` (a generated model with paste-able code) and :func:`case_from_code`, which builds
one by executing that code; :func:`randomize_`, the seeded weights every case's code fills its
model with; :class:`LayerSpec` and :class:`ModelSpec`, a drawn model's structure, and
:func:`render`, which turns a spec into the code. How specs are drawn is in
:mod:`graphopt.testing.strategies`.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import linecache
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from graphopt.errors import PropertyTestError


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True, repr=False, eq=False)  # tensors have no truth value to compare by
class Case:
    """One generated model: what a property test receives.

    ``module`` is in eval mode; ``code`` is paste-able Python that rebuilds exactly this module
    and these inputs (it defines ``model`` and ``example_inputs``); ``ops`` lists the op kind of
    every layer in order (a module called twice appears twice); ``features`` names the
    structural traits present (``depthwise``, ``grouped``, ``residual``, ``broadcast``,
    ``shared_value``, ``module_reuse``, ``tied_weights``, ``inplace``, ``batch_stats_norm``,
    ``multi_output``, ``dead_value``, spelling styles ``module``/``functional``/``method``, and
    ``shape_read``/``batch_read`` for models that read a size at run time / the batch size);
    all are listed in :data:`FEATURES`.
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    code: str
    ops: tuple[str, ...] = ()
    features: frozenset[str] = frozenset()

    @property
    def description(self) -> str:
        """The model as paste-able Python source (same as ``code``)."""
        return self.code

    @property
    def dtype(self) -> torch.dtype:
        return self.example_inputs[0].dtype

    def __repr__(self) -> str:
        # Hypothesis prints this for a falsifying example: make it the paste-able model.
        return f"# graphopt.testing.Case ops={list(self.ops)}\n{self.code}"


def case_from_code(code: str, *, ops: Sequence[str] = (), features: Iterable[str] = ()) -> Case:
    """Build a Case by executing model source that defines ``model`` and ``example_inputs``.

    This is how generated cases are built, and how a failure printed by a property test is
    pinned as a regression test: paste its code into a string and call this.
    """
    filename = f"<graphopt-case-{hashlib.sha1(code.encode()).hexdigest()[:12]}>"
    # Registering the source lets tracebacks and fx stack traces show the model's lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": "graphopt_generated_case"}
    exec(compile(code, filename, "exec"), namespace)
    try:
        model, example_inputs = namespace["model"], namespace["example_inputs"]
    except KeyError as exc:
        raise PropertyTestError(
            f"case code must define `model` and `example_inputs`; {exc.args[0]!r} is missing"
        ) from None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return Case(model.eval(), tuple(example_inputs), code, tuple(ops), frozenset(features))


# --------------------------------------------------------------------------- weights


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every floating-point parameter and buffer of ``model`` from a generator seeded with
    ``seed``, at scales that keep activations of order one; returns ``model``.

    Running variances are in [0.25, 2], running means and biases are centred normals,
    one-dimensional weights (norm scales) are in [0.5, 1.5] in magnitude, negative about one
    time in four (a negative scale flips the order of values: max-pooling and relu do not
    commute with it), and the rest are normal with standard deviation 1/sqrt(fan-in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            uniform = torch.rand(t.shape, generator=gen, dtype=torch.float64)
            normal = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                value = 0.25 + 1.75 * uniform
            elif name.endswith("running_mean"):
                value = 0.5 * normal
            elif t.dim() == 1 and name.endswith("weight"):
                value = (0.5 + uniform) * torch.where(normal < -0.67, -1.0, 1.0)
            elif t.dim() == 1:
                value = 0.2 * normal
            else:
                value = normal / max(1, t[0].numel()) ** 0.5
            t.copy_(value.to(t.dtype))
    return model


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LayerSpec:
    """One drawn layer: its op kind, the lines it adds to ``__init__`` and to ``forward``."""

    kind: str
    init: tuple[str, ...]
    forward: tuple[str, ...]
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ModelSpec:
    """A whole drawn model: inputs, dtype, weight seed, layers, and the returned values."""

    input_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    seed: int
    layers: tuple[LayerSpec, ...]
    outputs: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    features: frozenset[str] = frozenset()

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(layer.kind for layer in self.layers)


def _input_names(count: int) -> list[str]:
    return ["x"] + [f"x{i}" for i in range(2, count + 1)]


@functools.cache
def _randomize_source() -> str:
    return inspect.getsource(randomize_).rstrip()


def render(spec: ModelSpec) -> str:
    """Python source that defines ``GeneratedModel`` and builds ``model`` and ``example_inputs``."""
    init = [line for layer in spec.layers for line in layer.init] or ["pass"]
    forward = [line for layer in spec.layers for line in layer.forward]
    returned = spec.outputs[0] if len(spec.outputs) == 1 else "(" + ", ".join(spec.outputs) + ")"
    args = ", ".join(_input_names(len(spec.input_shapes)))
    dtype = str(spec.dtype)
    inputs = "".join(
        f"torch.randn({', '.join(map(str, shape))}, generator=gen).to({dtype}), " for shape in spec.input_shapes
    )
    lines = [
        "import torch",
        "import torch.nn as nn",
        "import torch.nn.functional as F",
        "",
        "",
        "class GeneratedModel(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        *("        " + line for line in init),
        "",
        f"    def forward(self, {args}):",
        *("        " + line for line in forward),
        f"        return {returned}",
        "",
        "",
        _randomize_source(),
        "",
        "",
        f"model = randomize_(GeneratedModel(), seed={spec.seed}).to({dtype}).eval()",
        f"gen = torch.Generator().manual_seed({spec.seed + 1})",
        f"example_inputs = ({inputs.rstrip()})",
        "",
    ]
    return "\n".join(lines)
