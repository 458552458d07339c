"""ADM: Adversarial Distribution Matching (Lu et al., ICCV 2025, arXiv 2507.18569). docs/algorithms.md §5.

From a generator sample x0g, draw t in [t_min + dt, t_max] and eps, x_t = a_t x0g + s_t eps; the teacher with CFG and
the fake score each take ONE ODE step of dt = T/64 from the same x_t:
    x_real = Step(x_t; teacher w/ CFG, t -> t - dt),   x_fake = Step(x_t; fake score, t -> t - dt)
Heads on taps of the frozen teacher backbone judge (x, t - dt, c) with the hinge loss (§5.2):
    L_D = E[max(0, 1 - D(x_real))] + E[max(0, 1 + D(x_fake))],   L_G = -E[D(x_fake)].
Phases in the paper's order (§5.4): fake_score, generator (every `ttur`-th step), discriminator.
Gradient flow (§5.3): the generator's gradient passes through the fake score's input and the frozen teacher backbone
(their weights frozen, never under no_grad); the discriminator phase sees detached inputs and updates heads only.

The two sides differ by O(dt / t) of a component they share, so the literal reading leaves the heads near chance
(§5.5). Other readings are options (`discriminator_input`, `adversarial_loss`, `gradient_penalty`, the head options,
`dt_frac`, `ttur`); `discriminator_input: step` with `adversarial_loss: hinge` is the paper's, by name.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trainer.denoiser import Prediction, cat_conditions
from trainer.guards import discriminator_accuracy
from trainer.losses import (hinge_discriminator_loss, hinge_generator_loss, paired_hinge_discriminator_loss,
                            paired_hinge_generator_loss)
from trainer import diagnostics
from trainer.methods.base import HeadOptions, LossOut, Phase, StepContext
from trainer.methods.dmd import DMD
from trainer.schedules import time_step_size


class ADMConfig(HeadOptions):
    """ADM (Lu et al. 2025): one ODE step of dt from the same x_t, hinge loss on teacher-backbone heads. docs/algorithms.md "ADM"."""
    name: Literal["adm"] = "adm"
    guidance_scale: float = Field(1.0, ge=0)
    t_min_frac: float = Field(0.02, ge=0, le=1)
    t_max_frac: float = Field(0.98, ge=0, le=1)
    dt_frac: float = Field(0.125, gt=0, lt=1, description="dt = dt_frac * T in network time units. 1/64 is the "
                           "paper's literal reading (the full-size recipes set it); 1/8, the default, was chosen on "
                           "the toy, where at 1/64 the discriminator stays at chance (docs/algorithms.md §5.5)")
    ttur: int = Field(1, gt=0)
    detach_fake_velocity: bool = False
    discriminator_input: Literal["step", "step_difference", "x0"] = Field(
        "step", description="step: the one-step latents at t - dt (the paper's); step_difference: the heads read "
        "features(x_step) - features(x_t) at t - dt, so they see the pair; x0: the two scores' x0 predictions at x_t, "
        "both re-noised with one fresh (t', eps'), t' ~ U[t_min, t_max] (a diffusion-GAN's input)")
    adversarial_loss: Literal["hinge", "paired_hinge"] = Field(
        "hinge", description="hinge: the paper's, per side; paired_hinge: a relativistic hinge on D(real) - D(fake) "
        "of the pair made from the same x_t (the shared component cancels); its generator phase costs one more teacher "
        "(CFG) and teacher-backbone forward, without gradient")
    gradient_penalty: float = Field(0.0, ge=0, description="R1 weight: E|grad of D(real) w.r.t. the heads' input "
                                    "features|^2 (the backbone is frozen; the features are the heads' input)")
    dmd_weight: float = Field(0.0, ge=0, description="weight of DMD's distribution-matching loss added to the "
                              "generator's adversarial loss (0: pure ADM, the paper's; the paper's ablation B3 uses DMD "
                              "alone after ADP); both read the same fake score, so it costs one teacher (CFG) and one "
                              "fake-score forward per generator step")
    diagnostics_every: int = Field(100, ge=0, description="steps between discriminator diagnostics (0: never): "
                                   "per-t hinge, accuracy, input distance and the adversarial gradient's cosine with "
                                   "the distribution-matching direction; a diagnostic step costs one more teacher "
                                   "(CFG), fake-score and teacher-backbone pass in the generator phase")


class ADM(DMD):
    trains = ("generator", "fake_score", "heads")

    @property
    def gathered_roles(self) -> tuple[str, ...]:
        return ("heads",) if self.cfg.gradient_penalty > 0 else ()   # R1 differentiates the heads twice

    def phases(self, step):
        phases = [Phase("fake_score", ("fake_score",), self.fake_score_loss)]
        if step % self.cfg.ttur == 0:
            phases.append(Phase("generator", ("generator",), self.generator_loss))
        phases.append(Phase("discriminator", ("heads",), self.discriminator_loss))
        return phases

    def step_times(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, u = t - dt) with t uniform over [t_min + dt, t_max] in native time (invariant 24)."""
        schedule = ctx.denoiser.schedule
        dt = time_step_size(schedule, self.cfg.dt_frac)
        t = schedule.timesteps_from_uniform(ctx.rand.uniform("adm_t"), self.cfg.t_min_frac, self.cfg.t_max_frac)
        lo, hi = self.cfg.t_min_frac * 1000.0, self.cfg.t_max_frac * 1000.0
        t = schedule.snap(lo + dt + (t - lo) * (hi - lo - dt) / (hi - lo))   # linear map onto [lo + dt, hi]
        return t, t - dt

    def noised_sample(self, ctx: StepContext, x0g: torch.Tensor):
        """(x_t, t, u): the generator's sample noised to t; the draws are the step's own (both phases share them)."""
        t, u = self.step_times(ctx)
        eps = ctx.rand.normal("adm_eps", ctx.data_shape)
        return ctx.denoiser.add_noise(x0g.float(), eps, t), t, u

    # --- the discriminator's input (discriminator_input) ---------------------------------------------------------
    def side(self, ctx: StepContext, pred: Prediction, x_t, t, u, through_x_t_only: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One side's discriminator input and the time shown with it [B]: the ODE step to u, or (discriminator_input
        x0) the x0 prediction re-noised with the step's one (t', eps'), the same for both sides.
        through_x_t_only (detach_fake_velocity, §10.2): the input keeps its value but its gradient reaches x_t
        directly, not through the score network (its Jacobian becomes the identity)."""
        x = pred.x0 if self.cfg.discriminator_input == "x0" else ctx.denoiser.ode_step(pred, x_t, t, u)
        if through_x_t_only:
            x = x_t + (x - x_t).detach()
        if self.cfg.discriminator_input != "x0":
            return x, u
        t_renoise = ctx.denoiser.schedule.timesteps_from_uniform(
            ctx.rand.uniform("adm_renoise_t"), self.cfg.t_min_frac, self.cfg.t_max_frac)
        return ctx.denoiser.add_noise(x, ctx.rand.normal("adm_renoise_eps", ctx.data_shape), t_renoise), t_renoise

    def fake_side(self, ctx: StepContext, x_t, t, u) -> tuple[torch.Tensor, torch.Tensor]:
        pred = ctx.denoiser.predict(ctx.nets.fake_score, x_t, t, ctx.cond)
        return self.side(ctx, pred, x_t, t, u, self.cfg.detach_fake_velocity)

    def real_side(self, ctx: StepContext, x_t, t, u) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (CFG) side, a constant for every phase."""
        with torch.no_grad():
            pred = ctx.denoiser.predict(ctx.nets.teacher, x_t, t, ctx.cond, ctx.uncond, self.cfg.guidance_scale)
            return self.side(ctx, pred, x_t, t, u)

    def heads_features(self, ctx: StepContext, inputs: list[torch.Tensor], time: torch.Tensor,
                       x_t: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
        """The heads' input for the inputs batched [inputs[0] ‖ inputs[1] ...] (one teacher-backbone pass, so a
        sharded teacher is gathered once): per tap [len(inputs) * B, ...]. step_difference subtracts the features
        of x_t at u, computed in a second pass without gradient."""
        count = len(inputs)
        features = ctx.denoiser.tapped_features(ctx.nets.teacher, torch.cat(inputs), torch.cat([time] * count),
                                                repeat_conditions(ctx.cond, count))
        if self.cfg.discriminator_input != "step_difference":
            return features
        with torch.no_grad():
            reference = ctx.denoiser.tapped_features(ctx.nets.teacher, x_t.detach(), u, ctx.cond)
        return [f - r.repeat(count, *([1] * (r.dim() - 1))) for f, r in zip(features, reference)]

    # --- losses ---------------------------------------------------------------------------------------------------
    def adversarial_generator_loss(self, ctx: StepContext, x_t, t, u) -> torch.Tensor:
        x_fake, time = self.fake_side(ctx, x_t, t, u)
        fake_logits = ctx.nets.heads(self.heads_features(ctx, [x_fake], time, x_t, u))
        if self.cfg.adversarial_loss == "paired_hinge":
            x_real, _ = self.real_side(ctx, x_t.detach(), t, u)
            with torch.no_grad():
                real_logits = ctx.nets.heads(self.heads_features(ctx, [x_real], time, x_t, u))
            return paired_hinge_generator_loss(real_logits, fake_logits)
        return hinge_generator_loss(fake_logits)

    def generator_loss(self, ctx: StepContext) -> LossOut:
        x0g = ctx.generator_x0()
        metrics = {}
        if diagnostics.due(self.cfg.diagnostics_every, ctx.step):
            # before the loss's own critic pass: the diagnostic pass's activations are freed by then, so the step's
            # peak memory (generator graph + one critic pass) is unchanged
            metrics.update(self.gradient_diagnostics(ctx, x0g))
        x_t, t, u = self.noised_sample(ctx, x0g)
        loss = self.adversarial_generator_loss(ctx, x_t, t, u)
        metrics["generator_adversarial"] = loss.detach()
        if self.cfg.dmd_weight > 0:
            dm_loss, dm_metrics = self.distribution_matching_loss(ctx, x0g)
            loss = loss + self.cfg.dmd_weight * dm_loss
            metrics.update(dm_metrics)
        return LossOut(loss, metrics)

    def gradient_diagnostics(self, ctx: StepContext, x0g: torch.Tensor) -> dict:
        """Cosine per t bucket between the adversarial loss's gradient w.r.t. the generator's sample and the
        distribution-matching direction at the same x_t. The gradient comes from a second, separate pass from the
        detached sample (only frozen weights in it), so the step's own graph and backward stay as they are."""
        sample = x0g.detach().float().requires_grad_(True)
        with torch.enable_grad():
            x_t, t, u = self.noised_sample(ctx, sample)
            (gradient,) = torch.autograd.grad(self.adversarial_generator_loss(ctx, x_t, t, u), sample)
        pair = ctx.denoiser.score_pair(ctx.nets.teacher, ctx.nets.fake_score, x_t.detach(), t, ctx.cond, ctx.uncond,
                                       self.cfg.guidance_scale)
        return diagnostics.bucket_means("gradient_cosine", diagnostics.gradient_cosine(gradient, pair.direction), t)

    def discriminator_loss(self, ctx: StepContext) -> LossOut:
        with torch.no_grad():
            x_t, t, u = self.noised_sample(ctx, ctx.generator_x0().detach())
            x_real, time = self.real_side(ctx, x_t, t, u)
            x_fake, _ = self.fake_side(ctx, x_t, t, u)
            features = self.heads_features(ctx, [x_real, x_fake], time, x_t, u)
        penalised = self.cfg.gradient_penalty > 0
        features = [f.detach().requires_grad_(penalised) for f in features]
        # the heads get views, not the leaves: a module called on leaf tensors cannot be differentiated with
        # autograd.grad under the planner's memory tracker (its backward hooks reject leaf nodes); a view is free
        logits = ctx.nets.heads([f.view_as(f) for f in features] if penalised else features)
        real_logits, fake_logits = logits.chunk(2)
        if self.cfg.adversarial_loss == "paired_hinge":
            loss = paired_hinge_discriminator_loss(real_logits, fake_logits)
        else:
            loss = hinge_discriminator_loss(real_logits, fake_logits)
        metrics = {"discriminator": loss.detach(), "logits_real": real_logits.detach().mean(),
                   "logits_fake": fake_logits.detach().mean(),
                   "disc_accuracy": discriminator_accuracy(real_logits.detach(), fake_logits.detach())}
        if penalised:
            penalty = r1_penalty(real_logits, features)
            loss = loss + self.cfg.gradient_penalty * penalty
            metrics["gradient_penalty"] = penalty.detach()
        if diagnostics.due(self.cfg.diagnostics_every, ctx.step):
            # bucketed by the time the heads are shown (t - dt; x0 reading: t')
            metrics.update(diagnostics.bucket_means(
                "hinge", diagnostics.per_sample_hinge(real_logits, fake_logits), time))
            metrics.update(diagnostics.bucket_means(
                "accuracy", diagnostics.per_sample_accuracy(real_logits, fake_logits), time))
            metrics.update(diagnostics.bucket_means(
                "input_distance", diagnostics.relative_distance(x_real, x_fake), time))
        return LossOut(loss, metrics, {"logits_real": real_logits.detach(), "logits_fake": fake_logits.detach()})


def repeat_conditions(cond, count: int):
    """The conditions of a batch made of `count` copies of this one."""
    out = cond
    for _ in range(count - 1):
        out = cat_conditions(out, cond)
    return out


def r1_penalty(real_logits: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """R1 (Mescheder et al. 2018) on the heads' input: E_real |d D / d features|^2, summed over taps. `features` hold
    the real rows first ([real ‖ fake], as the discriminator phase batches them); fake rows get zero gradient."""
    grads = torch.autograd.grad(real_logits.sum(), features, create_graph=True)
    rows = real_logits.shape[0]
    return sum(g[:rows].flatten(1).pow(2).sum(1) for g in grads).mean()
