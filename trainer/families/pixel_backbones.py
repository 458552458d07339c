"""ADP's pixel-discriminator backbone (docs/algorithms.md §6.3, §10.10): decode latents to RGB with the family's VAE,
resize to the vision model's resolution, normalise, and run a FROZEN vision transformer whose intermediate features
feed trainable heads. SAM's image encoder (transformers `SamVisionModel`, ViT-B by default: it beat DINOv2 in the
paper's ablation A2, plausibly because it works at 1024 px) or DINOv2 (`Dinov2Model`) as the alternative.

Gradients flow to the input (the generator's step backprops through the decoder and the encoder; parameters are
frozen, never under no_grad). Feature taps: hidden states after 1/4, 1/2, 3/4 and all of the blocks, as grids
[B, C, h, w], plus SAM's neck output [B, 256, 64, 64].
Cost at 1024 px: the SDXL VAE decode and a SAM ViT-B forward + backward per sample, about the price of one SDXL UNet
pass; the decode runs in fp32 (SDXL's VAE overflows in fp16 / bf16: `force_upcast`).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model, SamVisionModel

from parallel.loading import resolve_model_dir
from trainer.families.configs import load_config

# both were trained on ImageNet-normalised RGB (transformers' SamImageProcessor / BitImageProcessor defaults)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODELS = {"sam": ("sam_vit_b", "sam_tiny"), "dinov2": ("dinov2_base", "dinov2_tiny")}


def vision_class(kind: str):
    return SamVisionModel if kind == "sam" else Dinov2Model


def vision_config(kind: str, config_name: str | None = None, pretrained: str | None = None) -> dict:
    """The vision model's constructor config: the pretrained folder's (or hub id's) config.json, else the checked-in
    one. A full SAM checkpoint (SamModel) nests the encoder's under `vision_config`."""
    if pretrained:
        with open(os.path.join(resolve_model_dir(pretrained), "config.json")) as f:
            config = json.load(f)
        return {k: v for k, v in config.get("vision_config", config).items() if not k.startswith("_")}
    return {k: v for k, v in load_config(config_name).items() if not k.startswith("_")}


def build_vision(kind: str, config: dict) -> nn.Module:
    cls = vision_class(kind)
    config_cls = cls.config_class
    keep = set(config_cls().to_dict())
    return cls(config_cls(**{k: v for k, v in config.items() if k in keep}))


def pretrained_vision_state(kind: str, pretrained: str) -> dict[str, torch.Tensor]:
    """The encoder's weights through transformers' own loader (a SAM checkpoint's prompt encoder and mask decoder are
    dropped; DINOv2's legacy key names converted): ~90 M parameters, read whole on each rank."""
    return vision_class(kind).from_pretrained(resolve_model_dir(pretrained)).state_dict()


def tap_layers(num_layers: int) -> list[int]:
    """Hidden-state indices after 1/4, 1/2, 3/4 and all of the blocks (index 0 is the patch embedding)."""
    return sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75, 1.0)})


class PixelBackbone(nn.Module):
    """The frozen `pixel_backbone` role. x: latents [B, 4, h, w] (decoded with `vae`) or images in [-1, 1]
    [B, 3, H, W] when there is no VAE -> per tap [B, C_i, h_i, w_i]."""

    def __init__(self, kind: str, vision: nn.Module, vae: nn.Module | None = None, image_size: int | None = None):
        super().__init__()
        self.kind, self.vision, self.vae = kind, vision, vae
        config = vision.config
        self.image_size = image_size or config.image_size
        self.patch_size = config.patch_size
        self.taps = tap_layers(config.num_hidden_layers)

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        grid = self.image_size // self.patch_size
        shapes = [(self.vision.config.hidden_size, grid, grid)] * len(self.taps)
        if self.kind == "sam":
            shapes.append((self.vision.config.output_channels, grid, grid))
        return shapes

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (scaled, as the denoisers see them) -> RGB in about [-1, 1]; fp32 (SDXL's force_upcast)."""
        scale = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with torch.autocast(latents.device.type, enabled=False):
            return self.vae.decode(latents.float() / scale + shift).sample

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        images = self.decode(x) if self.vae is not None else x
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        # constants made per call, not buffers: sharded backends build roles on the meta device and load parameters only
        mean = images.new_tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
        pixels = ((images + 1) / 2 - mean) / std
        out = self.vision(pixel_values=pixels.to(next(self.vision.parameters()).dtype), output_hidden_states=True)
        grid = self.image_size // self.patch_size
        features = []
        for index in self.taps:
            h = out.hidden_states[index]
            if self.kind == "sam":          # [B, h, w, C] channels last
                h = h.permute(0, 3, 1, 2)
            else:                           # [B, 1 + h*w, C] with the CLS token first
                h = h[:, 1:].transpose(1, 2).reshape(h.shape[0], h.shape[-1], grid, grid)
            features.append(h)
        if self.kind == "sam":
            features.append(out.last_hidden_state)   # the neck: [B, output_channels, h, w]
        return features
