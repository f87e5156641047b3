"""Equivalence checks between a reference and a candidate runnable, with figures and a culprit.

A runnable is anything that takes the input tensors positionally: a ``torch.fx.GraphModule``,
an ``nn.Module``, a scripted module, or any callable (e.g. a lambda around an ONNX Runtime
session). Outputs may be tensors, numpy arrays or Python numbers nested in tuples, lists and
dicts; :func:`run` flattens them (dicts in insertion order, ``None`` dropped) into a list of
tensors.

Tolerance rule
--------------
For every output ``o`` and every input it was checked on, with ``ref`` the reference's values and
``out`` the candidate's, both converted to float64::

    max|ref - out| <= atol + rtol * max|ref|

The error is measured against the *largest* reference magnitude of that output, not element by
element, so near-zero elements of a large output do not make rounding noise look like a bug,
and an all-zero output is judged by ``atol`` alone. ``max_rel`` reports the same ratio:
``max|ref - out| / max|ref|``. When no tolerance is given, each output uses
:meth:`Tolerance.for_dtype` of the *reference's* dtype (the candidate may compute in another
precision of the same kind). Defaults (measured on a 20-layer conv-BN chain folded in float64
and cast: worst ``max_rel`` 2e-15 / 9e-7 / 1e-3 / 1e-2 respectively):

==========  ======  ======  ===========================================================
dtype       rtol    atol    why
==========  ======  ======  ===========================================================
float64     1e-10   1e-12   ~1e5 times the reassociation error, still catches a fold done in fp32
float32     1e-4    1e-6    see below; a wrong eps or axis is ~1e-3+
float16     1e-2    1e-3    about 10 ulp of fp16 (eps 9.8e-4)
bfloat16    5e-2    1e-2    about 6 ulp of bf16 (eps 7.8e-3)
int, bool   0       0       exact
==========  ======  ======  ===========================================================

float32 allows 1e-4 rather than ~10x the 9e-7 seen on plain chains because the error is
measured against the *output's* scale: a clamp (relu6) after a fused conv hides pre-activation
values ~100x larger than the output, whose rounding then shows as 1.7e-5 of the output's range
(found by the property kit on ``conv -> bn -> relu6`` with inputs scaled x100).

Complex outputs use the tolerance of their component type. Other dtypes (float8) have no
default: pass a :class:`Tolerance`.

Shapes must be equal and dtypes of the same kind (bool, integer, floating, complex).
Non-finite values are compared explicitly: NaN in the same positions of both is equal; NaN
where the other side is finite is a NaN mismatch; +-inf must appear in the same positions with
the same sign (an inf mismatch). The tolerance applies to positions finite in both; any
non-finite mismatch makes the figures ``max_abs = max_rel = inf`` and ``sqnr_db = -inf``.

Inputs
------
:func:`verification_inputs` is the user's example inputs followed by :func:`synthesize_inputs`:
same shapes, dtypes, devices and memory formats, values drawn from fixed seeds, cycling through
:data:`DISTRIBUTIONS`. Integer inputs (indices, lengths) are drawn inside the example's
``[min, max]`` so they stay valid; bool inputs (masks, flags) and non-tensor inputs are kept as
in the example.

Localization
------------
When both sides are graph modules and they disagree, :func:`localize` runs both node by node on
the failing input, pairs candidate nodes with reference nodes by ``meta["provenance"]`` (else
node name; the last reference node of a provenance, shapes must agree) and reports the first
candidate node, in topological order, whose value differs beyond tolerance *and* whose
difference is not undone further down (a fused conv keeps the conv's provenance but carries the
BN's value; the next matched node agrees again, so it is not blamed).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.errors import InputError, ModelRunError, OptionError, exception_summary
from graphopt.fileio import jsonable
from graphopt.ir.lazy import has_code, materialize

__all__ = [
    "DISTRIBUTIONS",
    "sqnr_from_powers",
    "Divergence",
    "OutputFigures",
    "Tolerance",
    "Verdict",
    "compare",
    "compare_outputs",
    "input_labels",
    "localize",
    "run",
    "sqnr_db",
    "synthesize_inputs",
    "verification_inputs",
]

# ----------------------------------------------------------------------------------- tolerance


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
        """Default tolerance for outputs of ``dtype`` (table in the module docstring)."""
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

# ------------------------------------------------------------------------------------ results


def _json_float(value: float) -> float | str:
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    return value if math.isfinite(value) else str(value)


@dataclass
class OutputFigures:
    """Error figures of one output, worst case over the inputs checked.

    ``dtype``/``candidate_dtype`` are ``str(torch.dtype)``. ``max_rel`` is
    ``max|ref - out| / max|ref|``. Figures that cannot be computed (shape or dtype-kind
    mismatch, non-finite mismatch) are ``inf`` (errors) and ``-inf`` (SQNR).
    """

    index: int
    max_abs: float
    max_rel: float
    sqnr_db: float
    shape_ok: bool
    dtype: str
    nan_mismatch: bool
    inf_mismatch: bool = False
    ok: bool = True
    candidate_dtype: str | None = None
    tolerance: Tolerance | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class Divergence:
    """The first candidate node whose value departs from the reference's (or that raised)."""

    node: str
    provenance: str
    source_line: str | None
    max_abs: float
    message: str
    reference_node: str | None = None
    max_rel: float = math.inf
    op: str = ""

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class Verdict:
    """Outcome of a comparison. ``reason`` says what failed (None when ``ok``);
    ``failed_input`` is the index (into the inputs checked) of the first failure;
    ``divergence``/``localization_note`` are the culprit node or why none was found."""

    ok: bool
    outputs: list[OutputFigures]
    inputs_checked: int
    reason: str | None = None
    failed_input: int | None = None
    divergence: Divergence | None = None
    localization_note: str | None = None

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0 if self.ok else math.inf)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0 if self.ok else math.inf)

    @property
    def min_sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=math.inf if self.ok else -math.inf)

    def __str__(self) -> str:
        figures = (
            f"max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}, "
            f"min SQNR {self.min_sqnr_db:.1f} dB"
        )
        head = f"{self.inputs_checked} input(s) x {len(self.outputs)} output(s)"
        if self.ok:
            return f"ok: {head}; {figures}"
        text = f"MISMATCH: {self.reason} [{head}; {figures}]"
        if self.divergence is not None:
            text += f"\n  first divergence: {self.divergence.message}"
        elif self.localization_note:
            text += f"\n  not localized: {self.localization_note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs_checked": self.inputs_checked,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "min_sqnr_db": _json_float(self.min_sqnr_db),
            "reason": self.reason,
            "failed_input": self.failed_input,
            "outputs": [o.to_dict() for o in self.outputs],
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "localization_note": self.localization_note,
        }

