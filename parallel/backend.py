"""The small surface every backend implements (docs/parallelism.md "Backends"). Methods never touch it; it never
knows which method runs. parallel/backends.py picks the implementation named by `parallel.backend`."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from parallel.loading import load_full_state
from parallel.parallelize import ParallelizePlan, prepare_role
from parallel.sequence import SequenceShards


class Backend:
    """Owns the roles' placement, optimizers, EMA and gradient reduction.

    build_role(role, build, source, trainable)
                             build a role (meta device / zero.Init in sharded backends), place it, load its weights
                             from a StateSource slice by slice; returns the module to call
    wrap(role, module)       place an already built role (shard, replicate)
    frozen(*roles)           context: parameters of those roles do not require grad (input grads still flow)
    backward(loss, roles)    one backward; reduce the roles' gradients across data-parallel ranks
    clip_and_step(roles, skip)
                             clip each role's gradient, step its optimizer unless `skip` (a 0/1 device flag) or
                             the gradient norm is non-finite; returns {role: pre-clip norm} device tensors
    ema_update()             update the generator's fp32 EMA from its fp32 master weights
    full_state(role)         full (unsharded) state dict of a role; called on all ranks
    """

    def __init__(self, plan: ParallelizePlan = ParallelizePlan()):
        self.plan = plan                     # attention, activation checkpointing, blocks (parallel/parallelize.py)
        self.sequence = SequenceShards()     # this rank's sequence-parallel group (sharded backends with sp > 1)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}

    def wrap(self, role: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        raise NotImplementedError

    def build_role(self, role: str, build, source=None, trainable: bool = True) -> nn.Module:
        """Build a role with `build()`, place it, and load its weights from `source` (a parallel.loading
        StateSource) if given. Sharded backends override this so that no rank materialises the full role."""
        module = build()
        prepare_role(role, module, self.plan, self.sequence)
        if source is not None:
            load_full_state(module, source)
        return self.wrap(role, module, trainable)

    def setup_optimizer(self, role: str, cfg) -> None:
        """One optimizer per trainable role, on the placed (possibly sharded) parameters, before any forward."""
        self.optimizers[role], self.schedulers[role] = make_optimizer(
            [p for p in self.modules[role].parameters() if p.requires_grad], cfg)   # LoRA: the adapters only

    def step_role(self, role: str, skip: torch.Tensor | None = None) -> None:
        """skip: 0/1 device flag handed to the fused AdamW as `found_inf` (as torch's GradScaler does): at 1 the
        kernel leaves parameters, moments and step count untouched; no host sync."""
        optimizer = self.optimizers[role]
        if skip is not None:
            optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            optimizer.__dict__.pop("found_inf", None)
        self.schedulers[role].step()
        optimizer.zero_grad(set_to_none=True)

    def lr(self, role: str) -> float:
        return self.optimizers[role].param_groups[0]["lr"]

    def full_grads(self, role: str) -> dict[str, torch.Tensor]:
        """Full fp32 gradients of a role after backward and before the step (tests; collective under sharding)."""
        return {n: p.grad.detach().float().cpu().clone() for n, p in self.modules[role].named_parameters()
                if p.grad is not None}

    def local_param_bytes(self, role: str) -> int:
        """Bytes of the role's parameters held by this rank."""
        return sum(p.numel() * p.element_size() for p in self.modules[role].parameters())

    def compute_context(self):
        """Context the methods' forwards run in (ZeRO-3 bf16: autocast, since its partitioned modules hold bf16
        weights and, unlike FSDP2's policy, cast no inputs)."""
        return contextlib.nullcontext()

    def warm_up(self, example_inputs: dict) -> None:
        """Backends whose lazy initialisation must see each trainable role trainable once (FSDP2 + bf16)."""

    @contextlib.contextmanager
    def frozen(self, modules: list[nn.Module]) -> Iterator[None]:
        """Freeze parameters (never `no_grad`: ADM backprops through the fake score and the teacher backbone)."""
        saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)


def skip_flag(norm: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """The found_inf a backend hands its optimizer: a non-finite gradient norm, or the caller's flag (trainer/guards)."""
    bad = (~torch.isfinite(norm)).float().reshape(())
    return bad if skip is None else torch.maximum(bad, skip.to(bad.device))


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Put a warm-up LambdaLR (and its optimizer's learning rates) at `steps` steps, as after that many steps."""
    scheduler.last_epoch = steps
    groups = scheduler.optimizer.param_groups
    for group, lr_lambda, base in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base * lr_lambda(steps)
    scheduler._last_lr = [group["lr"] for group in groups]


def make_optimizer(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (DMD2: betas (0.9, 0.999), weight decay 0.01) with a linear warm-up then constant LR. Fused: one
    kernel per parameter group, and it takes the guards' found_inf flag (skip on the device)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.warmup_steps))
