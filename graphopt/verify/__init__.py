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

Numeric history
---------------
:mod:`graphopt.verify.history` uses the same node-by-node runs to measure every value of a
graph against the original it came from (same provenance, shape and dtype; SQNR and max abs
error): ``record`` keeps the original's values once, ``node_errors`` judges a later state. The
PassManager keeps them per pass (``Report.numeric_history``), bisection uses them to say where
a bad rewrite's error entered.
"""
from __future__ import annotations

# One module per job, in dependency order: tolerance, verdicts (the figures reported), inputs
# (synthesis), running, comparison (of outputs already computed), localization, and equivalence
# (compare: run both sides, compare, localize a failure).
from graphopt.verify.comparison import compare_outputs, sqnr_db, sqnr_from_powers
from graphopt.verify.equivalence import compare
from graphopt.verify.inputs import DISTRIBUTIONS, input_labels, synthesize_inputs, verification_inputs
from graphopt.verify.localization import localize
from graphopt.verify.running import run
from graphopt.verify.tolerance import Tolerance
from graphopt.verify.verdicts import Divergence, OutputFigures, Verdict

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
