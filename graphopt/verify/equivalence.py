"""compare(): run reference and candidate on the verification inputs, compare, localize a failure."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.errors import ModelRunError
from graphopt.verify.comparison import compare_outputs
from graphopt.verify.inputs import input_labels, verification_inputs
from graphopt.verify.localization import _localize
from graphopt.verify.running import _check_arity, run
from graphopt.verify.tolerance import Tolerance
from graphopt.verify.verdicts import Verdict


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
