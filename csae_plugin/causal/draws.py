"""Seeded random streams: one independent CPU generator per ``(seed, *keys)``, so the fast
engine, the naive reference and the reference statistics draw the same numbers for the same
latent, sequence and purpose."""

from __future__ import annotations

import numpy as np
import torch


def draw_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``: independent streams per latent/sequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
