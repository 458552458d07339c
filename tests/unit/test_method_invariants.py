"""docs/algorithms.md §9 invariants 15-17 (gradient isolation, fake-score loss, backward simulation) and 21-24 (ADM)."""
import pytest
import torch

from tests.helpers import distill_trainer
from trainer.denoiser import Denoiser
from trainer.methods.adm import ADM
from trainer.methods.base import Nets, StepContext
from parallel.randomness import StepRandom
from trainer.schedules import DDPMSchedule, FlowSchedule

ROLES = ("generator", "teacher", "fake_score", "heads")


def grads_present(trainer) -> dict[str, bool]:
    return {r: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
            for r, m in trainer.nets.present().items()}


def assert_isolated(trainer, phase, expected: set[str]):
    present = grads_present(trainer)
    got = {r for r, has in present.items() if has}
    assert got == expected, f"after phase {phase.name}: grads on {got}, expected {expected}"
    for role, module in trainer.nets.present().items():
        if role not in expected:
            assert all(p.grad is None for p in module.parameters()), f"{role} holds a .grad after {phase.name}"


@pytest.mark.parametrize("method", ["dmd", "dmd2", "adm"])
@pytest.mark.parametrize("num_steps", [1, 4])
def test_invariant_15_23_gradient_isolation(tmp_path, method, num_steps):
    """Generator phase: only the generator holds grads (teacher, fake score, heads None). Critic phases: only the
    updated critic roles hold grads; the generator's stay None. Steps run through the real trainer."""
    trainer = distill_trainer(tmp_path, f"distill.method.name={method}", "distill.method.ttur=1",
                              f"distill.generator.num_steps={num_steps}",
                              *(["distill.generator.conditioning_timestep=null"] if num_steps > 1 else []),
                              *(["distill.method.guidance_scale=2.0"] if method != "dmd2" else []))
    for step in range(2):
        ctx = trainer.make_context(step)
        names = []
        for phase in trainer.method.phases(step):
            trainer.phase_backward(phase, [ctx])
            assert_isolated(trainer, phase, set(phase.updates))
            trainer.backend.clip_and_step(phase.updates)
            names.append(phase.name)
        assert "generator" in names
    for module in trainer.nets.present().values():
        assert all(p.requires_grad == (m is not trainer.nets.teacher) for m in [module] for p in m.parameters())


