"""ADM's readings as options (docs/algorithms.md §5.5), the discriminator diagnostics (trainer/diagnostics.py) and the
DMD2 fidelity details (docs/algorithms.md §3): identical critics give identical discriminator inputs under every
reading, the diagnostics' cosine is measured against the distribution-matching direction, and sparse buckets log."""
from collections import defaultdict

import pytest
import torch

from tests.helpers import distill_trainer, pretrain_trainer
from trainer import diagnostics
from trainer.losses import dmd_gradient, dmd_surrogate_loss, paired_hinge_discriminator_loss


@pytest.mark.parametrize("reading,loss_at_identity", [("step", 2.0), ("step_difference", 2.0), ("x0", 2.0),
                                                      ("paired_hinge", 1.0)])
def test_identical_critics_give_identical_sides(tmp_path, reading, loss_at_identity):
    """Fake score == teacher at init, no CFG: both sides are the same tensor under every reading, so the hinge sits
    at 2 (|D| < 1) and the paired hinge at exactly 1; the diagnostics see accuracy 0.5 and input distance 0."""
    option = ("distill.method.adversarial_loss=paired_hinge" if reading == "paired_hinge"
              else f"distill.method.discriminator_input={reading}")
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.method.guidance_scale=1.0",
                              "distill.method.gradient_penalty=0.0", option)
    ctx = trainer.make_context(0)
    x_t, t, u = trainer.method.noised_sample(ctx, ctx.generator_x0().detach())
    x_real, time_real = trainer.method.real_side(ctx, x_t, t, u)
    x_fake, time_fake = trainer.method.fake_side(ctx, x_t, t, u)
    assert torch.equal(x_real, x_fake) and torch.equal(time_real, time_fake)
    if reading == "x0":   # shown at a fresh t', not t - dt
        assert not torch.allclose(time_real, u)
    out = trainer.method.discriminator_loss(ctx)
    assert out.loss.item() == pytest.approx(loss_at_identity, abs=1e-6)
    assert out.metrics["diagnostics/input_distance"].item() == 0.0
    assert out.metrics["diagnostics/accuracy"].item() == 0.5


def test_readings_train_and_the_penalty_reaches_the_heads(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.method.gradient_penalty=1.0",
                              "distill.method.head_norm=true", "distill.method.head_hidden=32",
                              "distill.method.discriminator_input=step_difference",
                              "distill.method.adversarial_loss=paired_hinge")
    heads = trainer.nets.heads
    assert heads.heads[0][0].out_features == 32 and isinstance(heads.heads[0][1], torch.nn.LayerNorm)
    ctx = trainer.make_context(0)
    out = trainer.method.discriminator_loss(ctx)
    assert out.metrics["gradient_penalty"] > 0
    out.loss.backward()
    assert all(p.grad is not None for p in heads.parameters())
    sums = defaultdict(list)
    for step in range(2):
        trainer.train_step(step, sums)
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.reduce_metrics(sums).values())


def test_gradient_cosine_is_measured_against_the_distribution_matching_direction(tmp_path):
    """DMD's own loss, built on Denoiser.score_pair's direction, has cosine exactly 1 with it; ADM's adversarial
    gradient, measured by the same diagnostic, lies in [-1, 1] and changes sign with the discriminator's sign."""
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.method.guidance_scale=2.0")
    ctx = trainer.make_context(0)
    x0g = ctx.generator_x0().detach()
    x_t, t, _ = trainer.method.noised_sample(ctx, x0g)
    pair = ctx.denoiser.score_pair(ctx.nets.teacher, ctx.nets.fake_score, x_t, t, ctx.cond, ctx.uncond, 2.0)
    sample = x0g.clone().requires_grad_(True)
    (dmd_grad,) = torch.autograd.grad(dmd_surrogate_loss(sample, dmd_gradient(x0g, pair.x0_real, pair.direction)),
                                      sample)
    assert torch.allclose(diagnostics.gradient_cosine(dmd_grad, pair.direction), torch.ones(len(x0g)), atol=1e-5)

    cosine = trainer.method.gradient_diagnostics(ctx, x0g)
    assert -1 <= cosine["diagnostics/gradient_cosine"].item() <= 1
    with torch.no_grad():   # D -> -D: the adversarial gradient, and so every cosine, flips sign
        last = trainer.nets.heads.heads
        for head in last:
            head[-1].weight.neg_()
            head[-1].bias.neg_()
    flipped = trainer.method.gradient_diagnostics(ctx, x0g)
    assert torch.allclose(flipped["diagnostics/gradient_cosine"], -cosine["diagnostics/gradient_cosine"], atol=1e-5)


