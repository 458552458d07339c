"""The SD3 family (SD3-Medium, SD3.5-Large): `SD3Transformer2DModel` (MMDiT), rectified flow with the timestep shift
(3.0), built from a checked-in config (`sd3_medium`, `sd35_large`, or the tiny twins) or a pretrained diffusers folder /
hub id (subfolder `transformer`).

Conditioning: `encoder_hidden_states` [B, L, 4096] (CLIP-L ‖ CLIP-G penultimate tokens zero-padded to 4096, then T5-XXL
tokens: 77 + 256 = 333 with the pipeline's defaults) and `pooled_projections` [B, 2048] (pooled CLIP-L ‖ CLIP-G). The
text encoders run once, before training, through the pipeline's own `encode_prompt` (trainer/families/prompts.py).

Taps: the image tokens after the tapped joint blocks, [B, N, D] -> [B, D, H/p, W/p] for 2-D conv heads; the forward
with `taps_only` stops after the last tap.
"""
from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from trainer.families.latent import LatentFamily, depth_taps, tokens_to_grid

VAE_SCALE = 8   # SD3's VAE downsamples 8x, 16 latent channels


class SD3Transformer(SD3Transformer2DModel):
    """`SD3Transformer2DModel` with the project's call convention (sample, timestep, **condition) and taps."""

    tap_blocks: tuple[int, ...] = ()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, taps_only: bool = False):
        """sample [B, C, H, W], timestep [B] (1000 sigma), encoder_hidden_states [B, L, 4096], pooled_projections
        [B, 2048] -> velocity [B, C, H, W]; with taps_only: per tapped block [B, D, H/p, W/p]."""
        if not taps_only:
            return super().forward(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                                   pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
        # SD3Transformer2DModel.forward up to the last tapped block (no ControlNet, IP-adapter or skip layers);
        # kept in step with diffusers by tests/unit/test_latent_families.py
        patch = self.config.patch_size
        grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
        hidden = self.pos_embed(sample).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        taps, last = [], max(self.tap_blocks)
        for index, block in enumerate(self.transformer_blocks[:last + 1]):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, hidden = self._gradient_checkpointing_func(block, hidden, context, temb, None)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            if index in self.tap_blocks:
                taps.append(tokens_to_grid(hidden, grid))
        return taps


class SD3Family(LatentFamily):
    denoiser_class = SD3Transformer
    subfolder = "transformer"

    def setup(self) -> None:
        c = self.config
        self.latent_size = self.cfg.resolution // VAE_SCALE
        if self.latent_size % c["patch_size"]:
            raise ValueError(f"family.resolution {self.cfg.resolution}: latents must split into {c['patch_size']}x"
                             f"{c['patch_size']} patches")
        self.data_shape = (c["in_channels"], self.latent_size, self.latent_size)
        self.taps = depth_taps(c["num_layers"], self.cfg.taps)

    def embedding_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (self.cfg.prompt_length, self.config["joint_attention_dim"]),
                "pooled_projections": (self.config["pooled_projection_dim"],)}

    def tap_shapes(self) -> list[tuple[int, int, int]]:
        c = self.config
        grid = self.latent_size // c["patch_size"]
        return [(c["num_attention_heads"] * c["attention_head_dim"], grid, grid)] * len(self.taps)

    def denoiser_units(self, module) -> list:
        return list(module.transformer_blocks)
