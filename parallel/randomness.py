"""Every random draw of a step is a pure function of (seed, step, global sample index, purpose).

Why: with draws keyed by the sample's global index, 1, 2 or 64 ranks draw the same numbers for the same sample,
so "2 ranks equal 1 rank" and resharded resume are testable; ranks of one sequence-parallel group pass the same
indices and agree; data-parallel ranks hold different indices and differ. Shared draws (DMD2's backward-simulation
k) are keyed by (seed, step, purpose) only, so every rank agrees without a broadcast.

Cost: one CPU `torch.Generator` re-seeded per sample and purpose (a few microseconds each), then one host-to-device
copy of the batch. Drawing on the CPU also makes the numbers identical on CPU and GPU runs.
"""
from __future__ import annotations

import hashlib
import random
import struct
from typing import Sequence

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the given parts; stable across processes, Python versions and machines."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else struct.pack("<q", int(part)))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class StepRandom:
    """The random source of one training step for this rank's samples.

    sample_indices: global indices of this rank's samples in this step, e.g. step * B_global + rank * B_local + i.
    """

    def __init__(self, seed: int, step: int, sample_indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.step = seed, step
        self.sample_indices = list(sample_indices)
        self.device = torch.device(device)
        self._generator = torch.Generator()

    def _per_sample(self, purpose: str, fn) -> torch.Tensor:
        rows = []
        for index in self.sample_indices:
            self._generator.manual_seed(derive_seed(self.seed, self.step, index, purpose))
            rows.append(fn(self._generator))
        return torch.stack(rows).to(self.device, non_blocking=True)

    def normal(self, purpose: str, shape: Sequence[int]) -> torch.Tensor:
        """[B, *shape] float32 standard normal."""
        return self._per_sample(purpose, lambda g: torch.randn(tuple(shape), generator=g))

    def uniform(self, purpose: str) -> torch.Tensor:
        """[B] float32 in [0, 1)."""
        return self._per_sample(purpose, lambda g: torch.rand((), generator=g))

    def shared_randint(self, purpose: str, high: int) -> int:
        """An int in [0, high), the same on every rank (keyed by seed, step and purpose only). Python's generator, not
        torch's: a host-side integer needs no tensor (and the planner's fake-tensor trace could not read one)."""
        return random.Random(derive_seed(self.seed, self.step, -1, purpose)).randrange(high)


def sample_indices(step: int, global_batch: int, rank: int, world_size: int) -> range:
    """Global indices of this rank's samples: position j of the global batch goes to rank j % world_size.

    Strided, not contiguous, because that is how mosaicml-streaming deals a global batch to ranks (with
    num_canonical_nodes fixed, rank r of W reads global positions r, r + W, ...): the real sample and the noise drawn
    for index i then belong together on any number of ranks."""
    start = step * global_batch + rank
    return range(start, start + global_batch - rank, world_size)
