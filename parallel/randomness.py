"""Every random draw of a step is a pure function of (seed, step, global sample index, purpose).

Why: with draws keyed by the sample's global index, 1, 2 or 64 ranks draw the same numbers for the same sample,
so "2 ranks equal 1 rank" and resharded resume are testable; ranks of one sequence-parallel group pass the same
indices and agree; data-parallel ranks hold different indices and differ. Shared draws (DMD2's backward-simulation
k) are keyed by (seed, step, purpose) only, so every rank agrees without a broadcast.

How: a counter-based draw (docs/parallelism.md "Random draws"). The host hashes (seed, step, purpose) once into a
64-bit key; on the device, each element's 32 random bits are a hash of (key, sample index, element position), all
samples at once, in integer tensor ops; uniforms take 24 of them, normals come from two uniforms (Box-Muller, in
float64 so that CPU and GPU agree). Nothing is drawn per sample on the host and nothing is copied to the device.
It replaced a CPU `torch.Generator` re-seeded per sample and purpose, about 2 ms per draw at batch 256 plus a
host-to-device copy. Hand-written because torch has no keyed counter-based generator that runs identically on
CPU and CUDA (its CUDA Philox is keyed by one seed and an offset per generator, not per element).

Cost: about 90 small elementwise ops per draw (most over [B, numel], integer); the hash is two rounds of a 32-bit
avalanche mix (lowbias32, 0.17 bias), ample for noise and timesteps. A step reuses a draw it already made.
"""
from __future__ import annotations

import hashlib
import math
import random
import struct
from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the given parts; stable across processes, Python versions and machines."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else struct.pack("<q", int(part)))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


# The hash is written with torch.bitwise_* rather than Python's operators: `x ^ y`, `x & m`, `x >> k` go through the
# legacy `__xor__`/`__and__`/`__rshift__` ops, which dispatch a second op (or an `empty`) each, ~300 extra
# dispatcher calls a step on the host path.
_xor, _and, _shr, _shl = torch.bitwise_xor, torch.bitwise_and, torch.bitwise_right_shift, torch.bitwise_left_shift


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32) and an odd 32-bit constant, exactly, without a product that
    leaves int64's range (signed overflow is not something to rely on in every kernel). Below 2^31 the product fits
    (< 2^63). Above, constant = low + 2^31 and x * 2^31 = (x & 1) * 2^31 mod 2^32, which only flips bit 31: it is
    XORed in (no carry reaches the kept bits) as x << 31, which fits too (< 2^63). 2 or 4 ops instead of 6."""
    if constant < 2**31:
        return _and(x * constant, _MASK32)
    return _and(_xor(x * (constant - 2**31), _shl(x, 31)), _MASK32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' hash-prospector): a bijection of [0, 2^32) with strong avalanche."""
    x = _mul32(_xor(x, _shr(x, 16)), 0x7FEB352D)
    x = _mul32(_xor(x, _shr(x, 15)), 0x846CA68B)
    return _xor(x, _shr(x, 16))


def random_bits(key: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] int64 in [0, 2^32): element j of sample indices[b] under `key` (a 63-bit int, derive_seed)."""
    key_low, key_high = key & _MASK32, (key >> 32) & _MASK32
    indices = indices.to(torch.int64)
    index_low, index_high = _and(indices, _MASK32), _and(_shr(indices, 32), _MASK32)
    # two 32-bit keys per sample, each depending on the whole key and the whole index
    first = _mix32(_xor(_xor(_mix32(_xor(index_low, key_low)), index_high), key_high))
    second = _mix32(_xor(first, 0x9E3779B9 ^ key_low))
    position = torch.arange(count, dtype=torch.int64, device=indices.device)
    return _mix32(_xor(_mix32(_xor(position[None, :], first[:, None])), second[:, None]))


def counter_uniform(key: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] float64 in [0, 1), 2^-24 apart (24 bits: exact in float32 too)."""
    return _shr(random_bits(key, indices, count), 8).to(torch.float64) * 2.0 ** -24


def counter_normal(key: int, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[B, *shape] float32 standard normal: Box-Muller on uniforms 0..n-1 (radius) and n..2n-1 (angle) of each
    sample. The largest |value| is sqrt(2 ln 2^24) = 5.77: the tail beyond (probability 8e-9) is cut."""
    count = math.prod(shape)
    u = counter_uniform(key, indices, 2 * count)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :count]))   # log(1 - u), 1 - u in (0, 1]
    return (radius * torch.cos(2.0 * math.pi * u[:, count:])).to(torch.float32).reshape(len(indices), *shape)


def index_tensor(sample_indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """[B] int64 on the device: a range becomes one arange (no host list, no copy)."""
    if isinstance(sample_indices, range):
        return torch.arange(sample_indices.start, sample_indices.stop, sample_indices.step, dtype=torch.int64,
                            device=device)
    return torch.tensor(list(sample_indices), dtype=torch.int64, device=device)


class StepRandom:
    """The random source of one training step for this rank's samples.

    sample_indices: global indices of this rank's samples in this step, e.g. step * B_global + rank * B_local + i.
    """

    def __init__(self, seed: int, step: int, sample_indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.step = seed, step
        self.sample_indices = list(sample_indices)
        self.device = torch.device(device)
        self._indices = index_tensor(sample_indices, self.device)
        # a draw is a pure function of (purpose, shape) for this step and these samples: phases that draw the same
        # purpose again (ADM's generator and discriminator share adm_t, adm_eps) reuse the tensor instead of
        # hashing again (about 90 small ops per draw)
        self._drawn: dict[tuple, torch.Tensor] = {}

    def key(self, purpose: str) -> int:
        """The draw's 63-bit key: counter_normal(key, [i], shape) regenerates sample i's draw (stored with ODE pairs)."""
        return derive_seed(self.seed, self.step, purpose)

    def normal(self, purpose: str, shape: Sequence[int]) -> torch.Tensor:
        """[B, *shape] float32 standard normal (the same tensor for a repeated purpose and shape: do not modify it)."""
        key = ("normal", purpose, tuple(shape))
        if key not in self._drawn:
            self._drawn[key] = counter_normal(self.key(purpose), self._indices, tuple(shape))
        return self._drawn[key]

    def uniform(self, purpose: str) -> torch.Tensor:
        """[B] float32 in [0, 1) (shared like `normal`)."""
        key = ("uniform", purpose)
        if key not in self._drawn:
            self._drawn[key] = counter_uniform(self.key(purpose), self._indices, 1)[:, 0].to(torch.float32)
        return self._drawn[key]

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
