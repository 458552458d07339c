"""ODE-pair regression (docs/algorithms.md §6.4): the student maps each pair's noise x_T to ITS teacher output x_0.

This is DMD's regression regulariser used alone, DMD2's one-step initialisation and the ADM paper's ablation A1.
    L = mean((G(x_{t_k}) - x_0)^2),   x_{t_k} = x_T at k = 0 (pure noise), else the pair re-noised to t_k
with k ~ U{0..K-1} shared by all ranks for a K-step student. MSE in data space (DMD2's code uses LPIPS on decoded
images for SDXL; the toys live in pixel space already).
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from trainer.methods.base import LossOut, Method, Phase, StepContext
from trainer.sampling import student_predict
from trainer.sections import Section


class RegressionConfig(Section):
    """ODE-pair regression: the student maps each pair's noise to ITS teacher output (DMD's regression loss,
    DMD2's one-step initialisation, the ADM paper's ablation A1). MSE in data space. docs/algorithms.md "ODE-pair regression"."""
    name: Literal["regression"] = "regression"


class Regression(Method):
    trains = ("generator",)
    needs_pairs = True

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        return ()

    def phases(self, step):
        return [Phase("generator", ("generator",), self.generator_loss)]

    def generator_loss(self, ctx: StepContext) -> LossOut:
        timesteps = ctx.student_timesteps
        k = ctx.rand.shared_randint("regression_k", len(timesteps)) if len(timesteps) > 1 else 0
        x_in = ctx.pair_noise if k == 0 else ctx.student_denoiser.add_noise(
            ctx.pair_output, ctx.pair_noise, ctx.times(timesteps[k]))
        x0 = student_predict(ctx.student_denoiser, ctx.nets.generator, x_in, timesteps[k], ctx.cond,
                             ctx.conditioning_timestep)
        ctx._generator_x0 = x0
        loss = F.mse_loss(x0.float(), ctx.pair_output.float())
        return LossOut(loss, {"regression_mse": loss.detach()})
