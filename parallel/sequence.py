"""Ulysses sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509) for long token sequences.

The P ranks of one sequence-parallel (SP) group hold the same sample. After patch embedding each rank keeps one
contiguous chunk of ceil(S / P) tokens ([B, S, D] -> [B, ceil(S/P), D], the last chunk zero-padded), so every
per-token layer (norms, MLPs, projections) runs on 1/P of the tokens. Attention needs every token: an all-to-all
trades the token split for a head split ([B, ceil(S/P), H, d] -> [B, S, H/P, d]), attention runs on whole
sequences for H/P heads, and the inverse all-to-all restores the token split. Text tokens that every rank holds
whole (CogVideoX's 226 T5 tokens) need no all-to-all: a rank takes its heads' slice, and the text rows of the
attention output are all-gathered over heads. The outputs are gathered before unpatchify.

Padding is cut, not masked: the pad rows are the last P ceil(S/P) - S positions of the gathered sequence, so
attention sees exactly S keys and SDPA keeps its flash kernel (a mask would push it off). Pad rows are never read
by a real token and are cut again when the output is gathered, so they receive no gradient.

Gradients. The collectives are torch's autograd functional collectives: an all-to-all's backward is the inverse
all-to-all and an all-gather's backward a reduce-scatter SUM. Every SP rank computes the same loss of the same
sample, so its backward yields its share of the gradient of the SUM of the P identical losses: the SP ranks'
parameter gradients add up to P times the sample's gradient. A backend averaging gradients over all dp x sp ranks
(FSDP2 over the flattened (dp_shard, sp) mesh; ZeRO-3 over the world) therefore gets exactly the data-parallel
mean, with no SP-specific scaling; per-sample reductions (the DMD normaliser, head logits, mean losses) see whole
samples because the outputs and the tapped features are gathered first. Cost of that choice: the loss and the
heads run P times (they are small next to the blocks) and the gathered output, [B, S, C p^2], is a latent's size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class SequenceShards:
    """This rank's place in its SP group. group None: no sequence parallelism (every method is the identity)."""

    group: object = None           # torch.distributed.ProcessGroup
    size: int = 1
    rank: int = 0

    @classmethod
    def of_group(cls, group) -> "SequenceShards":
        if group is None or dist.get_world_size(group) == 1:
            return cls()
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    @property
    def active(self) -> bool:
        return self.size > 1

    def local_length(self, length: int) -> int:
        """Tokens per rank: ceil(S / P)."""
        return math.ceil(length / self.size)

    # --- tokens ------------------------------------------------------------------------------------------------
    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, S, D] (the same on every SP rank) -> this rank's chunk [B, ceil(S/P), D], zero-padded at the end."""
        if not self.active:
            return tokens
        chunk = self.local_length(tokens.shape[1])
        padded = F.pad(tokens, (0, 0, 0, chunk * self.size - tokens.shape[1]))
        # a copy, not a view: a view would keep the whole padded sequence alive for as long as the chunk is saved
        # for backward (activation checkpointing saves every block input), which is what SP exists to avoid
        return padded.narrow(1, self.rank * chunk, chunk).clone()

    def gather(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Chunks [B, ceil(S/P), D] -> [B, S, D] on every SP rank (backward: reduce-scatter SUM of the P ranks'
        gradients of the gathered tensor, then this rank's chunk)."""
        if not self.active:
            return tokens
        return funcol.all_gather_single_autograd(tokens.contiguous(), 1, self.group).narrow(1, 0, length)

    # --- attention ---------------------------------------------------------------------------------------------
    def to_heads(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """All-to-all [B, ceil(S/P), H, d] -> [B, S, H/P, d]: every token of this rank's H/P heads, pad rows cut."""
        if not self.active:
            return x
        b, chunk, heads, dim = x.shape
        group_heads = heads // self.size
        # [P (head group), B, chunk, H/P, d]: row p goes to rank p; rank p receives every rank's chunk of its heads
        send = x.reshape(b, chunk, self.size, group_heads, dim).permute(2, 0, 1, 3, 4).contiguous()
        recv = funcol.all_to_all_single_autograd(send, None, None, self.group)   # [P (source chunk), B, chunk, ...]
        return recv.permute(1, 0, 2, 3, 4).reshape(b, self.size * chunk, group_heads, dim).narrow(1, 0, length)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_heads`: [B, S, H/P, d] -> this rank's chunk of every head [B, ceil(S/P), H, d]."""
        if not self.active:
            return x
        b, length, group_heads, dim = x.shape
        chunk = self.local_length(length)
        padded = F.pad(x, (0, 0, 0, 0, 0, chunk * self.size - length))
        send = padded.reshape(b, self.size, chunk, group_heads, dim).transpose(0, 1).contiguous()
        recv = funcol.all_to_all_single_autograd(send, None, None, self.group)   # [P (head group), B, chunk, ...]
        return recv.permute(1, 2, 0, 3, 4).reshape(b, chunk, self.size * group_heads, dim)

    def local_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H, d] held whole by every rank -> this rank's heads [B, L, H/P, d]."""
        if not self.active:
            return x
        group_heads = x.shape[2] // self.size
        return x.narrow(2, self.rank * group_heads, group_heads)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/P, d] -> [B, L, H, d] on every rank (backward: reduce-scatter SUM)."""
        if not self.active:
            return x
        return funcol.all_gather_single_autograd(x.contiguous(), 2, self.group)


def check_heads(num_heads: int, sp: int) -> str | None:
    """One line when `sp` ranks cannot split the heads evenly (Ulysses gives each rank H / P whole heads)."""
    if sp > 1 and num_heads % sp:
        return f"{num_heads} attention heads do not split over parallel.sp = {sp} ranks"
    return None
