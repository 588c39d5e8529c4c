"""The global random streams, seeded for one block from a stream of the caller's own.

timm's and torchvision's random transforms draw from Python's, NumPy's and torch's global
generators; seeded from a sample's (or a step's) own stream and put back afterwards, their
draws become a function of that stream, whichever process runs them and whenever.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def seeded_globals(rng: random.Random):
    """Run the block with Python's, NumPy's and torch's global generators seeded from
    ``rng`` (timm's transforms draw from all three), then restore them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(rng.getrandbits(64))
    np.random.seed(rng.getrandbits(32))
    torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU stream alone: cheap
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
