"""Reading a role's weights back from a training checkpoint in ONE process with no process group, whichever backend
wrote it (export of an unfinished run, `python -m trainer.export --checkpoint`):

- data_parallel: `state.pt` holds full tensors (`torch.load(weights_only=True)`).
- FSDP2 and ZeRO-3: a torch.distributed.checkpoint folder read through parallel/safe_dcp.py; `dcp.load` fills
  plain full-size tensors for just the keys asked for. The raw weights are `roles.<role>.model.<name>`, the EMA
  `ema.<name>`: FSDP2 stores them in the parameter's shape, ZeRO-3 flat (its partitions are pieces of the
  flattened parameter), so each is read in the stored size and viewed in the parameter's shape.
"""
from __future__ import annotations

import os

import torch

from parallel import safe_dcp


def checkpoint_weights(directory: str, module, role: str = "generator", kind: str = "ema") -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} of `role` (kind 'raw') or of its EMA (kind 'ema') from a checkpoint folder.
    module: the role's network (the meta device is enough: names, shapes and order)."""
    named = list(module.named_parameters())
    if os.path.isfile(os.path.join(directory, "state.pt")):
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        return state["ema"] if kind == "ema" else state["roles"][role]
    if not safe_dcp.is_dcp(directory):
        raise FileNotFoundError(f"{directory}: not a checkpoint of any backend (no state.pt or DCP .metadata)")
    prefix = "ema." if kind == "ema" else f"roles.{role}.model."
    sizes = safe_dcp.stored_sizes(directory)
    missing = [name for name, _ in named if prefix + name not in sizes]
    if missing:
        raise KeyError(f"{directory}: no {prefix}{missing[0]} (and {len(missing) - 1} more): a checkpoint of "
                       f"another network or role")
    stored = {name: torch.empty(sizes[prefix + name], dtype=torch.float32) for name, _ in named}
    state = {"ema": stored} if kind == "ema" else {"roles": {role: {"model": stored}}}
    safe_dcp.load(state, directory)
    return {name: stored[name].view(param.shape) for name, param in named}
