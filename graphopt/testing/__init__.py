"""graphopt.testing: property tests for passes and pipelines.

- :func:`models`: a hypothesis strategy of random valid PyTorch models (:class:`Case`), each
  with paste-able source code; :data:`OP_KINDS` lists the op kinds it draws from.
- :func:`assert_sound`: the oracle for one case (contract against the original model in the
  model's dtype and float64, lint, provenance, idempotence, backend round trips).
- :func:`property_test` / :func:`check_pass`: a test over many cases that also fails when too
  few cases ran or the pass never fired; :func:`all_registered_passes` to parametrize.
- :func:`load_profile`: hypothesis profiles ``ci``/``dev``/``campaign`` from
  ``$GRAPHOPT_HYPOTHESIS_PROFILE``.
- :func:`case_from_code`: turn the code a failure printed back into a case (regression tests).

Example::

    import graphopt.testing as gt

    test_fuse = gt.property_test("fuse-conv-bn-relu", min_fired=5, ops=["conv2d", "batch_norm", "relu"])
"""
from __future__ import annotations

from graphopt.testing.profiles import PROFILES, load_profile
from graphopt.testing.soundness import PropertyStats, all_registered_passes, assert_sound, check_pass, property_test
from graphopt.testing.cases import Case, ModelSpec, case_from_code, render
from graphopt.testing.kinds import OP_KINDS
from graphopt.testing.strategies import model_specs, models

__all__ = [
    "Case", "ModelSpec", "OP_KINDS", "PROFILES", "PropertyStats", "all_registered_passes", "assert_sound",
    "case_from_code", "check_pass", "load_profile", "model_specs", "models", "property_test", "render",
]