# ------------------------------------------------------------------------------------- inputs

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
    seeded by ``(seed, k)``, so it is the same whatever ``count`` is. See the module docstring
    for integer, bool and non-tensor inputs.
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

# ------------------------------------------------------------------------------------ running


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    """A plain (dense, non-quantized, detached) tensor from a tensor, array or number."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_quantized:
            return tensor.dequantize()
        return tensor.to_dense() if tensor.layout != torch.strided else tensor
    if isinstance(value, (np.ndarray, np.generic)):
        try:
            return torch.from_numpy(np.array(value))
        except TypeError as exc:
            raise ModelRunError(
                f"{where} is a numpy array of dtype {value.dtype}, which torch cannot hold; "
                "return numeric arrays"
            ) from exc
    if isinstance(value, (bool, int, float, complex)):
        return torch.tensor(value)
    raise ModelRunError(
        f"{where} is a {type(value).__name__}; verification compares tensors, numpy arrays and "
        "numbers (nested in tuples, lists or dicts): return those"
    )


def _flatten_outputs(value: Any, where: str = "output") -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [t for key, v in value.items() for t in _flatten_outputs(v, f"{where}[{key!r}]")]
    if isinstance(value, (tuple, list)):
        return [t for i, v in enumerate(value) for t in _flatten_outputs(v, f"{where}[{i}]")]
    return [_as_tensor(value, where)]


def _describe(runnable: Any) -> str:
    if isinstance(runnable, fx.GraphModule):
        return "graph module"
    if isinstance(runnable, torch.nn.Module):
        return f"module {type(runnable).__name__}"
    return getattr(runnable, "__qualname__", None) or type(runnable).__name__


def run(runnable: Callable[..., Any], inputs: Any) -> list[torch.Tensor]:
    """Run ``runnable(*inputs)`` under ``torch.no_grad`` and flatten its outputs to tensors.

    The runnable gets copies of the input tensors. Raises :class:`ModelRunError` (the original
    exception chained) when it raises or returns something other than tensors, arrays and numbers.
    """
    args = G.fresh_copies(G.as_input_tuple(inputs))
    try:
        with torch.no_grad():
            result = G.call(runnable, args)
    except Exception as exc:  # any user model/session error becomes one typed error
        raise ModelRunError(
            f"{_describe(runnable)} raised on inputs ({G.describe_values(args)}): {exception_summary(exc)}"
        ) from exc
    return _flatten_outputs(result)


def _positional_arity(runnable: Any) -> tuple[int, int | None] | None:
    """(required, maximum or None for *args) positional parameters, or None when unknown."""
    schema_owner = runnable.forward if isinstance(runnable, torch.jit.ScriptModule) else runnable
    schema = getattr(schema_owner, "schema", None)
    if isinstance(schema, torch._C.FunctionSchema):
        params = [a for a in schema.arguments if a.name != "self"]
        return sum(not a.has_default_value() for a in params), len(params)
    if isinstance(runnable, fx.GraphModule) and not has_code(runnable) \
            and type(runnable.graph._codegen) is not fx.graph.CodeGen:
        materialize(runnable)  # a stale forward shows the signature of plain fx code only
    target = runnable.forward if isinstance(runnable, torch.nn.Module) else runnable
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    positional = [
        p for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    required = sum(p.default is p.empty for p in positional)
    return required, None if variadic else len(positional)


def _check_arity(runnable: Any, inputs: tuple[Any, ...], role: str) -> None:
    arity = _positional_arity(runnable)
    if arity is None:
        return
    required, maximum = arity
    if required <= len(inputs) and (maximum is None or len(inputs) <= maximum):
        return
    expected = f"{required}" if required == maximum else f"{required} to {maximum if maximum is not None else 'any'}"
    raise InputError(
        f"the {role} ({_describe(runnable)}) takes {expected} input(s) but {len(inputs)} were given "
        f"({G.describe_values(inputs)}); pass example_inputs as a tuple with one entry per forward argument"
    )

# --------------------------------------------------------------------------------- comparison


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_complex():
        return torch.view_as_real(tensor.to(torch.complex128))
    return tensor.to(torch.float64)


@dataclass
class _PairResult:
    figures: OutputFigures
    reason: str | None  # why this pair fails, None when it passes


def sqnr_from_powers(signal_power: float, noise_power: float) -> float:
    """SQNR in dB from summed squares of signal and of error (inf when the error is zero)."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def _compare_tensors(index: int, ref: torch.Tensor, out: torch.Tensor, tolerance: Tolerance | None) -> _PairResult:
    """Figures and verdict for one output on one input (rules in the module docstring)."""
    tol = tolerance if tolerance is not None else Tolerance.for_dtype(ref.dtype)
    figures = OutputFigures(
        index=index, max_abs=math.inf, max_rel=math.inf, sqnr_db=-math.inf, shape_ok=ref.shape == out.shape,
        dtype=str(ref.dtype), nan_mismatch=False, candidate_dtype=str(out.dtype), tolerance=tol, ok=False,
    )
    if not figures.shape_ok:
        return _PairResult(figures, f"has shape {tuple(out.shape)} where the reference has {tuple(ref.shape)}")
    if _kind(ref.dtype) != _kind(out.dtype):
        return _PairResult(figures, (
            f"has dtype {out.dtype} ({_kind(out.dtype)}) "
            f"where the reference has {ref.dtype} ({_kind(ref.dtype)})"
        ))
    if _kind(ref.dtype) in ("bool", "integer"):
        # int64 arithmetic: float64 would merge distinct integers above 2**53.
        r, o = ref.detach().cpu().long(), out.detach().cpu().long()
        diff = (r - o).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(r.abs().max()) if r.numel() else 0.0
        signal, noise = float((r.double() ** 2).sum()), float((diff.double() ** 2).sum())
    else:
        r, o = _as_float64(ref), _as_float64(out)
        r_nan, o_nan = torch.isnan(r), torch.isnan(o)
        figures.nan_mismatch = bool((r_nan ^ o_nan).any())
        figures.inf_mismatch = bool(((torch.isinf(r) | torch.isinf(o)) & (r != o) & ~(r_nan & o_nan)).any())
        if figures.nan_mismatch or figures.inf_mismatch:
            return _PairResult(figures, _nonfinite_reason(r, o))
        finite = torch.isfinite(r) & torch.isfinite(o)
        diff = (r - o).abs()[finite]
        finite_ref = r[torch.isfinite(r)]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(finite_ref.abs().max()) if finite_ref.numel() else 0.0
        signal, noise = float((r[finite] ** 2).sum()), float((diff**2).sum())
    figures.max_abs = max_abs
    figures.max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    figures.sqnr_db = sqnr_from_powers(signal, noise)
    allowed = tol.allowed(scale)
    figures.ok = max_abs <= allowed
    if figures.ok:
        return _PairResult(figures, None)
    return _PairResult(
        figures,
        f"differs beyond tolerance: max_abs {max_abs:.3g} > {allowed:.3g} allowed "
        f"({tol}, max|ref| {scale:.3g}; max_rel {figures.max_rel:.3g}, SQNR {figures.sqnr_db:.1f} dB)",
    )


