"""Comparing outputs already computed: figures and verdict per output and input, SQNR."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from graphopt.errors import InputError
from graphopt.verify.running import _as_tensor, _flatten_outputs
from graphopt.verify.tolerance import Tolerance
from graphopt.verify.verdicts import OutputFigures, Verdict


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
    """Figures and verdict for one output on one input (rules in the graphopt.verify docstring)."""
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
