"""One parallelize path per role, for every backend (docs/parallelism.md "One parallelize path").

The transforms run in a fixed order, each on the module the previous one left:

1. attention: the family's Ulysses processors when the role runs sequence parallel (parallel/sequence.py), else the
   recipe's kernel (`parallel.attention`: SDPA, diffusers' default, or xformers). Denoiser roles only: heads and
   backbones have no attention processors.
2. activation checkpointing (`parallel.activation_checkpointing`) on the family's blocks (`family.shard_units`):
   each block keeps its input and recomputes its forward in backward, about one more forward of compute for not
   keeping the block's activations. Frozen roles that are backpropagated through (ADM's teacher, fake score) save
   as much as trainable ones.
3. regional compilation (`parallel.compile`): `torch.compile` of each block in place (`nn.Module.compile`, the
   torchtitan recipe), after checkpointing and before sharding, so each block's forward (and its recompute) runs
   as one graph while FSDP2's per-block hooks stay outside it. Blocks of one class share their compiled code
   (dynamo guards on the class, not the instance), so compile time does not grow with depth. Denoiser roles only.
4. per-block shard, then the root: FSDP2 `fully_shard`s each block then the root (parallel/fsdp.py); ZeRO-3 has
   partitioned the role at construction (`zero.Init`) and gathers per submodule; plain data parallel replicates.

`prepare_role` is steps 1 to 3 and returns the blocks for step 4. Every backend calls it from `build_role`, and the
memory planner builds its roles through the same backends, so the plan traces the transforms a run applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from parallel.sequence import SequenceShards

DENOISER_ROLES = ("teacher", "generator", "fake_score")
RECOMPILE_LIMIT = 128   # compiled variants of a block call before dynamo falls back to eager (see prepare_role)


@dataclass(frozen=True)
class ParallelizePlan:
    """What the recipe and the family say about every role's transforms.

    attention: `sdpa` or `xformers`; checkpoint_roles: roles whose blocks recompute activations in backward;
    blocks: module -> its blocks in forward order (the family's `shard_units`: FSDP2 units, checkpoint units);
    compile_backend: torch.compile backend for each denoiser block, None: eager."""
    attention: str = "sdpa"
    checkpoint_roles: frozenset = frozenset()
    blocks: Callable[[nn.Module], list] = field(default=lambda module: [])
    compile_backend: Optional[str] = None


def prepare_role(role: str, module: nn.Module, plan: ParallelizePlan, sequence: SequenceShards) -> list[nn.Module]:
    """Steps 1 (attention), 2 (activation checkpointing) and 3 (compile) on `module`, in place; returns its blocks."""
    if role in DENOISER_ROLES:
        if sequence.active:
            module.enable_sequence_parallel(sequence)
        elif plan.attention == "xformers" and hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()
    blocks = plan.blocks(module)
    if role in plan.checkpoint_roles:
        for block in blocks:
            checkpoint(block)   # torch's composable API: hooks on the block, no wrapper class, sharding-agnostic
    if plan.compile_backend is not None and role in DENOISER_ROLES:
        # Every in-place compiled block shares one code object (nn.Module._call_impl), and each role x phase is its
        # own variant: shapes (CFG doubles the batch), grad mode, which parameters require grad (roles are frozen
        # per phase), train/eval, LoRA layers, a family's last-block variant. The default of 8 variants was spent
        # within one tiny SD3 step, after which dynamo silently runs the rest eager. Cost of a longer list: dynamo
        # checks the cached variants' guards in turn, microseconds each, per block call.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for block in blocks:
            # dynamic=False: a role sees a few fixed shapes (batch, CFG's doubled batch), each compiled once
            block.compile(backend=plan.compile_backend, dynamic=False)
    return blocks