def _nonfinite_reason(ref: torch.Tensor, out: torch.Tensor) -> str:
    problems = []
    nan_where_finite = int((torch.isnan(out) & ~torch.isnan(ref)).sum())
    finite_where_nan = int((torch.isnan(ref) & ~torch.isnan(out)).sum())
    either_nan = torch.isnan(ref) | torch.isnan(out)
    inf_differs = int(((torch.isinf(ref) | torch.isinf(out)) & (ref != out) & ~either_nan).sum())
    if nan_where_finite:
        problems.append(f"NaN at {nan_where_finite} position(s) where the reference is not NaN")
    if finite_where_nan:
        problems.append(f"no NaN at {finite_where_nan} position(s) where the reference is NaN")
    if inf_differs:
        problems.append(f"inf at {inf_differs} position(s) differs from the reference (position or sign)")
    return "has " + "; ".join(problems)


def sqnr_db(ref: Any, out: Any) -> float:
    """``10*log10(sum ref^2 / sum (ref-out)^2)`` in float64; ``inf`` when equal.

    Positions non-finite in both and equal (same NaN, same-signed inf) are left out; any other
    non-finite difference gives ``-inf``, as does a non-zero ``out`` against an all-zero ``ref``.
    """
    ref_t, out_t = _as_tensor(ref, "ref"), _as_tensor(out, "out")
    if ref_t.shape != out_t.shape:
        raise InputError(f"sqnr_db: shapes differ, {tuple(ref_t.shape)} vs {tuple(out_t.shape)}")
    r, o = _as_float64(ref_t), _as_float64(out_t)
    both_nan = torch.isnan(r) & torch.isnan(o)
    finite = torch.isfinite(r) & torch.isfinite(o)
    if bool((~finite & ~both_nan & (r != o)).any()):
        return -math.inf
    return sqnr_from_powers(float((r[finite] ** 2).sum()), float(((r - o)[finite] ** 2).sum()))


