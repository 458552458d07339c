"""Loss terms shared by the methods, each citing its source. Inputs are fp32 views from trainer/denoiser.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, 1, ...]: mean over every non-batch dim, kept broadcastable."""
    return x.flatten(1).mean(1).reshape(-1, *([1] * (x.dim() - 1)))


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching direction (Yin et al. 2024, Eq. 7-8; DMD2 code, sd_guidance.py):
        g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|          per sample,
    with direction = x0_fake - x0_real from trainer.denoiser.ScorePair.
    Descent on the surrogate below moves x toward the real score's x0 and away from the fake one.
    nan_to_num: a sample equal to the teacher's x0 has a zero normaliser (0/0); DMD2 zeroes it the same way."""
    normaliser = per_sample_mean((x - x0_real).abs())
    return torch.nan_to_num(direction / normaliser)


def dmd_surrogate_loss(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """L = 0.5 * mean((x - sg(x - g))^2), whose gradient w.r.t. x is g / x.numel() (docs/algorithms.md §2, inv. 11)."""
    return 0.5 * F.mse_loss(x, (x - gradient).detach())


def denoising_loss(native: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE in the network's native parameterisation (DMD2: eps-MSE). An x0-space loss would weight SDXL's noisiest
    step by (s/a)^2 ~ 200x; the native loss keeps the teacher's own weighting."""
    return F.mse_loss(native.float(), target.float())


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ADM/ADP hinge loss (Lu et al. 2025, Eq. for L_D): E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(fake)] (standard hinge generator loss; fake branch only, docs/algorithms.md §10.4)."""
    return -fake_logits.mean()


def nonsaturating_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's GAN critic loss: softplus(D(fake)) + softplus(-D(real)) (Goodfellow et al. 2014, non-saturating)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def nonsaturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's generator GAN term: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def paired_hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """A relativistic pairing hinge (Jolicoeur-Martineau 2019; RpGAN): E[max(0, 1 - (D(real) - D(fake)))] over pairs
    made from the same x_t, so the part both sides share cancels in the logit difference (docs/algorithms.md §5.5)."""
    return F.relu(1.0 - (real_logits - fake_logits)).mean()


def paired_hinge_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the pairing hinge: E[max(0, 1 - (D(fake) - D(real)))]; D(real) enters as a constant."""
    return F.relu(1.0 - (fake_logits - real_logits.detach())).mean()
