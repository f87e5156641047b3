"""Test configuration: one torch thread per xdist worker, hypothesis profile from the environment."""
import os

import torch

torch.set_num_threads(int(os.environ.get("GRAPHOPT_TEST_THREADS", "1")))

try:
    from graphopt.testing.profiles import load_profile
except ImportError:  # the kit is optional for the rest of the suite
    pass
else:
    load_profile()
