"""docs/algorithms.md §9 invariants 1-10: parameterisations, schedules, the ODE step, the score identity, CFG, cubic t."""
import pytest
import torch

from trainer.denoiser import Denoiser, apply_cfg
from trainer.schedules import (DDPMSchedule, FlowSchedule, cubic_timesteps, rescale_zero_terminal_snr,
                               scaled_linear_alphas_cumprod, shift_sigma, shift_snr)

torch.manual_seed(0)
X0 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
EPS = torch.randn(6, 4, 3, 3, dtype=torch.float64)


def sdxl():
    return Denoiser(DDPMSchedule(), "eps")


def cogvideox(shift=3.0):
    return Denoiser(DDPMSchedule(snr_shift=shift, zero_terminal_snr=True), "v")


def sd3(shift=3.0):
    return Denoiser(FlowSchedule(shift), "flow")


ALL = [("eps", sdxl), ("v", cogvideox), ("flow", sd3)]


def test_invariant_01_eps_x0_round_trip():
    d = sdxl()
    t = torch.tensor([0.0, 10, 399, 500, 900, 999], dtype=torch.float64)
    x_t = d.add_noise(X0, EPS, t)
    pred = d.to_views(EPS, x_t, t)
    assert torch.allclose(pred.x0, X0, atol=1e-10)
    a, s = d.coefficients(t, X0)
    assert torch.allclose((x_t - a * pred.x0) / s, EPS, atol=1e-10)


def test_invariant_02_v_prediction_views():
    d = cogvideox()
    t = torch.tensor([0.0, 100, 399, 500, 900, 998], dtype=torch.float64)
    a, s = d.coefficients(t, X0)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)
    x_t = d.add_noise(X0, EPS, t)
    v = a * EPS - s * X0
    assert torch.allclose(d.target(X0, EPS, t), v)
    pred = d.to_views(v, x_t, t)
    assert torch.allclose(pred.x0, X0, atol=1e-10) and torch.allclose(pred.eps, EPS, atol=1e-10)


def test_invariant_03_rectified_flow_views():
    d = Denoiser(FlowSchedule(1.0), "flow")
    t = torch.tensor([0.0, 100, 250, 500, 900, 1000], dtype=torch.float64)
    x_t = d.add_noise(X0, EPS, t)
    v = EPS - X0
    assert torch.allclose(d.target(X0, EPS, t), v)
    pred = d.to_views(v, x_t, t)
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t - sigma * v, X0, atol=1e-12) and torch.allclose(x_t + (1 - sigma) * v, EPS, atol=1e-12)
    assert torch.allclose(pred.x0, X0, atol=1e-12) and torch.allclose(pred.eps, EPS, atol=1e-12)


def test_invariant_04_terminal_points():
    x_t, v = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    rf = sd3().to_views(v, x_t, torch.full((2,), 1000.0, dtype=torch.float64))
    assert torch.allclose(rf.x0, x_t - v)
    cog = cogvideox()
    a, s = cog.schedule.alpha_sigma(torch.tensor([999.0], dtype=torch.float64))
    assert a.item() == 0.0 and s.item() == 1.0
    views = cog.to_views(v, x_t, torch.full((2,), 999.0, dtype=torch.float64))
    assert torch.equal(views.x0, -v) and torch.equal(views.eps, x_t)
    a_sdxl, _ = DDPMSchedule().alpha_sigma(torch.tensor([999.0, 399.0], dtype=torch.float64))
    assert a_sdxl[0].item() == pytest.approx(0.0683, abs=1e-4)       # NOT pure noise
    assert (a_sdxl[1] ** 2).item() == pytest.approx(0.4261, abs=1e-4)


def test_invariant_05_snr_shift_then_zero_terminal_snr():
    base = scaled_linear_alphas_cumprod()
    for k in (1.0, 3.0):
        shifted = shift_snr(base, k)
        snr, snr_shifted = base / (1 - base), shifted / (1 - shifted)
        assert torch.allclose(snr_shifted, snr / k, rtol=1e-10)
        rescaled = rescale_zero_terminal_snr(shifted)
        assert rescaled[0].item() == pytest.approx(shifted[0].item(), rel=1e-12)
        assert rescaled[-1].item() == 0.0
        assert torch.equal(DDPMSchedule(snr_shift=k, zero_terminal_snr=True).alphas_cumprod, rescaled)