def _merge(results: list[_PairResult]) -> OutputFigures:
    """Worst case over inputs of one output's figures."""
    figures = [r.figures for r in results]
    first = figures[0]
    return OutputFigures(
        index=first.index,
        max_abs=max(f.max_abs for f in figures),
        max_rel=max(f.max_rel for f in figures),
        sqnr_db=min(f.sqnr_db for f in figures),
        shape_ok=all(f.shape_ok for f in figures),
        dtype=first.dtype,
        nan_mismatch=any(f.nan_mismatch for f in figures),
        inf_mismatch=any(f.inf_mismatch for f in figures),
        ok=all(f.ok for f in figures),
        candidate_dtype=first.candidate_dtype,
        tolerance=first.tolerance,
    )


def compare_outputs(
    reference_outputs: Sequence[Sequence[Any]],
    candidate_outputs: Sequence[Sequence[Any]],
    tolerance: Tolerance | None = None,
    *,
    input_labels: Sequence[str] | None = None,
) -> Verdict:
    """Compare outputs already computed, one list of output tensors (or arrays) per input.

    ``tolerance=None`` uses :meth:`Tolerance.for_dtype` of each reference output's dtype.
    ``input_labels`` name the inputs in the reason (e.g. ``input_labels(n)``).
    """
    if len(reference_outputs) != len(candidate_outputs):
        raise InputError(
            f"compare_outputs: {len(reference_outputs)} reference output lists but "
            f"{len(candidate_outputs)} candidate ones; pass one list of outputs per input, in the same order"
        )
    if not reference_outputs:
        raise InputError("compare_outputs: no inputs to compare; pass the outputs of at least one input")
    per_output: dict[int, list[_PairResult]] = {}
    failures: list[tuple[int, str]] = []
    for i, (ref_list, out_list) in enumerate(zip(reference_outputs, candidate_outputs)):
        label = f"input {i}" + (f" ({input_labels[i]})" if input_labels and i < len(input_labels) else "")
        refs, outs = _flatten_outputs(ref_list, "reference output"), _flatten_outputs(out_list, "candidate output")
        if len(refs) != len(outs):
            failures.append((i, f"on {label} the reference returned {len(refs)} output(s), the candidate {len(outs)}"))
        for j, (ref, out) in enumerate(zip(refs, outs)):
            result = _compare_tensors(j, ref, out, tolerance)
            per_output.setdefault(j, []).append(result)
            if result.reason is not None:
                failures.append((i, f"output {j} on {label} {result.reason}"))
    outputs = [_merge(per_output[j]) for j in sorted(per_output)]
    if not failures:
        return Verdict(ok=True, outputs=outputs, inputs_checked=len(reference_outputs))
    first_input, reason = failures[0]
    if len(failures) > 1:
        reason += f" (and {len(failures) - 1} more failing output/input pair(s))"
    return Verdict(ok=False, outputs=outputs, inputs_checked=len(reference_outputs), reason=reason,
                   failed_input=first_input)


