"""Verification inputs: the user's example followed by synthesized ones of the same shapes."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graphopt.ir import graph as G
from graphopt.errors import InputError

#: Value distributions of synthesized inputs, used in this order (then cycled with new draws).
#: The user's example inputs usually are ``randn``, so the first four differ from it:
#:
#: - ``uniform``: uniform with the example's mean and standard deviation, kept inside its
#:   finite ``[min, max]`` (``[0, 1)`` if constant): in-distribution values, the input lossy
#:   budgets are judged on. Spanning all of ``[min, max]`` instead would give a ``randn``
#:   example's data about 2.5x its spread, a saturation test rather than typical data (int8
#:   ResNet-18 scored 8.5 dB SQNR on such an input against 34.9 dB on a fresh ``randn`` one);
#: - ``large``: N(0, 1) x 100 (x 10 for float16, whose range ends at 65504);
#: - ``small``: N(0, 1) x 1e-3, near zero;
#: - ``edge``: each element one of -1, 0, 1 (exact zeros and ones, ties, ReLU's kink);
#: - ``normal``: N(0, 1).
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "large", "small", "edge", "normal")

_LARGE_SCALE = {torch.float16: 10.0}
_DEFAULT_LARGE_SCALE = 100.0
_SMALL_SCALE = 1e-3


def _synthesized_value(example: Any, distribution: str, rng: np.random.Generator) -> Any:
    """A new tensor like ``example`` with values from ``distribution``."""
    if not isinstance(example, torch.Tensor):
        return example
    kept_as_is = example.is_quantized or example.layout != torch.strided or example.dtype == torch.bool
    if kept_as_is or example.numel() == 0:
        return example.clone()
    shape = tuple(example.shape)
    if not (example.is_floating_point() or example.is_complex()):
        low, high = int(example.min()), int(example.max())
        if distribution == "edge":
            values = rng.choice(np.array([low, high], dtype=np.int64), size=shape)
        else:
            values = rng.integers(low, high, size=shape, endpoint=True)
    elif distribution == "uniform":
        real = example.real if example.is_complex() else example
        finite = real[torch.isfinite(real)].double()
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
        if finite.numel() > 1:  # the example's mean and spread (sqrt(3) sigma: a uniform's edge)
            mean, half_width = float(finite.mean()), 3.0**0.5 * float(finite.std())
            low, high = max(low, mean - half_width), min(high, mean + half_width)
        values = rng.uniform(low, high, size=shape) if high > low else rng.uniform(0.0, 1.0, size=shape)
    elif distribution == "large":
        values = rng.standard_normal(shape) * _LARGE_SCALE.get(example.dtype, _DEFAULT_LARGE_SCALE)
    elif distribution == "small":
        values = rng.standard_normal(shape) * _SMALL_SCALE
    elif distribution == "edge":
        values = rng.choice(np.array([-1.0, 0.0, 1.0]), size=shape)
    else:
        values = rng.standard_normal(shape)
    synthesized = torch.empty_like(example)  # keeps dtype, device and memory format
    synthesized.copy_(torch.from_numpy(np.asarray(values)))
    return synthesized


def synthesize_inputs(example_inputs: Any, count: int = 4, seed: int = 0) -> list[tuple[Any, ...]]:
    """``count`` input tuples shaped like ``example_inputs``, values from :data:`DISTRIBUTIONS`.

    Input ``k`` uses distribution ``DISTRIBUTIONS[k % len(DISTRIBUTIONS)]`` and a generator
    seeded by ``(seed, k)``, so it is the same whatever ``count`` is. See the graphopt.verify
    docstring for integer, bool and non-tensor inputs.
    """
    example = G.as_input_tuple(example_inputs)
    if not isinstance(count, int) or count < 0:
        raise InputError(f"synthesize_inputs: count must be an int >= 0, got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"synthesize_inputs: seed must be an int >= 0, got {seed!r}")
    synthesized = []
    for k in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
        distribution = DISTRIBUTIONS[k % len(DISTRIBUTIONS)]
        synthesized.append(tuple(_synthesized_value(x, distribution, rng) for x in example))
    return synthesized


def verification_inputs(example_inputs: Any, synthesize: int = 4, seed: int = 0) -> list[tuple[Any, ...]]:
    """The example inputs followed by ``synthesize`` synthesized ones (labels: :func:`input_labels`)."""
    return [G.as_input_tuple(example_inputs)] + synthesize_inputs(example_inputs, synthesize, seed)


def input_labels(count: int) -> list[str]:
    """Human labels of the first ``count`` inputs of :func:`verification_inputs`."""
    synthesized = [f"synthesized #{k} ({DISTRIBUTIONS[k % len(DISTRIBUTIONS)]})" for k in range(count - 1)]
    return ["example", *synthesized][:count]
