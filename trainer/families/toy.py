"""The toy family: small residual MLP denoisers on 64-D digits or 2-D Gaussian grids.

It goes through the same family / role / method / trainer code as the large models: a network called as
`net(sample, timestep, **cond)`, taps from `forward(..., taps_only=True)`, conditions as dicts, a null class for CFG.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from data.toy import ToyDataset, class_labels_for, load_toy
from parallel.loading import StateSource
from trainer.evaluation import sample_grid_png, train_classifier
from trainer.heads import FeatureHeads, HybridHeads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (network time units, up to 1000) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.modulation = nn.Linear(hidden, 2 * hidden)  # scale/shift from time + class embedding (adaLN)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(emb).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class ToyDenoiserNet(nn.Module):
    """x_t [B, D], t [B], class_labels [B] (index num_classes = null / unconditional) -> native prediction [B, D]."""

    def __init__(self, data_dim: int, hidden: int, depth: int, num_classes: int, time_embed_dim: int,
                 taps: list[int]):
        super().__init__()
        self.data_dim, self.num_classes, self.taps = data_dim, num_classes, list(taps)
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.input = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, data_dim)

    def forward(self, sample, timestep, class_labels=None, taps_only: bool = False):
        """Native prediction [B, D]; with taps_only, the tapped block outputs (list of [B, hidden]) instead."""
        emb = self.time_mlp(timestep_embedding(timestep, self.time_embed_dim).to(sample.dtype))
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)
        emb = nn.functional.silu(emb)
        h = self.input(sample)
        features = []
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i in self.taps:
                features.append(h)
                if taps_only and len(features) == len(self.taps):
                    return features
        return self.output(self.out_norm(h))


class ToyPixelBackbone(nn.Module):
    """ADP's pixel-discriminator backbone on the toy (docs/algorithms.md §6.3 with SAM's role): the toys live in pixel
    space already, so decoding is the identity and the backbone is a small classifier trained on the
    `classifier_b` split, disjoint from the evaluation classifier's (trainer/evaluation.py). Same parameter names
    as `ToyClassifier`, so its trained state dict loads as is. x [B, D] -> per hidden layer [B, hidden]."""

    def __init__(self, data_dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.logits = nn.Linear(hidden, num_classes)   # kept for the state dict; the heads replace it

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = self.features[1](self.features[0](x))
        return [h1, self.features[3](self.features[2](h1))]


class ToyFamily:
    """Builds the toy roles and conditions for one dataset."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dataset: ToyDataset = load_toy(cfg.dataset)
        self.data_shape = (self.dataset.data_dim,)

    def build_denoiser(self) -> ToyDenoiserNet:
        c = self.cfg
        return ToyDenoiserNet(self.dataset.data_dim, c.hidden, c.depth, self.dataset.num_classes,
                              c.time_embed_dim, c.taps)

    def teacher_source(self, path: str) -> StateSource:
        """The teacher's weights: the teacher stage's safetensors file."""
        return StateSource(path)

    def build_heads(self, hidden: int | None = None, norm: bool | None = None, bottleneck_only: bool = False
                    ) -> FeatureHeads:
        """MLP heads on the taps (the last tap is the deepest block). hidden: None -> the network's width."""
        taps = len(self.cfg.taps)
        return FeatureHeads([(self.cfg.hidden,)] * taps, hidden=hidden or self.cfg.hidden, norm=norm,
                            use=[taps - 1] if bottleneck_only else None)

    # --- ADP's pixel discriminator -------------------------------------------------------------------------------
    PIXEL_HIDDEN = 128

    def build_pixel_backbone(self) -> ToyPixelBackbone:
        return ToyPixelBackbone(self.dataset.data_dim, self.dataset.num_label_classes, self.PIXEL_HIDDEN)

    def build_pixel_heads(self) -> FeatureHeads:
        return FeatureHeads([(self.PIXEL_HIDDEN,)] * 2, hidden=self.cfg.hidden)

    def train_pixel_backbone(self) -> dict[str, torch.Tensor]:
        """The backbone's weights: the classifier trained on `classifier_b` (deterministic, about a second)."""
        return train_classifier(self.dataset, split="classifier_b").state_dict()

    def pixel_backbone_source(self, path: str) -> StateSource:
        return StateSource(path)

    # --- parallel plan -----------------------------------------------------------------------------------------
    @staticmethod
    def shard_units(module) -> list:
        """FSDP units, sharded before the root: residual blocks of denoisers, one unit per discriminator head."""
        if isinstance(module, ToyDenoiserNet):
            return list(module.blocks)
        if isinstance(module, FeatureHeads):
            return list(module.heads)
        if isinstance(module, HybridHeads):   # ADP: latent and pixel heads, one unit each
            return [*module.latent.heads, *(module.pixel.heads if module.pixel is not None else [])]
        return []

    def example_inputs(self, batch: int, device) -> dict:
        """Arguments of one call per role (FSDP2's bf16 warm-up)."""
        x = torch.zeros(batch, self.dataset.data_dim, device=device)
        t = torch.full((batch,), 500.0, device=device)
        labels = self.null_condition(batch, device).get("class_labels")
        features = [torch.zeros(batch, self.cfg.hidden, device=device) for _ in self.cfg.taps]
        denoiser = (x, t, labels)
        return {"generator": denoiser, "fake_score": denoiser, "heads": (features,)}

    def render_grid(self, samples: torch.Tensor):
        """HWC uint8 image of generator samples [N, D] (tensorboard's periodic sample grid)."""
        return sample_grid_png(samples.float().cpu(), self.dataset, None)

    # --- conditioning -----------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.dataset.num_classes > 0

    def condition(self, labels: torch.Tensor, device=None) -> dict:
        """labels [B]: class ids (moved to `device` when given)."""
        if not self.conditional:
            return {}
        return {"class_labels": labels if device is None else labels.to(device)}

    def null_condition(self, batch: int, device) -> dict:
        if not self.conditional:
            return {}
        return {"class_labels": torch.full((batch,), self.dataset.num_classes, dtype=torch.int64, device=device)}

    def drop_condition(self, labels: torch.Tensor, drop: torch.Tensor) -> dict:
        """CFG training: replace labels by the null class where `drop` [B] is True."""
        if not self.conditional:
            return {}
        return {"class_labels": torch.where(drop, torch.full_like(labels, self.dataset.num_classes), labels)}

    def prompt_labels(self, indices, seed: int) -> torch.Tensor:
        """The toy's 'prompts': a class per generator sample, a pure function of (seed, sample index)."""
        return class_labels_for(indices, self.dataset.num_classes, seed)
