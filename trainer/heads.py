"""Discriminator heads on tapped backbone features (docs/algorithms.md §10.11).

One small head per tapped layer, each giving per-location logits that are averaged per sample; the heads are combined
by a learnable softmax weight vector ("dynamically weighted"). The head kind follows the feature's rank:
  [B, C]          -> MLP head (toy backbones)
  [B, C, H, W]    -> 2-D head: Conv3x3 -> GroupNorm -> SiLU -> Conv1x1 (UNet / MMDiT token grids)
  [B, C, T, H, W] -> 3-D head: the same with 3x3x3 convs (video)
Features come from the family's `forward(..., taps_only=True)`, never from forward hooks (hooks fire again during
activation-checkpoint recompute and break compiled graphs).
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_head(channels: int, hidden: int, dims: int, norm: bool) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    groups = 32 if hidden % 32 == 0 else 1
    return nn.Sequential(conv(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden) if norm else nn.Identity(),
                         nn.SiLU(), conv(hidden, 1, 1))


def _mlp_head(channels: int, hidden: int, norm: bool) -> nn.Module:
    layer_norm = (lambda: nn.LayerNorm(hidden)) if norm else nn.Identity   # noqa: E731
    return nn.Sequential(nn.Linear(channels, hidden), layer_norm(), nn.SiLU(), nn.Linear(hidden, hidden),
                         layer_norm(), nn.SiLU(), nn.Linear(hidden, 1))


class FeatureHeads(nn.Module):
    """Heads over a list of tapped features. feature_shapes: per tap, the feature shape without the batch dim.

    hidden: each head's width (capacity). norm: GroupNorm in conv heads / LayerNorm in MLP heads; None keeps each
    kind's default (conv heads normalised, MLP heads not). use: the taps that get a head (default all); DMD2's
    classifier reads the bottleneck only (`use=[len(feature_shapes) - 1]`)."""

    def __init__(self, feature_shapes: list[tuple[int, ...]], hidden: int = 128, norm: bool | None = None,
                 use: list[int] | None = None):
        super().__init__()
        self.use = list(range(len(feature_shapes))) if use is None else list(use)
        heads = []
        for index in self.use:
            shape = feature_shapes[index]
            if len(shape) == 1:
                heads.append(_mlp_head(shape[0], hidden, bool(norm)))
            elif len(shape) in (3, 4):
                heads.append(_conv_head(shape[0], hidden, len(shape) - 1, norm is not False))
            else:
                raise ValueError(f"no head for feature shape {shape}")
        self.heads = nn.ModuleList(heads)
        self.head_logit_weights = nn.Parameter(torch.zeros(len(heads)))   # softmax -> uniform at init

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: per tap [B, C, ...] (every tap; those not in `use` are ignored) -> logits [B] (fp32)."""
        per_head = [head(features[i]).float().flatten(1).mean(1) for head, i in zip(self.heads, self.use)]   # [B]
        weights = torch.softmax(self.head_logit_weights.float(), 0)
        return (torch.stack(per_head, 1) * weights).sum(1)


class HybridHeads(nn.Module):
    """ADP's two discriminators' trainable parts as one role (one optimizer, one checkpoint entry): heads on the
    teacher backbone's taps (latent D1) and heads on the frozen vision backbone's features (pixel D2). Called through
    the root module (`heads(features, "pixel")`) so sharded backends gather the root's parameters as for any call."""

    def __init__(self, latent: FeatureHeads, pixel: FeatureHeads | None):
        super().__init__()
        self.latent, self.pixel = latent, pixel

    def forward(self, features: list[torch.Tensor], kind: str = "latent") -> torch.Tensor:
        """features of one discriminator -> logits [B] (fp32)."""
        return self.latent(features) if kind == "latent" else self.pixel(features)
