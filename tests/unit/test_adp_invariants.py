"""docs/algorithms.md §9 invariants 25-26 (ADP) and 10 (cubic times as ADP draws them), ADP's and the regression
method's gradient flow, and the recipe checks that keep ADP well-formed. Real trainer, real pairs, tiny toy."""
import pytest
import torch

from tests.helpers import pretrain_trainer, tiny_recipe
from trainer.config import RecipeError
from trainer.losses import hinge_discriminator_loss, hinge_generator_loss


@pytest.fixture
def adp(tmp_path):
    return pretrain_trainer(tmp_path, "pretrain.method.name=adp")


def test_invariant_26_student_input_and_velocity_target(adp):
    ctx = adp.make_context(0)
    t_max = torch.full((len(ctx.pair_noise),), 1000.0)
    # at t = T the student's input IS the stored noise, bit for bit
    assert torch.equal(adp.method.student_input(ctx, t_max), ctx.pair_noise)
    # x_t - (t/T) (x_T - x_0) == x_0 for the target velocity, at any t
    x0, xT = ctx.pair_output.double(), ctx.pair_noise.double()
    t = torch.rand(len(x0), dtype=torch.float64) * 1000
    x_t = ctx.student_denoiser.add_noise(x0, xT, t)
    assert torch.allclose(x_t - (t / 1000)[:, None] * (xT - x0), x0, atol=1e-12)
    # and the student's x0-hat for that target velocity is the pair's output
    assert torch.allclose(ctx.student_denoiser.to_views(xT - x0, x_t, t).x0, x0, atol=1e-12)


def test_invariant_10_cubic_times_as_adp_draws_them(adp):
    from parallel.randomness import StepRandom
    ctx = adp.make_context(0)
    ctx.rand = StepRandom(0, 0, range(100_000))
    t = adp.method.student_times(ctx)
    assert t.min() > 0 and t.max() <= 1000
    assert abs((t > 900).float().mean().item() - 0.464) < 0.01
    assert abs(t.median().item() - 875) < 5


def test_invariant_25_latent_only_equals_latent_hinge(tmp_path):
    """lambda2 = 0: the hybrid losses equal the latent-only hinge losses computed by hand."""
    trainer = pretrain_trainer(tmp_path, "pretrain.method.latent_weight=1.0", "pretrain.method.pixel_weight=0.0")
    assert trainer.nets.pixel_backbone is None and trainer.method.frozen_roles == ("teacher",)
    ctx = trainer.make_context(0)
    method, nets = trainer.method, trainer.nets
    g = method.generator_loss(ctx)
    x_t, t = method.renoise(ctx, ctx._generator_x0, "fake")
    by_hand = hinge_generator_loss(nets.heads(ctx.denoiser.tapped_features(nets.teacher, x_t, t, ctx.cond)))
    assert torch.equal(g.loss, by_hand)
    d = method.discriminator_loss(ctx)
    logits = [nets.heads(ctx.denoiser.tapped_features(nets.teacher, *method.renoise(ctx, x, side), ctx.cond))
              for x, side in ((ctx.pair_output, "real"), (ctx._generator_x0.detach(), "fake"))]
    assert torch.allclose(d.loss, hinge_discriminator_loss(*logits), rtol=1e-6, atol=0)


def test_invariant_25_hybrid_is_the_weighted_sum(adp):
    ctx = adp.make_context(0)
    g, d = adp.method.generator_loss(ctx), adp.method.discriminator_loss(ctx)
    assert torch.allclose(g.loss, 0.85 * g.metrics["generator_latent"] + 0.15 * g.metrics["generator_pixel"])
    assert torch.allclose(d.loss, 0.85 * d.metrics["discriminator_latent"] + 0.15 * d.metrics["discriminator_pixel"])
    # the pixel branch judges the decoded samples through the frozen backbone
    pixel = hinge_discriminator_loss(adp.nets.heads(adp.nets.pixel_backbone(ctx.pair_output), "pixel"),
                                     adp.nets.heads(adp.nets.pixel_backbone(ctx._generator_x0.detach()), "pixel"))
    assert torch.allclose(d.metrics["discriminator_pixel"], pixel)


def test_invariant_25_weights_sum_to_one(tmp_path):
    with pytest.raises(RecipeError, match="latent_weight \\+ pixel_weight must be 1"):
        tiny_recipe(tmp_path, "pretrain.method.pixel_weight=0.3")


def test_invariant_25_real_and_fake_renoised_alike(adp):
    """D1's real and fake sides draw t' from the same uniform distribution, independently by default (§10.9) and
    identically with share_renoise."""
    from parallel.randomness import StepRandom
    ctx = adp.make_context(0)
    ctx.rand = StepRandom(0, 0, range(20_000))
    x = torch.zeros(20_000, ctx.data_shape[0])
    (_, t_real), (_, t_fake) = adp.method.renoise(ctx, x, "real"), adp.method.renoise(ctx, x, "fake")
    for t in (t_real, t_fake):
        assert t.min() >= 0 and t.max() <= 1000
        assert abs(t.mean().item() - 500) < 10 and abs(t.std().item() - 1000 / 12 ** 0.5) < 10
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert torch.allclose(t_real.quantile(quantiles), t_fake.quantile(quantiles), atol=15)
    assert not torch.equal(t_real, t_fake)
    adp.method.cfg.share_renoise = True
    (x_r, t_r), (x_f, t_f) = adp.method.renoise(ctx, x, "real"), adp.method.renoise(ctx, x, "fake")
    assert torch.equal(t_r, t_f) and torch.equal(x_r, x_f)