def _run_all(runnable: Any, inputs: list[tuple[Any, ...]]) -> tuple[list[list[torch.Tensor]], ModelRunError | None]:
    """Outputs per input until the first input on which ``runnable`` fails, and that error."""
    outputs = []
    for args in inputs:
        try:
            outputs.append(run(runnable, args))
        except ModelRunError as exc:
            return outputs, exc
    return outputs, None


def compare(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    example_inputs: Any,
    *,
    synthesize: int = 4,
    tolerance: Tolerance | None = None,
    seed: int = 0,
    localize: bool = True,
) -> Verdict:
    """Run both on :func:`verification_inputs` and compare their outputs.

    Never raises for a model that fails or returns junk: the verdict is not ok and says why.
    Raises :class:`InputError` when the inputs do not fit either side's signature. With
    ``localize`` and two graph modules, a failing verdict carries the first divergent node.
    """
    inputs = verification_inputs(example_inputs, synthesize=synthesize, seed=seed)
    labels = input_labels(len(inputs))
    _check_arity(reference, inputs[0], "reference")
    _check_arity(candidate, inputs[0], "candidate")

    ref_outs, ref_error = _run_all(reference, inputs)
    if ref_error is not None:
        i = len(ref_outs)
        hint = "" if i == 0 else (
            "; the reference itself fails on this synthesized input: pass synthesize=0 or inputs it accepts"
        )
        return Verdict(ok=False, outputs=[], inputs_checked=i,
                       reason=f"the reference failed on input {i} ({labels[i]}): {ref_error}{hint}", failed_input=i)

    cand_outs, cand_error = _run_all(candidate, inputs)
    checked = len(cand_outs)
    if checked:
        verdict = compare_outputs(ref_outs[:checked], cand_outs, tolerance, input_labels=labels)
    else:
        verdict = Verdict(ok=False, outputs=[], inputs_checked=0)
    if cand_error is not None:
        failure = f"the candidate failed on input {checked} ({labels[checked]}): {cand_error}"
        if verdict.ok or verdict.failed_input is None:
            verdict.ok, verdict.failed_input, verdict.reason = False, checked, failure
        else:  # an earlier input already differs: it stays the headline
            verdict.reason = f"{verdict.reason}; {failure}"
    if not verdict.ok and localize and isinstance(reference, fx.GraphModule) and isinstance(candidate, fx.GraphModule):
        assert verdict.failed_input is not None
        verdict.divergence, verdict.localization_note = _localize(
            reference, candidate, inputs[verdict.failed_input], tolerance
        )
        if verdict.divergence is None and verdict.localization_note:
            verdict.reason = f"{verdict.reason}; not localized: {verdict.localization_note}"
    return verdict