def test_invariant_06_sd3_shift():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_sigma(sigma, 1.0), sigma)
    for k in (0.5, 3.0, 6.0):
        out = shift_sigma(sigma, k)
        assert out[0].item() == 0.0 and out[-1].item() == 1.0
        assert (out[1:] > out[:-1]).all()
    got = shift_sigma(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 3.0)
    assert torch.allclose(got, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("name,make", ALL)
def test_invariant_07_ode_step(name, make):
    d = make()
    t = torch.full((6,), 700.0, dtype=torch.float64)
    x_t = d.add_noise(X0, EPS, t)
    native = torch.randn_like(X0)
    pred = d.to_views(native, x_t, t)
    assert torch.allclose(d.ode_step(pred, x_t, t, t), x_t, atol=1e-10)
    clean = torch.full_like(t, d.schedule.clean_time)
    assert torch.allclose(d.ode_step(pred, x_t, t, clean), pred.x0, atol=1e-12)
    u = torch.full_like(t, 600.0)
    x_u = d.ode_step(pred, x_t, t, u)
    a_t, s_t = d.coefficients(t, X0)
    a_u, s_u = d.coefficients(u, X0)
    k = a_u - s_u * a_t / s_t
    assert (k > 0).all()
    assert torch.allclose(x_u, k * pred.x0 + (s_u / s_t) * x_t, atol=1e-10)
    if name == "flow":
        assert torch.allclose(x_u, x_t + ((u - t) / 1000).reshape(-1, 1, 1, 1) * native, atol=1e-10)


@pytest.mark.parametrize("name,make", ALL)
def test_invariant_08_score_identity(name, make):
    d = make()
    t = torch.tensor([50.0, 200, 400, 600, 800, 950], dtype=torch.float64)
    x_t = d.add_noise(X0, EPS, t)
    pred = d.to_views(torch.randn_like(X0), x_t, t)
    a, s = d.coefficients(t, X0)
    assert torch.allclose(-pred.eps / s, (a * pred.x0 - x_t) / s ** 2, atol=1e-9)


@pytest.mark.parametrize("name,make", ALL)
def test_invariant_09_cfg(name, make):
    d = make()
    t = torch.tensor([50.0, 200, 400, 600, 800, 950], dtype=torch.float64)
    x_t = d.add_noise(X0, EPS, t)
    cond, uncond = torch.randn_like(X0), torch.randn_like(X0)
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond) and torch.equal(apply_cfg(cond, uncond, 0.0), uncond)
    w = 4.5
    guided_native = d.to_views(apply_cfg(cond, uncond, w), x_t, t).x0
    vc, vu = d.to_views(cond, x_t, t), d.to_views(uncond, x_t, t)
    assert torch.allclose(guided_native, apply_cfg(vc.x0, vu.x0, w), atol=1e-9)   # guiding x0
    guided_eps = apply_cfg(vc.eps, vu.eps, w)
    a, s = d.coefficients(t, X0)
    assert torch.allclose(guided_native, (x_t - s * guided_eps) / a, atol=1e-8)     # guiding eps


def test_cfg_through_predict_batches_cond_and_uncond():
    """Denoiser.predict runs [cond ‖ uncond] in one call and combines natively."""
    d = sd3()
    calls = []

    def net(x, t, class_labels):
        calls.append(len(x))
        return x * 0 + class_labels.reshape(-1, 1).double()

    x = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.full((3,), 500.0, dtype=torch.float64)
    pred = d.predict(net, x, t, {"class_labels": torch.tensor([2, 2, 2])}, {"class_labels": torch.tensor([0, 0, 0])}, 3.0)
    assert calls == [6]
    assert torch.allclose(pred.native, torch.full((3, 2), 6.0, dtype=torch.float64))


def test_invariant_10_cubic_schedule():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(100_000, generator=g, dtype=torch.float64)
    t = cubic_timesteps(u, 1000.0)
    assert (t > 0).all() and (t <= 1000).all()
    assert abs((t > 900).double().mean().item() - 0.464) < 0.01
    assert abs(t.median().item() - 875.0) < 5.0


def test_student_and_sampler_timesteps():
    assert DDPMSchedule().student_timesteps(4) == [999.0, 749.0, 499.0, 249.0]
    # DMD2's range(999, 0, -(1000 // K)), first K entries
    assert DDPMSchedule().student_timesteps(6) == [999.0, 833.0, 667.0, 501.0, 335.0, 169.0]
    assert DDPMSchedule().student_timesteps(7) == [999.0, 857.0, 715.0, 573.0, 431.0, 289.0, 147.0]
    assert FlowSchedule(3.0).student_timesteps(4) == pytest.approx([1000.0, 900.0, 750.0, 500.0])
    ddpm_times = DDPMSchedule().sampler_timesteps(50)
    assert ddpm_times[0] == 999.0 and ddpm_times[-1] == -1.0 and len(ddpm_times) == 51
    assert FlowSchedule(1.0).sampler_timesteps(4) == pytest.approx([1000.0, 750.0, 500.0, 250.0, 0.0])


def test_ddpm_training_times_cover_dmd2_ranges():
    """DMD2 draws randint(20, 981) for the DM loss and randint(0, 1000) for the critic: both ends included."""
    u = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(0, 1, 100_001, dtype=torch.float64)[:-1],
                   torch.full((1,), 1 - 1e-12, dtype=torch.float64)])
    dm = DDPMSchedule().timesteps_from_uniform(u, 0.02, 0.98)
    assert dm.min() == 20 and dm.max() == 980 and len(dm.unique()) == 961
    critic = DDPMSchedule().timesteps_from_uniform(u, 0.0, 1.0)
    assert critic.min() == 0 and critic.max() == 999 and len(critic.unique()) == 1000


def test_prediction_must_fit_schedule():
    with pytest.raises(ValueError):
        Denoiser(FlowSchedule(), "eps")
    with pytest.raises(ValueError):
        Denoiser(DDPMSchedule(), "flow")