def test_ttur_controls_generator_turns(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=dmd2", "distill.method.ttur=3")
    turns = [trainer.method.generator_trains_at(s) for s in range(6)]
    assert turns == [True, False, False, True, False, False]
    assert [p.name for p in trainer.method.phases(1)] == ["critic"]


def test_invariant_16_fake_score_loss_zero_at_target_and_no_generator_grad(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=dmd")
    ctx = trainer.make_context(0)
    x0 = ctx.generator_x0()
    assert x0.requires_grad   # the generator trains at step 0: its sample carries a graph

    class Oracle(torch.nn.Module):
        """Returns the exact flow target (x_t - x0)/sigma for the generator sample x0 (the fake score at optimum)."""
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x_t, t, class_labels=None):
            sigma = (t / 1000).reshape(-1, 1)
            return self.scale * (x_t - x0.detach()) / sigma

    ctx.nets = Nets(generator=ctx.nets.generator, teacher=ctx.nets.teacher, fake_score=Oracle())
    out = trainer.method.fake_score_loss(ctx)
    assert out.loss.item() < 1e-10
    out.loss.backward()
    assert all(p.grad is None for p in trainer.nets.generator.parameters())


def test_invariant_17_backward_simulation(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=dmd2", "distill.generator.num_steps=4",
                              "distill.generator.conditioning_timestep=null", "distill.method.ttur=1")
    seen_k = set()
    for step in range(12):
        ctx = trainer.make_context(step)
        k = ctx.rand.shared_randint("backward_simulation_k", 4)
        # the same k on every rank: it is keyed by (seed, step) only, not by the rank's sample indices
        other_rank = StepRandom(ctx.rand.seed, step, range(1000, 1004))
        assert other_rank.shared_randint("backward_simulation_k", 4) == k
        seen_k.add(k)
        calls = []
        generator = trainer.nets.generator
        handle = generator.register_forward_pre_hook(
            lambda mod, args, kwargs: calls.append((args[0].clone(), torch.is_grad_enabled())), with_kwargs=True)
        ctx.generator_x0()
        handle.remove()
        assert len(calls) == k + 1
        assert all(not grad_on for _, grad_on in calls[:-1])          # simulated prefix under no_grad
        assert calls[-1][1] == ctx.generator_trains and not calls[-1][0].requires_grad
        if k == 0:   # pure noise input at the first step
            assert torch.equal(calls[0][0], ctx.rand.normal("student_noise_0", ctx.data_shape))
    assert len(seen_k) > 1


DENOISERS = [Denoiser(DDPMSchedule(), "eps"), Denoiser(DDPMSchedule(snr_shift=3.0, zero_terminal_snr=True), "v"),
             Denoiser(FlowSchedule(3.0), "flow")]


@pytest.mark.parametrize("d", DENOISERS, ids=["eps", "v", "flow"])
def test_invariant_21_gap_parallel_to_dmd_direction(d):
    torch.manual_seed(1)
    x_t = torch.randn(4, 6, dtype=torch.float64)
    t = torch.full((4,), 600.0, dtype=torch.float64)
    u = t - 16
    real = d.to_views(torch.randn_like(x_t), x_t, t)
    fake = d.to_views(torch.randn_like(x_t), x_t, t)
    a_t, s_t = d.coefficients(t, x_t)
    a_u, s_u = d.coefficients(u, x_t)
    k = a_u - s_u * a_t / s_t
    gap = d.ode_step(real, x_t, t, u) - d.ode_step(fake, x_t, t, u)
    assert torch.allclose(gap, k * (real.x0 - fake.x0), atol=1e-12)
    if d.prediction == "flow":
        assert torch.allclose(k, (t - u).reshape(-1, 1) / t.reshape(-1, 1))


def test_invariant_22_identical_inputs_at_init(tmp_path):
    """Fake score == teacher and CFG off: x_real == x_fake bit-for-bit, hinge loss exactly 2 (|D| < 1), zero head
    gradients. With CFG w: gap == k (w - 1)(x0_cond - x0_uncond)."""
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.method.guidance_scale=1.0",
                              "distill.method.gradient_penalty=0.0")   # R1 adds to the hinge
    ctx = trainer.make_context(0)
    x0g = ctx.generator_x0().detach()
    t, u = trainer.method.step_times(ctx)
    x_t = ctx.denoiser.add_noise(x0g, ctx.rand.normal("adm_eps", ctx.data_shape), t)
    real = ctx.denoiser.predict(ctx.nets.teacher, x_t, t, ctx.cond, ctx.uncond, 1.0)
    x_fake, _ = trainer.method.fake_side(ctx, x_t, t, u)
    assert torch.equal(ctx.denoiser.ode_step(real, x_t, t, u), x_fake)
    out = trainer.method.discriminator_loss(ctx)
    assert out.metrics["logits_real"].abs() < 1
    assert out.loss.item() == 2.0
    out.loss.backward()
    head_grads = torch.cat([p.grad.flatten() for p in trainer.nets.heads.parameters() if p.grad is not None])
    # zero up to float32 summation order inside the batched matmul (residue ~1e-8; a real step's are ~1e-2)
    assert head_grads.abs().max().item() < 1e-7

    d, w = ctx.denoiser, 3.0
    x_t = torch.randn(8, 64)
    t, u = torch.full((8,), 500.0), torch.full((8,), 500.0 - 1000 / 64)
    real = d.predict(ctx.nets.teacher, x_t, t, ctx.cond, ctx.uncond, w)
    fake = d.predict(ctx.nets.fake_score, x_t, t, ctx.cond)
    cond_view, uncond_view = d.predict(ctx.nets.teacher, x_t, t, ctx.cond), d.predict(ctx.nets.teacher, x_t, t, ctx.uncond)
    k = ((t - u) / t).reshape(-1, 1)
    gap = d.ode_step(real, x_t, t, u) - d.ode_step(fake, x_t, t, u)
    assert torch.allclose(gap, k * (w - 1) * (cond_view.x0 - uncond_view.x0), atol=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_invariant_23_generator_gradient_through_fake_step(detach):
    """RF teacher, linear v_psi(x) = A x + b, linear D(x) = w.x: dL_G/dx_t = -(I + (u - t) J_v)^T w in sigma
    units; with detach_fake_velocity the Jacobian term vanishes. Checked against autograd and finite differences."""
    torch.manual_seed(0)
    dim = 5
    A, b, w = torch.randn(dim, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64), \
        torch.randn(dim, dtype=torch.float64)

    class LinearV(torch.nn.Module):
        def forward(self, x, t, **_):
            return x @ A.T + b

    d = Denoiser(FlowSchedule(1.0), "flow")
    cfg = type("C", (), {"detach_fake_velocity": detach, "discriminator_input": "step"})()
    method = ADM(cfg)
    ctx = StepContext(nets=Nets(generator=None, fake_score=LinearV()), denoiser=d,
                      rand=StepRandom(0, 0, [0]), step=0, data_shape=(dim,), cond={}, uncond={})
    t = torch.tensor([700.0], dtype=torch.float64)
    u = t - 1000 / 64

    def loss_of(x):
        return -(method.fake_side(ctx, x, t, u)[0] @ w).sum()

    x_t = torch.randn(1, dim, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_of(x_t), x_t)
    step = ((u - t) / 1000).item()
    jac = torch.eye(dim, dtype=torch.float64) + (0 if detach else step * A)
    assert torch.allclose(grad[0], -(jac.T @ w), atol=1e-12)
    fd = torch.stack([(loss_of(x_t.detach() + 1e-6 * e) - loss_of(x_t.detach() - 1e-6 * e)) / 2e-6
                      for e in torch.eye(dim, dtype=torch.float64)[:, None, :]])
    if not detach:
        assert torch.allclose(fd, grad[0], atol=1e-6)


@pytest.mark.parametrize("prediction,dt", [("flow", 1000 / 64), ("eps", 16.0)])
def test_invariant_24_t_minus_dt_in_range(tmp_path, prediction, dt):
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", f"schedule.prediction={prediction}",
                              "distill.train.batch_size=256", "distill.method.dt_frac=0.015625")   # T / 64
    ctx = trainer.make_context(0)
    t, u = trainer.method.step_times(ctx)
    assert torch.allclose(t - u, torch.full_like(t, dt))
    assert (u >= 0.02 * 1000 - 1e-6).all() and (t <= 0.98 * 1000 + 1e-6).all()
    assert t.max() - t.min() > 600   # spread over the range


