"""ADP: Adversarial Distillation Pre-training (Lu et al., ICCV 2025, §3.3). docs/algorithms.md §6; invariants 25-26.

Data: teacher ODE pairs (x_T, x_0) (trainer.collect). The student sees the straight path between them
    x_t = (1 - t/T) x_0 + (t/T) x_T,   t = (1 - u^3) T (cubic, biased to high noise),   x0_hat = x_t - (t/T) v_hat
so at t = T its input is exactly the stored noise. Two hinge discriminators judge x0_hat against the pairs' x_0:
- latent D1: frozen teacher backbone + heads; both sides re-noised with fresh noise to t' ~ U(0, T) (uniform, unlike
  the generator's cubic times), judged at (t', c);
- pixel D2: the frozen `pixel_backbone` role (decode to pixels, then SAM / DINOv2 / the toy's classifier) + heads.
    L_G = -(l1 E[D1(renoise(x0_hat))] + l2 E[D2(x0_hat)])
    L_D = l1 (E[max(0, 1 - D1(renoise(x_0)))] + E[max(0, 1 + D1(renoise(x0_hat)))])
        + l2 (E[max(0, 1 - D2(x_0))]            + E[max(0, 1 + D2(x0_hat))])
Gradient flow: the generator's gradient passes through the frozen teacher backbone, the decoder and the vision
backbone into x0_hat (frozen weights, never under no_grad); the discriminator phase detaches its inputs.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainer.denoiser import cat_conditions
from trainer.guards import discriminator_accuracy
from trainer.heads import HybridHeads
from trainer.losses import hinge_discriminator_loss, hinge_generator_loss
from trainer import diagnostics
from trainer.methods.base import HeadOptions, LossOut, Method, Phase, StepContext
from trainer.schedules import NUM_TRAIN_TIMESTEPS, cubic_timesteps


class ADPConfig(HeadOptions):
    """ADP (Lu et al. 2025 §3.3; docs/algorithms.md "ADP"): velocity on the straight path between the pair's noise and
    the teacher's output at cubic high-noise timesteps; hybrid hinge discriminators (latent: frozen teacher backbone +
    heads on re-noised samples; pixel: decode -> frozen vision backbone + heads)."""
    name: Literal["adp"] = "adp"
    latent_weight: float = Field(0.85, ge=0, le=1, description="lambda1: latent discriminator")
    pixel_weight: float = Field(0.15, ge=0, le=1, description="lambda2: pixel discriminator; lambda1 + lambda2 = 1")
    timestep_power: float = Field(3.0, gt=0, description="student times t = (1 - u^p) T; 3: the paper's cubic")
    renoise_t_min_frac: float = Field(0.0, ge=0, le=1, description="latent D re-noising t' ~ U[min, max] * T")
    renoise_t_max_frac: float = Field(1.0, ge=0, le=1)
    share_renoise: bool = Field(False, description="real and fake share (t', noise); default independent "
                                "(docs/algorithms.md \"Open choices\")")
    velocity_mse_weight: float = Field(0.0, ge=0, description="an optional velocity-MSE term on the pairs "
                                       "(docs/algorithms.md \"Open choices\")")
    diagnostics_every: int = Field(100, ge=0, description="steps between discriminator diagnostics (0: never): the "
                                   "latent D's hinge and accuracy per re-noising time t', the pixel D's accuracy")


class ADP(Method):
    trains = ("generator", "heads")
    needs_pairs = True

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        return (("teacher",) if self.cfg.latent_weight > 0 else ()) + (
            ("pixel_backbone",) if self.cfg.pixel_weight > 0 else ())

    def build_heads(self, family) -> HybridHeads:
        return HybridHeads(super().build_heads(family), family.build_pixel_heads() if self.cfg.pixel_weight > 0 else None)

    def phases(self, step):
        return [Phase("generator", ("generator",), self.generator_loss),
                Phase("discriminator", ("heads",), self.discriminator_loss)]

    # --- the student on the pairs' straight path (§6.2) ---------------------------------------------------
    def student_times(self, ctx: StepContext) -> torch.Tensor:
        """t = (1 - u^p) T in network time [B]: support (0, T]; p = 3 gives P(t > 0.9T) = 0.464 (invariant 10)."""
        return cubic_timesteps(ctx.rand.uniform("adp_t"), NUM_TRAIN_TIMESTEPS, self.cfg.timestep_power)

    def student_input(self, ctx: StepContext, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t/T) x_0 + (t/T) x_T: the generator's flow schedule's noising with the pair's own noise."""
        return ctx.student_denoiser.add_noise(ctx.pair_output, ctx.pair_noise, t)

    def student_prediction(self, ctx: StepContext):
        """The generator's prediction on this step's pairs, computed once and shared by both phases (made again with
        its graph when a critic phase made it without: StepContext.keep_generator_graph)."""
        with_graph = ctx.generator_trains and ctx.keep_generator_graph
        if ctx._generator_x0 is None or (with_graph and ctx._generator_x0.grad_fn is None):
            t = self.student_times(ctx)
            with torch.set_grad_enabled(with_graph):
                ctx._generator_prediction = ctx.student_denoiser.predict(
                    ctx.nets.generator, self.student_input(ctx, t), t, ctx.cond)
            ctx._generator_x0 = ctx._generator_prediction.x0
        return ctx._generator_prediction

    # --- discriminators (§6.3) -------------------------------------------------------------------------------
    def renoise(self, ctx: StepContext, x0: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t', t'): x0 re-noised in the teacher's schedule with t' ~ U[min, max] * T; real and fake draw from the
        same distribution, independently unless share_renoise (§10.9)."""
        key = "adp_renoise" if self.cfg.share_renoise else f"adp_renoise_{side}"
        t = ctx.denoiser.schedule.timesteps_from_uniform(ctx.rand.uniform(f"{key}_t"), self.cfg.renoise_t_min_frac,
                                                         self.cfg.renoise_t_max_frac)
        eps = ctx.rand.normal(f"{key}_eps", ctx.data_shape)
        return ctx.denoiser.add_noise(x0.float(), eps, t), t

    def latent_features(self, ctx: StepContext, x_t: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
        return ctx.denoiser.tapped_features(ctx.nets.teacher, x_t, t, cond)

    def generator_loss(self, ctx: StepContext) -> LossOut:
        pred = self.student_prediction(ctx)
        x0 = pred.x0
        loss, metrics = x0.new_zeros(()).float(), {}
        if self.cfg.latent_weight > 0:
            x_t, t = self.renoise(ctx, x0, "fake")
            latent = hinge_generator_loss(ctx.nets.heads(self.latent_features(ctx, x_t, t, ctx.cond), "latent"))
            loss = loss + self.cfg.latent_weight * latent
            metrics["generator_latent"] = latent.detach()
        if self.cfg.pixel_weight > 0:
            pixel = hinge_generator_loss(ctx.nets.heads(ctx.nets.pixel_backbone(x0.float()), "pixel"))
            loss = loss + self.cfg.pixel_weight * pixel
            metrics["generator_pixel"] = pixel.detach()
        if self.cfg.velocity_mse_weight > 0:   # §10.8 option: v_target = x_T - x_0
            mse = F.mse_loss(pred.native.float(), (ctx.pair_noise - ctx.pair_output).float())
            loss = loss + self.cfg.velocity_mse_weight * mse
            metrics["velocity_mse"] = mse.detach()
        return LossOut(loss, metrics)

    def discriminator_loss(self, ctx: StepContext) -> LossOut:
        fake = self.student_prediction(ctx).x0.detach().float()
        real = ctx.pair_output.float()
        loss, metrics, histograms = fake.new_zeros(()), {}, {}
        if self.cfg.latent_weight > 0:
            with torch.no_grad():
                (x_real, t_real), (x_fake, t_fake) = self.renoise(ctx, real, "real"), self.renoise(ctx, fake, "fake")
                # one backbone pass for both sides: a sharded teacher is gathered once per phase
                features = self.latent_features(ctx, torch.cat([x_real, x_fake]), torch.cat([t_real, t_fake]),
                                                cat_conditions(ctx.cond, ctx.cond))
            real_logits, fake_logits = ctx.nets.heads([f.detach() for f in features], "latent").chunk(2)
            latent = hinge_discriminator_loss(real_logits, fake_logits)
            loss = loss + self.cfg.latent_weight * latent
            metrics.update(discriminator_latent=latent.detach(), logits_real=real_logits.detach().mean(),
                           logits_fake=fake_logits.detach().mean(),
                           disc_accuracy=discriminator_accuracy(real_logits.detach(), fake_logits.detach()))
            histograms.update(logits_real=real_logits.detach(), logits_fake=fake_logits.detach())
            if diagnostics.due(self.cfg.diagnostics_every, ctx.step):
                metrics.update(self.latent_diagnostics(real_logits, fake_logits, t_real, t_fake))
        if self.cfg.pixel_weight > 0:
            with torch.no_grad():
                features = ctx.nets.pixel_backbone(torch.cat([real, fake]))
            real_logits, fake_logits = ctx.nets.heads([f.detach() for f in features], "pixel").chunk(2)
            pixel = hinge_discriminator_loss(real_logits, fake_logits)
            loss = loss + self.cfg.pixel_weight * pixel
            metrics.update(discriminator_pixel=pixel.detach(), pixel_logits_real=real_logits.detach().mean(),
                           pixel_logits_fake=fake_logits.detach().mean())
            if diagnostics.due(self.cfg.diagnostics_every, ctx.step):
                metrics["diagnostics/pixel_accuracy"] = discriminator_accuracy(real_logits.detach(),
                                                                               fake_logits.detach())
            histograms.update(pixel_logits_real=real_logits.detach(), pixel_logits_fake=fake_logits.detach())
        metrics["discriminator"] = loss.detach()
        return LossOut(loss, metrics, histograms)

    @staticmethod
    def latent_diagnostics(real_logits, fake_logits, t_real, t_fake) -> dict:
        """The latent D's hinge and accuracy per re-noising-time bucket. Real and fake rows have their own t' unless
        share_renoise, so each side is bucketed by its own time: a bucket's hinge is twice its mean side term (the
        two-sided hinge's expectation when the sides are equally represented)."""
        times = torch.cat([t_real, t_fake])
        side_hinge = torch.cat([torch.relu(1.0 - real_logits.detach()), torch.relu(1.0 + fake_logits.detach())])
        side_correct = torch.cat([(real_logits.detach() > 0).float(), (fake_logits.detach() < 0).float()])
        return {**diagnostics.bucket_means("latent_hinge", 2.0 * side_hinge, times),
                **diagnostics.bucket_means("latent_accuracy", side_correct, times)}
