"""DMD2 (Yin et al., NeurIPS 2024, "Improved Distribution Matching Distillation"). docs/algorithms.md §3.

Extends DMD with a GAN: heads on the FAKE SCORE's tapped features ("classify mode"), a real-data branch, the
non-saturating loss and TTUR (critic every step, generator every `ttur`-th, 5 for SDXL).
- generator: L_DM + gen_gan_weight * softplus(-D(x_t'')), t'' ~ U[0, T) (diffusion GAN), its own (t'', noise):
  DMD2 draws them afresh in the generator step, not reusing the critic's. The fake score and the heads are frozen;
  the gradient reaches the generator through the fake score's activations.
- critic (fake score + heads, one phase, one optimizer step each): denoising loss
  + disc_gan_weight * (softplus(D(fake)) + softplus(-D(real))), real = training data noised the same way.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trainer.guards import discriminator_accuracy
from trainer.losses import nonsaturating_discriminator_loss, nonsaturating_generator_loss
from trainer.methods.base import HeadOptions, LossOut, Phase, StepContext
from trainer.methods.dmd import DMD, DMDConfig


class DMD2Config(DMDConfig, HeadOptions):
    """DMD2 (Yin et al. 2024b): DMD + GAN head on the fake score's features, real-data branch, TTUR.
    docs/algorithms.md "DMD2". head_taps: bottleneck reads the mid block only, as DMD2's classifier does (its
    strided-conv head is not reproduced: ours is the 2-D head of trainer/heads.py); the default reads every tap."""
    name: Literal["dmd2"] = "dmd2"  # type: ignore[assignment]
    ttur: int = Field(5, gt=0)
    gen_gan_weight: float = Field(5e-3, ge=0)
    disc_gan_weight: float = Field(1e-2, ge=0)


class DMD2(DMD):
    trains = ("generator", "fake_score", "heads")
    needs_real_data = True

    def phases(self, step):
        phases = []
        if step % self.cfg.ttur == 0:
            phases.append(Phase("generator", ("generator",), self.generator_loss))
        phases.append(Phase("critic", ("fake_score", "heads"), self.critic_loss))
        return phases

    def discriminator_logits(self, ctx: StepContext, x: torch.Tensor, purpose: str, cond) -> torch.Tensor:
        x_t, t, _ = self.noised(ctx, x, purpose, 0.0, 1.0)
        features = ctx.denoiser.tapped_features(ctx.nets.fake_score, x_t, t, cond)
        return ctx.nets.heads(features)

    def generator_loss(self, ctx: StepContext) -> LossOut:
        x = ctx.generator_x0()
        dm_loss, metrics = self.distribution_matching_loss(ctx, x)
        gan_loss = nonsaturating_generator_loss(self.discriminator_logits(ctx, x, "gan_generator", ctx.cond))
        metrics["generator_gan"] = gan_loss.detach()
        return LossOut(dm_loss + self.cfg.gen_gan_weight * gan_loss, metrics)

    def critic_loss(self, ctx: StepContext) -> LossOut:
        out = self.fake_score_loss(ctx)
        fake_logits = self.discriminator_logits(ctx, ctx.generator_x0().detach(), "gan_fake", ctx.cond)
        real_logits = self.discriminator_logits(ctx, ctx.real_x, "gan_real", ctx.real_cond)
        gan_loss = nonsaturating_discriminator_loss(real_logits, fake_logits)
        out.metrics.update(discriminator_gan=gan_loss.detach(), logits_real=real_logits.detach().mean(),
                           logits_fake=fake_logits.detach().mean(),
                           disc_accuracy=discriminator_accuracy(real_logits.detach(), fake_logits.detach()))
        return LossOut(out.loss + self.cfg.disc_gan_weight * gan_loss, out.metrics,
                       {"logits_real": real_logits.detach(), "logits_fake": fake_logits.detach()})