def grads_of(trainer) -> set[str]:
    return {role for role, module in trainer.nets.present().items()
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())}


@pytest.mark.parametrize("method", ["adp", "regression"])
def test_pretrain_gradient_flow(tmp_path, method):
    """Generator phase: only the generator's weights get gradients (through the frozen teacher backbone and the
    frozen pixel backbone, never under no_grad); discriminator phase: only the heads'."""
    trainer = pretrain_trainer(tmp_path, f"pretrain.method.name={method}")
    expected_roles = {"adp": {"generator", "teacher", "pixel_backbone", "heads"}, "regression": {"generator"}}
    assert set(trainer.nets.present()) == expected_roles[method]
    for step in range(2):
        ctx = trainer.make_context(step)
        for phase in trainer.method.phases(step):
            trainer.phase_backward(phase, [ctx])
            assert grads_of(trainer) == set(phase.updates), phase.name
            for role, module in trainer.nets.present().items():
                if role not in phase.updates:
                    assert all(p.grad is None for p in module.parameters()), (phase.name, role)
            trainer.backend.clip_and_step(phase.updates)
    assert all(not p.requires_grad for p in trainer.nets.teacher.parameters()) if method == "adp" else True


def test_adp_generator_gradient_passes_through_both_backbones(adp):
    """Each discriminator alone gives the generator a gradient: the latent path runs through the frozen teacher,
    the pixel path through the frozen pixel backbone."""
    for latent, pixel in ((1.0, 0.0), (0.0, 1.0)):
        adp.method.cfg.latent_weight, adp.method.cfg.pixel_weight = latent, pixel
        ctx = adp.make_context(0)
        adp.phase_backward(adp.method.phases(0)[0], [ctx])
        norm = sum(p.grad.abs().sum() for p in adp.nets.generator.parameters() if p.grad is not None)
        assert norm > 0, (latent, pixel)
        adp.nets.generator.zero_grad(set_to_none=True)


def test_regression_loss_zero_at_the_pairs(tmp_path):
    """An oracle generator that outputs the pairs' x0 has zero regression loss; the method's input at k = 0 is the
    pair's noise."""
    trainer = pretrain_trainer(tmp_path, "pretrain.method.name=regression")
    ctx = trainer.make_context(0)
    target, noise = ctx.pair_output, ctx.pair_noise

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, class_labels=None):
            assert torch.equal(x_t, noise)
            return (x_t - target) / (t / 1000)[:, None]    # flow velocity whose x0 view is the pair's output

    ctx.nets.generator = Oracle()
    assert trainer.method.generator_loss(ctx).loss.item() < 1e-10


def test_pairs_prompts_condition_the_student(adp):
    """The student sees each pair's noise with the prompt (class) the teacher used for it."""
    ctx = adp.make_context(0)
    labels = ctx.cond["class_labels"]
    batch = adp.data_source.stream.dataset   # the stream's own samples carry the labels written at collect time
    by_id = {int(batch[i]["id"]): int(batch[i]["label"]) for i in range(batch.num_samples)}
    noise_rows = {tuple(batch[i]["noise"][:4].tolist()): int(batch[i]["label"]) for i in range(batch.num_samples)}
    for row, label in zip(ctx.pair_noise, labels):
        assert noise_rows[tuple(row[:4].tolist())] == int(label)
    assert len(by_id) == 32


def test_toy_pixel_backbone_is_not_the_evaluation_classifier(adp):
    """The toy's pixel backbone is trained on the split disjoint from the evaluation classifier's (data/toy.py):
    same architecture, other data, other weights; its features feed ADP's pixel heads."""
    from trainer.evaluation import train_classifier
    dataset = adp.family.dataset
    assert not set(dataset.classifier_idx.tolist()) & set(dataset.classifier_b_idx.tolist())
    evaluation = train_classifier(dataset).state_dict()
    backbone = adp.nets.pixel_backbone.state_dict()
    assert evaluation.keys() == backbone.keys()
    assert all(not torch.equal(evaluation[k], backbone[k]) for k in evaluation)
    assert torch.equal(backbone["features.0.weight"], train_classifier(dataset, "classifier_b").state_dict()[
        "features.0.weight"])


def test_multi_step_pretrain_students(tmp_path):
    """K-step students: regression trains step k (shared by all ranks: keyed by (seed, step) only) on the pair
    re-noised to t_k, pure noise at k = 0; ADP's straight-path student is the same network the K-step sampler calls."""
    trainer = pretrain_trainer(tmp_path, "pretrain.method.name=regression", "distill.generator.num_steps=4")
    timesteps = trainer.student_timesteps
    assert len(timesteps) == 4 and timesteps[0] == 1000.0
    seen = set()
    for step in range(12):
        ctx = trainer.make_context(step)
        k = ctx.rand.shared_randint("regression_k", 4)
        seen.add(k)
        calls = []
        handle = trainer.nets.generator.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((args[0].clone(), args[1].clone())), with_kwargs=True)
        trainer.method.generator_loss(ctx)
        handle.remove()
        (x_in, t_in), = calls
        assert torch.all(t_in == timesteps[k])
        expected = ctx.pair_noise if k == 0 else ctx.student_denoiser.add_noise(ctx.pair_output, ctx.pair_noise,
                                                                                 ctx.times(timesteps[k]))
        assert torch.equal(x_in, expected)
    assert len(seen) > 1
