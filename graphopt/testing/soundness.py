"""Soundness checks of passes on generated cases, and property tests that cannot pass vacuously.

:func:`assert_sound` is the oracle: capture the case, run the pass (or pipeline) under a
PassManager that verifies every pass and raises, then check what the manager does not: the
result against the *original* eager model (so capture is checked too), in the model's dtype and
in float64, the graph lints, the code the optimized module writes on its first call computes
exactly what running its graph node by node computes, every computing node keeps its provenance, a second run changes
nothing for passes that declare themselves idempotent, the user's model and inputs are left
untouched, each named backend's round trip verifies, and wherever the model runs at batch sizes
1, 3 and 5 the batch stayed dynamic and the result keeps the contract there too (generated
models read shapes, ``x.reshape(x.shape[0], -1)``: a pass that bakes the example's batch in
fails here).

:func:`property_test` turns that into a pytest test over generated models, counting how many
cases ran, how many read shapes and how often the pass fired, and failing when too few ran or
fired::

    test_fuse = graphopt.testing.property_test("fuse-conv-bn-relu", min_fired=5,
                                               ops=["conv2d", "batch_norm", "relu"])
"""
from __future__ import annotations

import copy
import difflib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from hypothesis import assume, event, given, target
from hypothesis import settings as Settings

from graphopt import verify
from graphopt.testing import profiles
from graphopt.capture import capture
from graphopt.errors import GraphoptError, ModelRunError, PropertyTestError
from graphopt.ir.graph import preserved_state
from graphopt.ir.lazy import has_code, materialize
from graphopt.lowering.backend import get_backend
from graphopt.lowering.run import lower
from graphopt.pipeline.contracts import Contract, Lossy
from graphopt.pipeline.passes import available_passes
from graphopt.pipeline.manager import PassManager, Result
from graphopt.testing.cases import Case
from graphopt.testing.strategies import OTHER_BATCH_SIZES, inputs_at_batch, models

__all__ = ["assert_sound", "PropertyStats", "property_test", "check_pass", "all_registered_passes"]

_COMPUTING_OPS = ("call_function", "call_method", "call_module")


# --------------------------------------------------------------------------- assert_sound


def assert_sound(
    pass_or_pipeline: Any,
    case: Case,
    *,
    backends: Sequence[str] = (),
    idempotent: bool | None = None,
    dtypes: Sequence[str | torch.dtype] = ("model", torch.float64),
) -> Result:
    """Check that ``pass_or_pipeline`` is sound on ``case``; return the PassManager result (in
    the model's own dtype when ``"model"`` is among ``dtypes``, else in the first one).

    ``dtypes``: ``"model"`` checks the case as generated; a torch dtype checks a copy of model
    and inputs converted to it (float64 separates a wrong rewrite from rounding).
    ``idempotent``: None checks a second run for the passes registered ``idempotent=True``;
    True checks it for every pass; False skips it. ``backends``: names for
    :func:`graphopt.lower`, whose own verification of the reloaded artifact must pass. At
    batch sizes 1, 3 and 5 (:data:`~graphopt.testing.strategies.OTHER_BATCH_SIZES`) where the
    model runs, the batch must have stayed dynamic and the result must keep the contract.

    Raises AssertionError saying what failed, with the verdict or error and the case's code
    (paste-able: it defines ``model`` and ``example_inputs``); UnknownBackendError for a
    backend name nothing registered.
    """
    pipeline_text = _pipeline_text(pass_or_pipeline)
    for backend in backends:
        get_backend(backend)  # a misspelt name is a usage error, raised before anything runs
    state_before = _clone_state(case)
    results = [
        _check_variant(pass_or_pipeline, pipeline_text, case, dtype, backends, idempotent)
        for dtype in _distinct_dtypes(case, dtypes)
    ]
    changed = _changed_state(case, state_before)
    if changed:
        raise _failure(case, pipeline_text, "model", f"the user's model or inputs were modified: {', '.join(changed)}")
    return results[0]


