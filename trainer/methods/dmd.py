"""DMD (Yin et al., CVPR 2024, "One-step Diffusion with Distribution Matching Distillation"). docs/algorithms.md §2.

Phases per step: generator (every `ttur`-th step) then fake_score.
- generator: L_DM with g = (x0_fake - x0_real) / mean|x - x0_real| at t ~ U[t_min, t_max]; both scores under
  no_grad (only the generator receives gradients). The real score is the teacher with CFG; the fake score has none.
- fake_score: denoising loss on the detached generator sample, t ~ U[0, T], in the teacher's native parameterisation.
The ODE-pair regression regulariser of the original DMD is the separate regression method (needs ODE pairs).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trainer.losses import denoising_loss, dmd_gradient, dmd_surrogate_loss
from trainer.methods.base import LossOut, Method, Phase, StepContext
from trainer.sections import Section


class DMDConfig(Section):
    """DMD (Yin et al. 2024): reverse-KL gradient + fake-score denoising. docs/algorithms.md "DMD"."""
    name: Literal["dmd"] = "dmd"
    guidance_scale: float = Field(1.0, ge=0)
    t_min_frac: float = Field(0.02, ge=0, le=1)
    t_max_frac: float = Field(0.98, ge=0, le=1)
    ttur: int = Field(1, gt=0, description="critic updates per generator update")


class DMD(Method):
    trains = ("generator", "fake_score")

    def phases(self, step):
        phases = []
        if step % self.cfg.ttur == 0:
            phases.append(Phase("generator", ("generator",), self.generator_loss))
        phases.append(Phase("fake_score", ("fake_score",), self.fake_score_loss))
        return phases

    # --- shared pieces (DMD2 and ADM reuse them) -------------------------------------------------------------
    def noised(self, ctx: StepContext, x: torch.Tensor, purpose: str, lo: float, hi: float):
        """(x_t, t, eps) with t ~ U[lo*T, hi*T] in the schedule's native time; draws keyed by `purpose`."""
        t = ctx.denoiser.schedule.timesteps_from_uniform(ctx.rand.uniform(f"{purpose}_t"), lo, hi)
        eps = ctx.rand.normal(f"{purpose}_eps", ctx.data_shape)
        return ctx.denoiser.add_noise(x, eps, t), t, eps

    def fake_score_loss(self, ctx: StepContext) -> LossOut:
        x = ctx.generator_x0().detach()
        x_t, t, eps = self.noised(ctx, x, "fake_score", 0.0, 1.0)
        native = ctx.nets.fake_score(x_t, t, **ctx.cond)
        loss = denoising_loss(native, ctx.denoiser.target(x, eps, t))
        return LossOut(loss, {"fake_score": loss.detach()})

    def distribution_matching_loss(self, ctx: StepContext, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x_t, t, _ = self.noised(ctx, x.detach(), "dm", self.cfg.t_min_frac, self.cfg.t_max_frac)
        pair = ctx.denoiser.score_pair(ctx.nets.teacher, ctx.nets.fake_score, x_t, t, ctx.cond, ctx.uncond,
                                       self.cfg.guidance_scale)
        gradient = dmd_gradient(x.detach().float(), pair.x0_real, pair.direction)
        loss = dmd_surrogate_loss(x.float(), gradient)
        return loss, {"dmd": loss.detach(), "dmd_gradient_norm": gradient.detach().flatten(1).norm(dim=1).mean()}

    def generator_loss(self, ctx: StepContext) -> LossOut:
        loss, metrics = self.distribution_matching_loss(ctx, ctx.generator_x0())
        return LossOut(loss, metrics)