# ------------------------------------------------------------------------------- localization

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


class _NodeByNodeInterpreter(fx.Interpreter):
    """Runs a graph node by node, handing each node's value to ``on_value`` as it is computed."""

    def __init__(self, gm: fx.GraphModule, on_value: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        # We name the failing node ourselves; fx's extra traceback would also log the whole
        # graph through torch's structured tracing, which imports inductor (seconds).
        self.extra_traceback = False
        self.on_value = on_value
        self.executed: set[fx.Node] = set()
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.executed.add(n)
        self.on_value(n, result)
        return result


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [_as_tensor(value, "node value")]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


@dataclass
class _NodeStatus:
    diverges: bool
    max_abs: float
    max_rel: float
    reason: str | None


def _node_status(
    refs: list[torch.Tensor], cands: list[torch.Tensor], tolerance: Tolerance | None
) -> _NodeStatus | None:
    """How a candidate node's tensors compare with its partner's, or None if not comparable."""
    if not refs or len(refs) != len(cands):
        return None
    if any(r.shape != c.shape or _kind(r.dtype) != _kind(c.dtype) for r, c in zip(refs, cands)):
        return None
    try:
        results = [_compare_tensors(j, r, c, tolerance) for j, (r, c) in enumerate(zip(refs, cands))]
    except OptionError:  # a dtype without default tolerance (float8): not comparable
        return None
    reason = next((r.reason for r in results if r.reason is not None), None)
    return _NodeStatus(
        diverges=reason is not None,
        max_abs=max(r.figures.max_abs for r in results),
        max_rel=max(r.figures.max_rel for r in results),
        reason=reason,
    )


def _difference_reaches_output(
    node: fx.Node, status: dict[fx.Node, _NodeStatus], executed: set[fx.Node]
) -> bool:
    """False when every path from ``node`` to the output meets a matched node that agrees
    (the difference is undone, e.g. a fused op carrying an intermediate's provenance)."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output" or user not in executed:
            return True
        if user in status:
            if status[user].diverges:
                return True
            continue
        stack.extend(user.users)
    return False


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op.removeprefix('call_')} {node.target}"


def _where(node: fx.Node, line: str | None) -> str:
    at = f", at {line}" if line else ""
    return f"node {node.name!r} ({_op_name(node)}, provenance {G.provenance(node)!r}{at})"


def _localize(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: tuple[Any, ...], tolerance: Tolerance | None
) -> tuple[Divergence | None, str | None]:
    """The first divergent candidate node, or None and why none was found."""
    try:
        return _find_divergence(reference_gm, candidate_gm, inputs, tolerance)
    except Exception as exc:  # a diagnosis must not turn a verdict into a crash
        return None, f"localization failed: {exception_summary(exc)}"


def _find_divergence(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: tuple[Any, ...], tolerance: Tolerance | None
) -> tuple[Divergence | None, str | None]:
    ref_partner: dict[str, fx.Node] = {}
    for n in reference_gm.graph.nodes:
        if n.op in _COMPUTE_OPS:
            ref_partner[G.provenance(n)] = n  # the last node of a provenance holds its final value
    candidates = [n for n in candidate_gm.graph.nodes if n.op in _COMPUTE_OPS and G.provenance(n) in ref_partner]
    if not candidates:
        return None, (
            "no candidate node shares a provenance or name with a reference node, so the graphs cannot be matched"
        )
    partners = set(ref_partner.values())
    ref_values: dict[fx.Node, list[torch.Tensor]] = {}

    def keep_partner_value(node: fx.Node, value: Any) -> None:
        if node in partners:  # copies: a later in-place op of the graph must not change them
            ref_values[node] = [t.clone() for t in _tensor_leaves(value)]

    try:
        with torch.no_grad():
            _NodeByNodeInterpreter(reference_gm, keep_partner_value).run(*G.fresh_copies(inputs))
    except Exception as exc:  # the reference is not ours to fix; just say localization stopped
        return None, f"the reference graph raised while run node by node: {exception_summary(exc)}"

    # Judge candidate values as they come instead of keeping them: halves peak memory.
    matched = set(candidates)
    status: dict[fx.Node, _NodeStatus] = {}

    def judge(node: fx.Node, value: Any) -> None:
        if node in matched:
            reference = ref_values[ref_partner[G.provenance(node)]]
            node_status = _node_status(reference, _tensor_leaves(value), tolerance)
            if node_status is not None:
                status[node] = node_status

    cand_run = _NodeByNodeInterpreter(candidate_gm, judge)
    raised: tuple[fx.Node, Exception] | None = None
    try:
        with torch.no_grad():
            cand_run.run(*G.fresh_copies(inputs))
    except Exception as exc:  # a raising candidate node is itself the divergence
        assert cand_run.current is not None
        raised = (cand_run.current, exc)

    for n in candidate_gm.graph.nodes:
        if raised is not None and n is raised[0]:
            line = G.source_line(n)
            return Divergence(
                node=n.name, provenance=G.provenance(n), source_line=line, max_abs=math.inf, op=_op_name(n),
                message=f"{_where(n, line)} raised {exception_summary(raised[1])}",
            ), None
        node_status = status.get(n)
        if node_status is None or not node_status.diverges:
            continue
        if not _difference_reaches_output(n, status, cand_run.executed):
            continue
        partner = ref_partner[G.provenance(n)]
        line = G.source_line(n) or G.source_line(partner)
        return Divergence(
            node=n.name, provenance=G.provenance(n), source_line=line, max_abs=node_status.max_abs,
            max_rel=node_status.max_rel, reference_node=partner.name, op=_op_name(n),
            message=f"{_where(n, line)} {node_status.reason} against reference node {partner.name!r}",
        ), None

    if not status:
        return None, "no matched node pair has values of the same shape and kind to compare"
    if not any(s.diverges for s in status.values()):
        return None, (
            f"all {len(status)} matched node(s) agree within tolerance; the difference arises in "
            "candidate nodes that have no counterpart in the reference"
        )
    return None, (
        "every matched node that differs agrees again further down; the difference arises in "
        "candidate nodes that have no counterpart in the reference"
    )


def localize(
    reference_gm: fx.GraphModule, candidate_gm: fx.GraphModule, inputs: Any, tolerance: Tolerance | None = None
) -> Divergence | None:
    """The first candidate node whose value diverges from the reference's on ``inputs``.

    None when nothing can be matched or every matched node agrees (:func:`compare` records why
    in ``Verdict.localization_note``). ``tolerance=None`` uses per-dtype defaults.
    """
    for role, gm in (("reference", reference_gm), ("candidate", candidate_gm)):
        if not isinstance(gm, fx.GraphModule):
            raise InputError(f"localize: the {role} must be a torch.fx.GraphModule, got {type(gm).__name__}")
    divergence, _ = _localize(reference_gm, candidate_gm, G.as_input_tuple(inputs), tolerance)
    return divergence