def _distinct_dtypes(case: Case, dtypes: Sequence[str | torch.dtype]) -> list[torch.dtype]:
    out: list[torch.dtype] = []
    for choice in dtypes:
        dtype = case.dtype if choice == "model" else choice
        if not isinstance(dtype, torch.dtype):
            raise PropertyTestError(f"assert_sound(dtypes=...): {choice!r} is neither 'model' nor a torch dtype, "
                                    "e.g. dtypes=('model', torch.float64)")
        if dtype not in out:
            out.append(dtype)
    return out


def _in_dtype(case: Case, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    if dtype == case.dtype:
        return case.module, case.example_inputs
    return copy.deepcopy(case.module).to(dtype), tuple(x.to(dtype) for x in case.example_inputs)


def _check_variant(pass_or_pipeline: Any, pipeline_text: str, case: Case, dtype: torch.dtype,
                   backends: Sequence[str], idempotent: bool | None) -> Result:
    module, inputs = _in_dtype(case, dtype)
    where = str(dtype).replace("torch.", "")
    manager = PassManager(pass_or_pipeline, verify="each", on_failure="raise")
    try:
        gm = capture(module, inputs)
    except GraphoptError as exc:
        raise _failure(case, pipeline_text, where, f"capture failed: {exc}") from exc
    try:
        result = manager.run(gm, inputs)
    except GraphoptError as exc:
        raise _failure(case, pipeline_text, where, f"the pipeline failed: {exc}") from exc

    def fail(headline: str, report: Any = result.report) -> AssertionError:
        return _failure(case, pipeline_text, where, headline, report)

    try:
        result.module.graph.lint()
    except Exception as exc:  # lint raises bare RuntimeError
        raise fail(f"the optimized graph does not lint: {exc}") from exc

    tolerance, check = _end_to_end_contract(manager, result, dtype)
    # Ill-conditioned ops (batch statistics of nearly constant values) can amplify float32
    # rounding past any sensible tolerance on off-distribution inputs (N(0,1) x 1e-3): below
    # float64, check the inputs the manager checks; in float64, where rounding cannot hide a
    # wrong rewrite, check every distribution verify synthesizes.
    synthesize = len(verify.DISTRIBUTIONS) if dtype == torch.float64 else manager.synthesize
    changed = {r.name for r in result.report.records if r.changed}
    lossy = any(inv.pass_.contract.lossy for inv in manager.invocations if inv.name in changed)
    if lossy:
        # a lossy budget (int8 SQNR) holds on inputs like the calibration data, not on x100 or
        # edge-value stress inputs: the example plus the in-range uniform one
        synthesize = 1
    verdict = verify.compare(module, result.module, inputs, tolerance=tolerance, synthesize=synthesize)
    reason = check(verdict)
    if reason is not None:
        raise fail(f"the optimized graph does not keep the contract against the original model: {reason}\n{verdict}")
    _check_other_batches(module, result, inputs, tolerance, check, lossy, fail)

    _check_code_matches_graph(result.module, inputs, fail)
    missing = [n.name for n in result.module.graph.nodes if n.op in _COMPUTING_OPS and "provenance" not in n.meta]
    if missing:
        raise fail(f"node(s) without meta['provenance']: {', '.join(missing)}; rewrites must copy it "
                   "(graphopt.ir.graph.copy_provenance)")

    _check_second_run(manager, result, inputs, idempotent, fail)
    for backend in backends:
        _check_backend(result.module, inputs, backend, fail)
    return result


def _end_to_end_contract(manager: PassManager, result: Result,
                         dtype: torch.dtype) -> tuple[verify.Tolerance | None, Callable[[verify.Verdict], str | None]]:
    """Tolerance and contract check for the whole pipeline against the original model.

    Exact passes compose: the loosest tolerance among the passes that changed the graph (None:
    verify's per-dtype default). A single lossy pass keeps its own budget; budgets of several
    lossy passes do not add up in any simple way, so then only shapes, dtypes and non-finite
    values are checked.
    """
    changed = {r.name for r in result.report.records if r.changed}
    contracts: list[Contract] = [inv.contract for inv in manager.invocations if inv.name in changed]
    tolerances = [c.tolerance(dtype) for c in contracts]
    explicit = [t for t in tolerances if t is not None]
    tolerance = None
    if explicit:
        if len(explicit) < len(tolerances):
            explicit.append(verify.Tolerance.for_dtype(dtype))
        tolerance = verify.Tolerance(rtol=max(t.rtol for t in explicit), atol=max(t.atol for t in explicit))
    lossy = [c for c in contracts if c.lossy]
    if not lossy:
        return tolerance, lambda v: None if v.ok else (v.reason or "outputs differ beyond tolerance")
    budget = lossy[0] if len(lossy) == 1 else Lossy(min_sqnr_db=None)
    return tolerance, budget.check


def _check_other_batches(module: torch.nn.Module, result: Result, inputs: tuple[torch.Tensor, ...],
                         tolerance: verify.Tolerance | None, check: Callable[[verify.Verdict], str | None],
                         lossy: bool, fail: Callable[..., AssertionError]) -> None:
    """The optimized module against the original model at batch sizes 1, 3 and 5.

    Wherever the model runs at a batch other than the example's, the batch must have stayed
    dynamic (``report.checked_at`` names it: a graph made static there specialized the batch,
    at capture or in a pass) and the optimized module must keep the contract there too: an
    exact one on rows that differ from one another (a rewrite that mixes up rows cannot hide
    behind repeated ones). A lossy pipeline is held to shapes, dtypes and finite values only,
    on the example's rows repeated: its budget holds on inputs like the calibration data, and
    a model whose values depend on the batch (``torch.arange(x.shape[0])``, batch statistics)
    leaves that range at other batch sizes; the PassManager already bounds its error at the
    second size.
    """
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 1), None)
    if batch is None:
        return
    for size in OTHER_BATCH_SIZES:
        resized = inputs_at_batch(inputs, size)
        if not lossy:
            resized = _distinct_rows(resized, seed=size)
        try:
            want = verify.run(module, resized)
        except ModelRunError:
            continue  # the model itself does not take this batch: nothing to keep
        where = f"batch {size} (the example's is {batch})"
        if not result.report.checked_at and size != batch:
            shapes_text = "; ".join(result.report.shapes) or "no dims recorded"
            raise fail(f"the optimized graph refuses other batch sizes ({shapes_text}), but the model runs at {where}: "
                       "the batch dim was specialized (at capture or by a pass)")
        try:
            got = verify.run(result.module, resized)
        except GraphoptError as exc:
            raise fail(f"the optimized graph fails at {where}, where the model runs: {exc}") from exc
        if lossy:
            v = verify.compare_outputs([want], [got], verify.Tolerance(math.inf, math.inf), input_labels=[where])
            reason = v.reason
        else:
            reason = check(verify.compare_outputs([want], [got], tolerance, input_labels=[where]))
        if reason is not None:
            raise fail(f"at {where} the optimized graph does not keep the contract against the original model: "
                       f"{reason}")


