"""Discriminator diagnostics for ADM and ADP (docs/algorithms.md "Diagnostics"): does the adversarial signal carry
information? Per-sample quantities are averaged per timestep bucket and returned as `diagnostics/<name>_t<lo>-<hi>`
metrics (device scalars, no host sync); a bucket with no sample in this batch gives NaN, which the trainer's
window reduction skips (Trainer.reduce_metrics), so sparse buckets on small per-rank batches still log.

What each says:
- hinge, accuracy: whether the heads separate real from fake at that noise level (hinge 2 / accuracy 0.5: chance);
- input_distance: |x_real - x_fake| / |x_real| of ADM's discriminator inputs: how much the two sides differ at all;
- gradient_cosine: cosine between the generator's adversarial gradient w.r.t. its sample and the distribution-matching
  direction x0_fake - x0_real at the same x_t (trainer.denoiser.ScorePair): positive when descending the adversarial
  loss moves samples the way DMD would, ~0 when the heads' gradient is noise.
"""
from __future__ import annotations

import torch

from trainer.schedules import NUM_TRAIN_TIMESTEPS

BUCKETS = 4   # quarters of [0, T]: the low-noise quarter is where a one-step student's detail is judged


def due(every: int, step: int) -> bool:
    """Diagnostics run on steps where step % every == 0 (every 0: never)."""
    return every > 0 and step % every == 0


def bucket_means(name: str, values: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """values [B] per sample at network times t [B] -> {diagnostics/<name>_t<lo>-<hi>: mean} over BUCKETS equal
    ranges of [0, T] (NaN where a bucket is empty), plus the all-sample mean. One-hot weights, no data-dependent
    shapes: this runs inside the step."""
    index = (t.detach().float() * (BUCKETS / NUM_TRAIN_TIMESTEPS)).long().clamp(0, BUCKETS - 1)
    weights = torch.nn.functional.one_hot(index, BUCKETS).float()          # [B, BUCKETS]
    sums = weights.t() @ values.detach().float()
    means = sums / weights.sum(0)                                           # 0 / 0 = NaN for an empty bucket
    width = NUM_TRAIN_TIMESTEPS // BUCKETS
    out = {f"diagnostics/{name}_t{i * width}-{(i + 1) * width}": means[i] for i in range(BUCKETS)}
    out[f"diagnostics/{name}"] = values.detach().float().mean()
    return out


def per_sample_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The hinge discriminator loss per pair [B] (its batch mean is trainer.losses.hinge_discriminator_loss)."""
    return torch.relu(1.0 - real_logits.detach()) + torch.relu(1.0 + fake_logits.detach())


def per_sample_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """[B]: 1 when both sides of a pair are on their side of 0, 0.5 for one, 0 for neither."""
    return 0.5 * ((real_logits.detach() > 0).float() + (fake_logits.detach() < 0).float())


def relative_distance(x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor:
    """|x_real - x_fake| / |x_real| per sample [B]."""
    return (x_real - x_fake).flatten(1).norm(dim=1) / x_real.flatten(1).norm(dim=1).clamp_min(1e-12)


def gradient_cosine(gradient: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cosine per sample [B] between a loss's gradient w.r.t. the generator's sample and the distribution-matching
    direction (both [B, ...]); 1 when the loss's descent moves the sample exactly as DMD's does."""
    return torch.nn.functional.cosine_similarity(gradient.flatten(1).float(), direction.flatten(1).float(), dim=1)
