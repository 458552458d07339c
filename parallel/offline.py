"""Reading a role's weights back from a training checkpoint in ONE process with no process group, whichever backend
wrote it (export of an unfinished run, `python -m trainer.export --checkpoint`):

- data_parallel: `state.pt` holds full tensors.
- FSDP2: a torch.distributed.checkpoint folder; `dcp.load` fills plain full-size tensors for just the keys asked for
  (the EMA is saved as DTensors named like the generator's parameters; the raw weights under roles.<role>.model).
- ZeRO-3: the EMA is one list of flat fp32 partitions per rank (`zero3_rank*.pt`, parameters in the module's
  order, each padded to equal pieces): concatenated and trimmed per parameter. The raw fp32 weights come from
  DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`.
"""
from __future__ import annotations

import glob
import os

import torch
import torch.distributed.checkpoint as dcp


def checkpoint_weights(directory: str, module, role: str = "generator", kind: str = "ema") -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} of `role` (kind 'raw') or of its EMA (kind 'ema') from a checkpoint folder.
    module: the role's network (the meta device is enough: names, shapes and order)."""
    named = list(module.named_parameters())
    if os.path.isfile(os.path.join(directory, "state.pt")):
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        return state["ema"] if kind == "ema" else state["roles"][role]
    ranks = sorted(glob.glob(os.path.join(directory, "zero3_rank*.pt")))
    if ranks:
        if kind == "raw":
            # deepspeed only for ZeRO-3 checkpoints (importing it costs seconds)
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(os.path.join(directory, role), tag="state")
        parts = [torch.load(path, map_location="cpu", weights_only=True)["ema"] for path in ranks]
        return {name: torch.cat([p[i].reshape(-1) for p in parts])[:param.numel()].view(param.shape).float().clone()
                for i, (name, param) in enumerate(named)}
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"{directory}: not a checkpoint of any backend (no state.pt, zero3_rank*.pt or DCP "
                                f".metadata)")
    tensors = {name: torch.empty(param.shape, dtype=torch.float32) for name, param in named}
    state = {"ema": tensors} if kind == "ema" else {"roles": {role: {"model": tensors}}}
    dcp.load(state, checkpoint_id=directory)
    return tensors
