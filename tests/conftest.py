"""Test configuration: one torch thread per xdist worker, hypothesis profile from the environment."""
import os

import pytest
import torch

import graphopt

torch.set_num_threads(int(os.environ.get("GRAPHOPT_TEST_THREADS", "1")))

try:
    from graphopt.testing.profiles import load_profile
except ImportError:  # the kit is optional for the rest of the suite
    pass
else:
    load_profile()


@pytest.fixture
def registry():
    """Register throwaway passes and remove them afterwards."""
    names = []

    def register(name, **kw):
        names.append(name)
        return graphopt.register_pass(name, replace=True, **kw)

    yield register
    for n in names:
        graphopt.unregister_pass(n)


# ------------------------------------------------------------------ property-test counts
# Property tests made by graphopt.testing.property_test keep what they saw in ``fn.stats``
# (drawn / valid / fired); the terminal summary lists them, so a campaign run
# (``make test-campaign``) reports how many cases each pass really saw. Without xdist only:
# workers' counts do not reach the controller.
_PROPERTY_STATS: list = []


def pytest_runtest_teardown(item):
    stats = getattr(getattr(item, "obj", None), "stats", None)
    if stats is not None and hasattr(stats, "valid"):
        _PROPERTY_STATS.append((item.name, stats))


def pytest_terminal_summary(terminalreporter):
    if not _PROPERTY_STATS:
        return
    terminalreporter.section("property tests: cases per pipeline")
    for name, s in _PROPERTY_STATS:
        terminalreporter.write_line(
            f"{name:45s} {s.pipeline:28s} drawn {s.drawn:6d}  valid {s.valid:6d}  fired {s.fired:6d}")