def test_bf16_autocast_step_runs_and_stays_finite(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.train.bf16=true")
    sums = {}
    from collections import defaultdict
    sums = defaultdict(list)
    for step in range(2):
        trainer.train_step(step, sums)
    values = trainer.reduce_metrics(sums)
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert all(p.dtype == torch.float32 for p in trainer.nets.generator.parameters())   # fp32 master weights


def test_ema_tracks_generator_in_fp32(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=dmd", "distill.train.ema_decay=0.5")
    before = [p.clone() for p in trainer.backend.ema.parameters()]
    from collections import defaultdict
    trainer.train_step(0, defaultdict(list))
    for e, b, g in zip(trainer.backend.ema.parameters(), before, trainer.nets.generator.parameters()):
        assert torch.allclose(e, 0.5 * b + 0.5 * g, atol=1e-7)


def test_one_step_student_sees_conditioning_timestep_on_pure_noise(tmp_path):
    trainer = distill_trainer(tmp_path, "distill.method.name=adm", "distill.generator.conditioning_timestep=400")
    ctx = trainer.make_context(0)
    calls = []
    handle = trainer.nets.generator.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0].clone(), args[1].clone())), with_kwargs=True)
    x0 = ctx.generator_x0()
    handle.remove()
    (x_in, t_in), = calls
    assert torch.equal(x_in, ctx.rand.normal("student_noise_0", ctx.data_shape))
    assert torch.equal(t_in, torch.full_like(t_in, 400.0))
    # flow: x0 = x - sigma v with the coefficients of t = 400
    native = trainer.nets.generator(x_in, t_in, **ctx.cond)
    assert torch.allclose(x0, x_in - 0.4 * native, atol=1e-6)