def _distinct_rows(inputs: tuple[Any, ...], seed: int) -> tuple[Any, ...]:
    """Floating-point inputs plus seeded noise of half their scale: repeated rows made distinct."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x = x + (0.5 * noise * float(x.abs().mean().clamp(min=1e-3))).to(x.dtype)
        out.append(x)
    return tuple(out)


def _check_code_matches_graph(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                              fail: Callable[..., AssertionError]) -> None:
    """The manager and ``verify`` run a module whose code is not written yet node by node
    (graphopt.ir.lazy); the code written on its first call must compute exactly the same."""
    if has_code(gm):
        return
    fresh = lambda: tuple(t.clone() for t in inputs)  # noqa: E731
    with torch.no_grad(), preserved_state(gm):
        by_graph = verify.run(gm, fresh())
        by_code = verify.run(materialize(gm), fresh())
    for i, (a, b) in enumerate(zip(by_graph, by_code)):
        try:
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
        except AssertionError as exc:
            raise fail(f"output {i}: the generated code of the optimized graph differs from running it node "
                       f"by node: {str(exc).splitlines()[0]}") from None


def _check_second_run(manager: PassManager, result: Result, inputs: tuple[torch.Tensor, ...],
                      idempotent: bool | None, fail: Callable[..., AssertionError]) -> None:
    expected = {inv.name for inv in manager.invocations if idempotent or (idempotent is None and inv.pass_.idempotent)}
    if not expected:
        return
    try:
        again = manager.run(result.module, inputs)
    except GraphoptError as exc:
        raise fail(f"a second run of the pipeline on its own output failed: {exc}") from exc
    changed = [r for r in again.report.records if r.changed and r.name in expected]
    if changed:
        diff = "\n".join(difflib.unified_diff(result.module.code.splitlines(), again.module.code.splitlines(),
                                              "after first run", "after second run", lineterm=""))
        names = ", ".join(f"{r.name!r} ({r.rewrites} rewrite(s))" for r in changed)
        raise fail(f"not idempotent: a second run changed the graph again: {names}\n"
                   f"{diff or '(the code is the same: the change is in tensors or node metadata)'}", again.report)


def _check_backend(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], backend: str,
                   fail: Callable[..., AssertionError]) -> None:
    with tempfile.TemporaryDirectory(prefix="graphopt-sound-") as tmp:
        try:
            lower(gm, inputs, backend=backend, path=Path(tmp) / "model")
        except GraphoptError as exc:
            raise fail(f"lowering to backend {backend!r} failed: {exc}") from exc


def _clone_state(case: Case) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in case.module.state_dict().items()}
    state.update({f"example_inputs[{i}]": x.detach().clone() for i, x in enumerate(case.example_inputs)})
    return state


def _changed_state(case: Case, before: dict[str, torch.Tensor]) -> list[str]:
    after = _clone_state(case)
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    return changed + [k for k in after if k not in before]


def _pipeline_text(pass_or_pipeline: Any) -> str:
    if isinstance(pass_or_pipeline, str):
        return pass_or_pipeline
    return PassManager(pass_or_pipeline, verify="none").pipeline_string


def _failure(case: Case, pipeline: str, where: str, headline: str, report: Any = None) -> AssertionError:
    parts = [f"pipeline {pipeline!r} is not sound on a generated model ({where}): {headline}"]
    if report is not None:
        parts.append(f"report:\n{report}")
    parts.append(
        "model (paste it into a file to reproduce; it defines `model` and `example_inputs`, and\n"
        "graphopt.testing.case_from_code(CODE) turns it back into a case):\n" + case.code
    )
    return AssertionError("\n\n".join(parts))


# --------------------------------------------------------------------------- vacuity guard


@dataclass
class PropertyStats:
    """What a property test saw: cases drawn, cases that ran through :func:`assert_sound`,
    cases on which the pipeline fired (made at least one rewrite), and valid cases whose model
    reads shapes (``shape_reading``; ``batch_reading``: the batch size itself)."""

    pipeline: str
    drawn: int = 0
    valid: int = 0
    fired: int = 0
    rewrites: int = 0
    shape_reading: int = 0
    batch_reading: int = 0

    def record(self, result: Result) -> int:
        """Count one valid case; returns the rewrites the pipeline made on it."""
        rewrites = sum(r.rewrites for r in result.report.records)
        self.valid += 1
        self.fired += rewrites > 0
        self.rewrites += rewrites
        return rewrites

    def check(self, min_valid: int, min_fired: int) -> None:
        """Raise AssertionError when too few cases were valid or the pipeline fired too rarely."""
        problems = []
        if self.valid < min_valid:
            problems.append(f"only {self.valid} valid case(s), {min_valid} required: the case filter rejects "
                            "too much or the strategy options leave too few models")
        if self.fired < min_fired:
            problems.append(f"the pipeline fired on only {self.fired} case(s), {min_fired} required: pass "
                            "models(ops=...) kinds that contain the pattern it rewrites")
        if problems:
            raise AssertionError(f"property test of {self.pipeline!r} is vacuous: " + "; ".join(problems)
                                 + f" ({self})")

    def __str__(self) -> str:
        return (f"{self.drawn} drawn, {self.valid} valid, fired on {self.fired}, "
                f"{self.rewrites} rewrite(s) in total, {self.shape_reading} reading shapes "
                f"({self.batch_reading} the batch size)")


def property_test(
    pass_or_pipeline: Any,
    *,
    min_valid: int | None = None,
    min_fired: int = 1,
    backends: Sequence[str] = (),
    idempotent: bool | None = None,
    dtypes: Sequence[str | torch.dtype] = ("model", torch.float64),
    where: Callable[[Case], bool] | None = None,
    settings: Settings | None = None,
    **strategy_kwargs: Any,
) -> Callable[[], None]:
    """A test function (for pytest: assign it to a ``test_*`` name) that runs
    :func:`assert_sound` on generated models and then fails if fewer than ``min_valid`` cases
    ran (default: half of the profile's ``max_examples``) or the pipeline fired on fewer than
    ``min_fired`` of them.

    ``where`` filters cases (rejected ones are not valid); ``settings`` overrides the current
    hypothesis profile; the remaining keywords go to :func:`graphopt.testing.models`. After a
    run, the function's ``stats`` attribute holds the :class:`PropertyStats`.
    """
    label = _pipeline_text(pass_or_pipeline)
    strategy = models(**strategy_kwargs)

    def test() -> None:
        stats = test.stats = PropertyStats(label)  # type: ignore[attr-defined]

        def run_case(case: Case) -> None:
            stats.drawn += 1
            if where is not None:
                assume(where(case))
            rewrites = stats.record(assert_sound(pass_or_pipeline, case, backends=backends,
                                                 idempotent=idempotent, dtypes=dtypes))
            event("fired" if rewrites else "did not fire")
            reads = "batch size" if "batch_read" in case.features else "shapes" if "shape_read" in case.features \
                else None
            stats.shape_reading += reads is not None
            stats.batch_reading += reads == "batch size"
            event(f"model reads {reads}" if reads else "model reads no shape")
            if rewrites:  # steer generation toward cases that fire, once one has: hill-climbing from
                # a score of 0 spends the rest of the examples on variations of a case that does not
                target(float(rewrites), label="rewrites")

        # Keeps each pipeline's saved failures apart in the example database.
        run_case._hypothesis_internal_add_digest = label.encode()  # type: ignore[attr-defined]
        runner = given(case=strategy)(run_case)
        chosen = settings
        if chosen is None and profiles.hypothesis_defaults_in_force():
            chosen = profiles.selected()  # a user's test file: graphopt's profile, not hypothesis's
        if chosen is not None:
            runner = chosen(runner)
        runner()
        examples = (chosen or Settings.default).max_examples
        stats.check(min_valid if min_valid is not None else max(1, examples // 2), min_fired)

    test.__name__ = test.__qualname__ = "test_" + "".join(c if c.isalnum() else "_" for c in label)
    test.__doc__ = f"Property test: {label!r} is sound on generated models and fires on at least {min_fired}."
    return test


def check_pass(pass_or_pipeline: Any, *, min_valid: int | None = None, min_fired: int = 1,
               **kwargs: Any) -> None:
    """Run :func:`property_test` now (for use inside a test, e.g. parametrized over
    :func:`all_registered_passes`)."""
    property_test(pass_or_pipeline, min_valid=min_valid, min_fired=min_fired, **kwargs)()


def all_registered_passes() -> list[str]:
    """Names of every registered pass (built-ins, plug-ins and the user's), sorted, e.g. for
    ``@pytest.mark.parametrize("name", graphopt.testing.all_registered_passes())``."""
    return list(available_passes())

