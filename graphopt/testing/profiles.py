"""Hypothesis settings profiles for graphopt's property tests, chosen by an environment variable.

- ``ci`` (default): deterministic (``derandomize``), no deadline, 40 examples per test so the
  whole property suite runs in a few minutes on two cores (one pass: 8-11 s with one torch
  thread on a busy 2-vCPU machine); failures print a reproduction blob.
- ``dev``: random, 100 examples per test, example database on, for working on a pass.
- ``campaign``: random, 5,000 examples per test, for long bug hunts (nightly or by hand).

``GRAPHOPT_HYPOTHESIS_EXAMPLES=N`` replaces the chosen profile's example count.

Select one with ``GRAPHOPT_HYPOTHESIS_PROFILE=campaign pytest tests/``; ``tests/conftest.py``
calls :func:`load_profile`. Profiles only set defaults: ``@settings(...)`` on a test still wins.
They are registered with hypothesis as ``graphopt-ci``, ``graphopt-dev`` and ``graphopt-campaign``
so that they never replace a project's own profiles of the same short name.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from graphopt.errors import PropertyTestError

ENV_VAR = "GRAPHOPT_HYPOTHESIS_PROFILE"
#: overrides the profile's example count, e.g. a 2,000-case campaign
EXAMPLES_VAR = "GRAPHOPT_HYPOTHESIS_EXAMPLES"
DEFAULT_PROFILE = "ci"

# Generated models take milliseconds to build and a pass run plus verification tens of
# milliseconds: "too slow" is expected, not a problem with the strategy.
_SLOW_IS_FINE = [HealthCheck.too_slow]

PROFILES: dict[str, settings] = {
    "ci": settings(max_examples=40, derandomize=True, deadline=None, print_blob=True, database=None,
                   suppress_health_check=_SLOW_IS_FINE),
    "dev": settings(max_examples=100, deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_FINE),
    # derandomize is explicit: under CI=true hypothesis loads its own profile, which derandomizes
    "campaign": settings(max_examples=5000, deadline=None, print_blob=True, derandomize=False,
                         suppress_health_check=_SLOW_IS_FINE),
}

for _name, _profile in PROFILES.items():
    settings.register_profile(f"graphopt-{_name}", _profile)


def selected() -> settings:
    """The settings of the profile ``$GRAPHOPT_HYPOTHESIS_PROFILE`` names (``ci`` by default),
    with ``$GRAPHOPT_HYPOTHESIS_EXAMPLES`` applied, without loading it: what
    :func:`graphopt.testing.property_test` runs with where the project loaded no profile of its
    own (a user's test file, with no conftest that calls :func:`load_profile`)."""
    name = os.environ.get(ENV_VAR) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise PropertyTestError(f"unknown hypothesis profile {name!r} (given by {ENV_VAR}); "
                                f"choose one of {', '.join(PROFILES)}, e.g. {ENV_VAR}=dev")
    count = os.environ.get(EXAMPLES_VAR)
    if count is None:
        return PROFILES[name]
    if not count.isdigit() or int(count) < 1:
        raise PropertyTestError(f"{EXAMPLES_VAR}={count!r} is not a positive whole number of examples")
    return settings(PROFILES[name], max_examples=int(count))


def hypothesis_defaults_in_force() -> bool:
    """Whether hypothesis runs on its own profiles ('default', or 'ci' under CI=true) rather
    than one a project loaded: their 200 ms deadline and health checks fail generated models."""
    return getattr(settings, "_current_profile", "default") in ("default", "ci")


def load_profile(name: str | None = None) -> str:
    """Make profile ``name`` (default: ``$GRAPHOPT_HYPOTHESIS_PROFILE``, else ``ci``) hypothesis's
    current settings; returns the name loaded."""
    source = "load_profile()" if name else ENV_VAR
    name = name or os.environ.get(ENV_VAR) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise PropertyTestError(
            f"unknown hypothesis profile {name!r} (given by {source}); "
            f"choose one of {', '.join(PROFILES)}, e.g. {ENV_VAR}=dev"
        )
    count = os.environ.get(EXAMPLES_VAR)
    if count is not None:
        if not count.isdigit() or int(count) < 1:
            raise PropertyTestError(f"{EXAMPLES_VAR}={count!r} is not a positive whole number of examples")
        settings.register_profile(f"graphopt-{name}-{count}", settings(PROFILES[name], max_examples=int(count)))
        settings.load_profile(f"graphopt-{name}-{count}")
        return name
    settings.load_profile(f"graphopt-{name}")
    return name
