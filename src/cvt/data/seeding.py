"""Seeding for reproducible augmentation: a sample's seed from (seed, epoch, index, ...), and a scope that seeds
Python's, numpy's and torch's CPU generators for one sample and restores them afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from collections.abc import Iterator

import numpy as np
import torch


def sample_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from non-negative integer keys (< 2**64) such as (seed, epoch, index)."""
    data = struct.pack(f"<{len(keys)}Q", *keys)  # a hash, not SeedSequence: 1 us instead of 40 per sample
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed Python's `random`, numpy's global and torch's default CPU generator; restore all three on exit.

    Only the CPU generator is touched (`torch.manual_seed` would also reseed CUDA), so training randomness in the
    main process is unaffected by a sample's augmentation.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)
