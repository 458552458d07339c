"""Plain data parallel: every rank holds every role; gradients of the updated roles are all-reduced in `backward`.

No DDP wrapper: its reducer expects the same parameters to get gradients every iteration and breaks when roles are
frozen between phases. One flattened all-reduce per backward (one collective, not one per tensor).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from parallel.backend import Backend, skip_flag
from parallel.parallelize import ParallelizePlan


def converted(module: nn.Module, device=None, dtype=None) -> nn.Module:
    """`module` on `device` / with floating tensors in `dtype`, converted only when some tensor differs: under the
    planner's FakeTensorMode even a no-op `.to` / `.float()` swaps every parameter for a copy, which fails
    ("_apply(): Couldn't swap Linear.weight")."""
    tensors = [*module.parameters(), *module.buffers()]
    if device is not None and any(t.device != torch.device(device) for t in tensors):
        module = module.to(device)
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        module = module.to(dtype)
    return module


class DataParallelBackend(Backend):
    def __init__(self, dist_info, grad_clip: float = 10.0, ema_decay: float = 0.999,
                 plan: ParallelizePlan = ParallelizePlan()):
        super().__init__(plan)
        self.dist = dist_info
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        self.ema: nn.Module | None = None

    def wrap(self, role: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        module = converted(module, device=self.dist.device)
        if not trainable:
            module.requires_grad_(False).eval()
        elif self.dist.world_size > 1:
            # every rank must start from identical weights: rank 0's are broadcast (one collective per tensor,
            # at start-up only)
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)
        self.modules[role] = module
        return module

    def setup_ema(self, role: str = "generator") -> nn.Module:
        self.ema = converted(copy.deepcopy(self.modules[role]).requires_grad_(False), dtype=torch.float32)
        return self.ema

    def backward(self, loss: torch.Tensor, roles: tuple[str, ...]) -> None:
        loss.backward()
        if self.dist.world_size == 1:
            return
        grads = [p.grad for r in roles for p in self.modules[r].parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        # mean over ranks of per-rank means = mean over the global batch (equal local batches)
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_and_step(self, roles: tuple[str, ...], skip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        norms = {}
        for role in roles:
            params = [p for p in self.modules[role].parameters() if p.grad is not None]
            # returns the pre-clip total norm as a device tensor: no host sync here
            norms[role] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
            self.step_role(role, skip_flag(norms[role], skip))
        return norms

    @torch.no_grad()
    def ema_update(self, role: str = "generator") -> None:
        ema_params = list(self.ema.parameters())
        params = [p.float() for p in self.modules[role].parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.ema_decay)

    def full_state(self, role: str) -> dict[str, torch.Tensor]:
        module = self.ema if role == "ema" else self.modules[role]
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    # --- checkpoints: every rank holds everything, so rank 0 writes one file and every rank reads it ------------
    def save_state(self, directory: str) -> None:
        if self.dist.rank != 0:
            return
        state = {"roles": {r: self.full_state(r) for r in self.optimizers},
                 "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
                 "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
                 "ema": self.full_state("ema"), "torch_rng": torch.get_rng_state()}
        with open(os.path.join(directory, "state.pt"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def load_state(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        for role, sd in state["roles"].items():
            self.modules[role].load_state_dict(sd)
            self.optimizers[role].load_state_dict(state["optimizers"][role])
            self.schedulers[role].load_state_dict(state["schedulers"][role])
        self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])

