"""Diffusion pre-training of the toy teacher (the `teacher` stage): denoising regression on real data.

Not a distillation method, but it runs through the same roles / phases / trainer so the teacher stage is resumable
and monitored like the rest. The trained role is `generator`; its EMA becomes the next stage's teacher.
"""
from __future__ import annotations

from trainer.losses import denoising_loss
from trainer.methods.base import LossOut, Method, Phase, StepContext


class DenoisePretrain(Method):
    trains = ("generator",)
    needs_real_data = True

    def __init__(self, cfg, family):
        super().__init__(cfg)
        self.family = family

    def phases(self, step):
        return [Phase("generator", ("generator",), self.generator_loss)]

    def generator_loss(self, ctx: StepContext) -> LossOut:
        """Ho et al. 2020 / Lipman et al. 2023: || net(x_t, t, c) - target ||^2 with t ~ U[0, T], label dropout
        with probability cfg_drop_prob so the same network also predicts unconditionally (Ho & Salimans 2022)."""
        x0 = ctx.real_x
        eps = ctx.rand.normal("denoise_noise", ctx.data_shape)
        t = ctx.denoiser.schedule.timesteps_from_uniform(ctx.rand.uniform("denoise_t"), 0.0, 1.0)
        drop = ctx.rand.uniform("cfg_drop") < self.cfg.cfg_drop_prob
        cond = self.family.drop_condition(ctx.real_cond["class_labels"], drop) if ctx.real_cond else {}
        x_t = ctx.denoiser.add_noise(x0, eps, t)
        native = ctx.nets.generator(x_t, t, **cond)
        loss = denoising_loss(native, ctx.denoiser.target(x0, eps, t))
        return LossOut(loss, {"denoise": loss.detach()})