def test_bucket_means_and_sparse_reduction(tmp_path):
    values = torch.tensor([1.0, 3.0, 10.0, 20.0])
    t = torch.tensor([10.0, 200.0, 600.0, 999.0])
    out = diagnostics.bucket_means("x", values, t)
    assert out["diagnostics/x_t0-250"] == 2.0 and out["diagnostics/x_t500-750"] == 10.0
    assert torch.isnan(out["diagnostics/x_t250-500"]) and out["diagnostics/x"] == 8.5
    # the trainer's window reduction: an empty bucket on one step is skipped, an empty bucket everywhere dropped,
    # a NaN loss stays NaN
    trainer = distill_trainer(tmp_path, "distill.method.name=adm")
    sums = {"metrics/diagnostics/x_t250-500": [torch.tensor(float("nan")), torch.tensor(4.0)],
            "metrics/diagnostics/x_t0-250": [torch.tensor(float("nan"))],
            "loss/generator": [torch.tensor(float("nan")), torch.tensor(1.0)]}
    reduced = trainer.reduce_metrics(sums)
    assert reduced["metrics/diagnostics/x_t250-500"] == 4.0 and "metrics/diagnostics/x_t0-250" not in reduced
    assert reduced["loss/generator"] != reduced["loss/generator"]


def test_paired_hinge_cancels_the_shared_part():
    real, fake = torch.tensor([5.0, -3.0]), torch.tensor([4.5, -3.5])
    assert paired_hinge_discriminator_loss(real, fake) == paired_hinge_discriminator_loss(real - 7, fake - 7) == 0.5


def test_adp_diagnostics_per_renoising_time(tmp_path):
    trainer = pretrain_trainer(tmp_path, "pretrain.method.name=adp")
    out = trainer.method.discriminator_loss(trainer.make_context(0))
    keys = [k for k in out.metrics if k.startswith("diagnostics/latent_hinge_t")]
    assert len(keys) == diagnostics.BUCKETS and 0 <= out.metrics["diagnostics/latent_accuracy"] <= 1
    assert "diagnostics/pixel_accuracy" in out.metrics
    assert "diagnostics/latent_hinge" not in trainer.method.discriminator_loss(trainer.make_context(1)).metrics


def test_dmd2_generator_gan_draws_its_own_times(tmp_path):
    """DMD2 draws the generator's GAN (t, noise) afresh; the critic's are its own (they used to be reused)."""
    trainer = distill_trainer(tmp_path, "distill.method.name=dmd2", "distill.method.head_taps=bottleneck")
    assert len(trainer.nets.heads.heads) == 1 and trainer.nets.heads.use == [len(trainer.family.cfg.taps) - 1]
    seen = []
    fake_score = trainer.nets.fake_score
    original = fake_score.forward

    def recording(x, t, *args, taps_only=False, **kwargs):
        if taps_only:
            seen.append(t.detach().clone())
        return original(x, t, *args, taps_only=taps_only, **kwargs)

    fake_score.forward = recording
    ctx = trainer.make_context(0)
    ctx.generator_trains = True
    trainer.method.generator_loss(ctx)
    trainer.method.critic_loss(ctx)
    generator_gan_t, critic_fake_t = seen[0], seen[1]
    assert not torch.equal(generator_gan_t, critic_fake_t)
