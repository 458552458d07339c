"""docs/algorithms.md §9 invariants 11-14 (DMD direction), 18-20 (hinge and non-saturating GAN losses)."""
import itertools
import math

import torch

from trainer.losses import (dmd_gradient, dmd_surrogate_loss, hinge_discriminator_loss, hinge_generator_loss,
                            nonsaturating_discriminator_loss, nonsaturating_generator_loss)

torch.manual_seed(0)


def _triple(shape=(3, 4, 5, 5)):
    return (torch.randn(shape, dtype=torch.float64) for _ in range(3))


def test_invariant_11_direction_and_gradient():
    x, x0_real, x0_fake = _triple()
    x.requires_grad_(True)
    g = dmd_gradient(x.detach(), x0_real, x0_fake - x0_real)
    loss = dmd_surrogate_loss(x, g)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(grad, g / x.numel(), atol=1e-15)
    cos = torch.nn.functional.cosine_similarity((-grad).flatten(1), (x0_real - x0_fake).flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_invariant_12_no_signal_when_scores_agree():
    x, x0_real, _ = _triple()
    x.requires_grad_(True)
    loss = dmd_surrogate_loss(x, dmd_gradient(x.detach(), x0_real, x0_real - x0_real))
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_invariant_13_joint_scale_invariance():
    x, x0_real, x0_fake = _triple()
    g = dmd_gradient(x, x0_real, x0_fake - x0_real)
    for c in (0.1, 7.0):
        x_c = x0_real + c * (x - x0_real)
        fake_c = x0_real + c * (x0_fake - x0_real)
        assert torch.allclose(dmd_gradient(x_c, x0_real, fake_c - x0_real), g, atol=1e-12)


def test_invariant_14_value_and_per_sample_normaliser():
    x, x0_real, x0_fake = _triple()
    g = dmd_gradient(x, x0_real, x0_fake - x0_real)
    assert torch.allclose(dmd_surrogate_loss(x, g), 0.5 * (g ** 2).mean(), atol=1e-14)
    # per sample: scaling one sample's residuals leaves the others' g untouched
    x2 = x.clone()
    x2[0] = x0_real[0] + 5 * (x[0] - x0_real[0])
    g2 = dmd_gradient(x2, x0_real, x0_fake - x0_real)
    assert torch.allclose(g2[1:], g[1:]) and not torch.allclose(g2[0], g[0])
    # sharded along the tokens (sequence parallel): summing |.| and counts over shards before dividing == unsharded
    shards = x.flatten(1).chunk(2, dim=1), x0_real.flatten(1).chunk(2, dim=1)
    total_abs = sum((xs - rs).abs().sum(1) for xs, rs in zip(*shards))
    normaliser = total_abs / x[0].numel()
    expected = (x0_fake - x0_real) / normaliser.reshape(-1, 1, 1, 1)
    assert torch.allclose(expected, g, atol=1e-12)


def test_zero_residual_sample_gives_zero_not_nan():
    x, _, x0_fake = _triple()
    g = dmd_gradient(x, x.clone(), x0_fake - x)
    assert torch.isfinite(g).all()


def test_invariant_18_hinge_values():
    real, fake = torch.tensor([0.5]), torch.tensor([-0.2])
    assert hinge_discriminator_loss(real, fake).item() == torch.tensor(1.3).item()
    assert abs(hinge_generator_loss(fake).item() - 0.2) < 1e-7
    assert hinge_discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -2.0])).item() == 0.0
    zeros = torch.zeros(4)
    assert hinge_discriminator_loss(zeros, zeros).item() == 2.0 and hinge_generator_loss(zeros).item() == 0.0


def test_invariant_19_bounded_hinge_optimum_is_total_variation():
    """For discrete p, q and D in [-1, 1] (grid search over every vertex), min E_p[relu(1-D)] + E_q[relu(1+D)]
    = 2 - 2 TV(p, q) with TV = 0.5 * L1, attained at D = sign(p - q)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        p = torch.rand(4, generator=g, dtype=torch.float64)
        q = torch.rand(4, generator=g, dtype=torch.float64)
        p, q = p / p.sum(), q / q.sum()

        def objective(d):
            return (p * torch.relu(1 - d)).sum() + (q * torch.relu(1 + d)).sum()

        # the objective is linear in D on [-1, 1]^4, so its minimum is at a vertex
        best = min(objective(torch.tensor(v, dtype=torch.float64)).item()
                   for v in itertools.product((-1.0, 1.0), repeat=4))
        tv = 0.5 * (p - q).abs().sum().item()
        assert abs(best - (2 - 2 * tv)) < 1e-12
        assert abs(objective(torch.sign(p - q)).item() - best) < 1e-12


def test_invariant_20_nonsaturating_at_zero_logits():
    zeros = torch.zeros(5)
    assert abs(nonsaturating_discriminator_loss(zeros, zeros).item() - 2 * math.log(2)) < 1e-6
    assert abs(nonsaturating_generator_loss(zeros).item() - math.log(2)) < 1e-6
