"""The SDXL family: `UNet2DConditionModel` (eps prediction), built from a checked-in config (`sdxl`, or the tiny
twin `sdxl_tiny`) or from a pretrained diffusers folder / hub id (`teacher.pretrained`, subfolder `unet`).

Taps (discriminator backbone features) are the outputs of the down blocks and of the mid block, returned by
`forward(..., taps_only=True)`, which runs the encoder half only and stops after the last tap (DMD2's
`classify_forward` does the same; no forward hooks: they fire again in activation-checkpoint recompute).

Conditioning: SDXL takes `encoder_hidden_states` [B, L, 2048] (CLIP-L ‖ CLIP-bigG tokens) and `added_cond_kwargs`
{text_embeds [B, 1280] (pooled bigG), time_ids [B, 6] (orig h, w, crop top, left, target h, w)}; prompts are rows of
the family's prompt table (trainer/families/latent.py).
"""
from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from parallel.loading import PrefixedSource, StateSource, TensorsSource, resolve_model_dir
from trainer.families.configs import load_config
from trainer.families.latent import LatentFamily
from trainer.heads import FeatureHeads
from trainer.families.pixel_backbones import MODELS, PixelBackbone, build_vision, pretrained_vision_state, vision_config

VAE_SCALE = 8   # SDXL's VAE downsamples 8x


class SDXLUNet(UNet2DConditionModel):
    """`UNet2DConditionModel` whose forward returns the native prediction tensor, or the taps with `taps_only`.

    Subclassing (not wrapping) keeps the state-dict keys and `save_pretrained` of the stock class."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None, taps_only: bool = False):
        """sample [B, 4, h, w], timestep [B] (0..999), encoder_hidden_states [B, L, D] -> eps [B, 4, h, w];
        with taps_only: [down block outputs..., mid block output], each [B, C_i, h_i, w_i]."""
        if not taps_only:
            return super().forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                   return_dict=False)[0]
        # the encoder half of UNet2DConditionModel.forward for SDXL's configuration (text_time embedding, no class
        # embedding, no adapters); kept in step with diffusers by tests/unit/test_sdxl_family.py
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), None)
        aug = self.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        h = self.conv_in(sample)
        taps = []
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            taps.append(h)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = self.mid_block(h, emb)
        taps.append(h)
        return taps


class SDXLFamily(LatentFamily):
    denoiser_class = SDXLUNet
    subfolder = "unet"

    def setup(self) -> None:
        c = self.config
        self.latent_size = self.cfg.resolution // VAE_SCALE
        self.data_shape = (c.get("in_channels", 4), self.latent_size, self.latent_size)
        self.text_dim = c["cross_attention_dim"]
        self.pooled_dim = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]

    def embedding_shapes(self) -> dict[str, tuple[int, ...]]:
        """CLIP-L ‖ CLIP-bigG penultimate tokens [L, 2048] and the pooled, projected bigG embedding [1280]."""
        return {"encoder_hidden_states": (self.cfg.prompt_length, self.text_dim), "text_embeds": (self.pooled_dim,)}

    def time_ids(self, batch: int, device) -> torch.Tensor:
        """(original h, w, crop top, left, target h, w) as the pipeline's default call builds them."""
        size = float(self.cfg.resolution)
        return torch.tensor([size, size, 0.0, 0.0, size, size], device=device).expand(batch, 6)

    def assemble(self, flat: dict, batch: int, device) -> dict:
        return {"encoder_hidden_states": flat["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": flat["text_embeds"], "time_ids": self.time_ids(batch, device)}}

    def tap_shapes(self) -> list[tuple[int, int, int]]:
        """(C, h, w) of each tap: every down block (all but the last halve the size), then the mid block."""
        channels = self.config["block_out_channels"]
        shapes, size = [], self.latent_size
        for i, ch in enumerate(channels):
            if i < len(channels) - 1:
                size //= 2
            shapes.append((ch, size, size))
        shapes.append((channels[-1], size, size))
        return shapes

    def denoiser_units(self, module) -> list:
        """Each down block, the mid block, each up block."""
        return [*module.down_blocks, module.mid_block, *module.up_blocks]

    # --- ADP's pixel discriminator: VAE decode -> SAM / DINOv2 (trainer/families/pixel_backbones.py) --------------------
    def vae_config(self) -> dict:
        if self.pretrained:
            config = dict(AutoencoderKL.load_config(resolve_model_dir(self.pretrained, "vae")))
        else:
            config = load_config("sdxl_vae_tiny" if self.cfg.model == "sdxl_tiny" else "sdxl_vae")
        return {k: v for k, v in config.items() if not k.startswith("_")}

    def vision_config(self) -> dict:
        """The backbone's config: family.pixel_backbone_pretrained's, else the checked-in one; the checked-in one
        too when the family is described for planning (no teacher folder here: a hub id need not be cached)."""
        full, tiny = MODELS[self.cfg.pixel_backbone]
        pretrained = self.cfg.pixel_backbone_pretrained
        if self.pretrained is None and pretrained is not None and not os.path.isdir(pretrained):
            pretrained = None
        return vision_config(self.cfg.pixel_backbone, tiny if self.cfg.model == "sdxl_tiny" else full, pretrained)

    def build_pixel_backbone(self):
        return PixelBackbone(self.cfg.pixel_backbone, build_vision(self.cfg.pixel_backbone, self.vision_config()),
                             AutoencoderKL.from_config(self.vae_config()), self.cfg.pixel_image_size)

    def build_pixel_heads(self) -> FeatureHeads:
        with torch.device("meta"):
            shapes = PixelBackbone(self.cfg.pixel_backbone, build_vision(self.cfg.pixel_backbone,
                                                                         self.vision_config()),
                                   None, self.cfg.pixel_image_size).feature_shapes()
        return FeatureHeads(shapes, hidden=self.cfg.head_hidden)

    def pixel_backbone_source(self, path: str | None = None):
        """The backbone's weights: the VAE from the teacher pipeline's vae/, the vision encoder from
        family.pixel_backbone_pretrained (a SAM checkpoint's `vision_encoder.` keys, or a DINOv2 model). Without
        them (the tiny twin) both are random with a fixed seed, written once under the run's teacher/ folder."""
        if self.pretrained is None or self.cfg.pixel_backbone_pretrained is None:
            return StateSource(path)
        vision = TensorsSource(pretrained_vision_state(self.cfg.pixel_backbone, self.cfg.pixel_backbone_pretrained))
        return PrefixedSource({"vae.": (StateSource(self.pretrained, subfolder="vae"), ""), "vision.": (vision, "")})

    def train_pixel_backbone(self) -> dict[str, torch.Tensor]:
        """Random weights for a tiny twin's backbone (fixed seed): nothing to train, nothing downloaded."""
        if self.pretrained is not None and self.cfg.pixel_backbone_pretrained is not None:
            return None
        torch.manual_seed(0)
        return self.build_pixel_backbone().state_dict()
