"""The attention backend of a recipe (`parallel.attention`): torch SDPA (the diffusers default: flash / memory-efficient
kernels on CUDA, the flash kernel on CPU) or xformers' memory-efficient attention.

xformers has CUDA kernels only (ENV.md: `memory_efficient_attention` raises NotImplementedError on CPU, and diffusers'
`enable_xformers_memory_efficient_attention()` refuses without CUDA), so asking for it on a CPU run, or where its
binary does not load, is a configuration error reported before any work, not a crash mid-run.
"""
from __future__ import annotations

from torch import nn


def attention_problem(backend: str, device_type: str, family: str) -> str | None:
    """One line saying why `backend` cannot run here, or None."""
    if backend == "sdpa":
        return None
    if family == "toy":
        return "parallel.attention: the toy family has no attention layers (hint: parallel.attention: sdpa)"
    if device_type != "cuda":
        return (f"parallel.attention: xformers has no {device_type} kernel (its memory_efficient_attention runs on "
                f"CUDA only) (hint: parallel.attention: sdpa, torch's own kernels)")
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:   # not installed, or a binary built for another torch / CUDA
        return (f"parallel.attention: xformers does not load here ({type(e).__name__}: {e}) (hint: install the "
                f"xformers build matching torch, or parallel.attention: sdpa)")
    return None


def apply_attention(module: nn.Module, backend: str, sequence=None) -> nn.Module:
    """Switch a diffusers model's attention processors to the backend (SDPA is already their default); with an
    active sequence-parallel group (parallel/sequence.py `SequenceShards`), the family's Ulysses processors instead
    (config.py allows sp > 1 for CogVideoX with SDPA only). Applied first, before checkpointing and sharding."""
    if sequence is not None and sequence.active:
        module.enable_sequence_parallel(sequence)
        return module
    if backend == "xformers" and hasattr(module, "enable_xformers_memory_efficient_attention"):
        module.enable_xformers_memory_efficient_attention()
    return module
