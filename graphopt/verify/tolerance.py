"""Tolerance: the allowed error of one output, and the per-dtype defaults.

The rule and the table of defaults are in the :mod:`graphopt.verify` docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphopt.errors import OptionError


@dataclass(frozen=True)
class Tolerance:
    """Allowed error of one output: ``max|ref - out| <= atol + rtol * max|ref|``.

    ``inf`` is allowed (a lossy contract judges by SQNR instead); negative or NaN is not.
    """

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise OptionError(
                    f"Tolerance {name}={value!r} is invalid: rtol and atol must be numbers >= 0 "
                    "(math.inf to disable the check)"
                )

    def allowed(self, scale: float) -> float:
        """Largest absolute error allowed for an output whose largest magnitude is ``scale``."""
        # rtol may be inf: inf * 0 must not turn an all-zero output's bound into NaN.
        return self.atol + (self.rtol * scale if scale > 0 else 0.0)

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> Tolerance:
        """Default tolerance for outputs of ``dtype`` (table in the graphopt.verify docstring)."""
        if dtype.is_complex:
            dtype = torch.empty((), dtype=dtype).real.dtype
        if dtype in _DEFAULT_TOLERANCES:
            return _DEFAULT_TOLERANCES[dtype]
        if not dtype.is_floating_point:
            return _EXACT
        raise OptionError(
            f"graphopt.verify has no default tolerance for {dtype}; "
            "pass tolerance=verify.Tolerance(rtol=..., atol=...)"
        )

    def __str__(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


_EXACT = Tolerance(rtol=0.0, atol=0.0)
_DEFAULT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-6),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=5e-2, atol=1e-2),
}
