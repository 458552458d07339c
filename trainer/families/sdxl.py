"""The SDXL family: `UNet2DConditionModel` (eps prediction), built from a checked-in config (`sdxl`, or the tiny
twin `sdxl_tiny`) or from a pretrained diffusers folder / hub id (`teacher.pretrained`, subfolder `unet`).

Taps (discriminator backbone features) are the outputs of the down blocks and of the mid block, returned by
`forward(..., taps_only=True)`, which runs the encoder half only and stops after the last tap (DMD2's
`classify_forward` does the same; no forward hooks: they fire again in activation-checkpoint recompute).

Conditioning: SDXL takes `encoder_hidden_states` [B, L, 2048] (CLIP-L ‖ CLIP-bigG tokens) and `added_cond_kwargs`
{text_embeds [B, 1280] (pooled bigG), time_ids [B, 6] (orig h, w, crop top, left, target h, w)}. Until the text
encoders land (issue #6), prompts are rows of a fixed random embedding table (a pure function of
`family.prompt_seed` and the prompt id), and the unconditional branch is zero embeddings as in DMD2.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from data.toy import class_labels_for
from parallel.loading import StateSource, resolve_model_dir
from trainer.families.configs import load_config
from trainer.heads import FeatureHeads, HybridHeads

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


def unet_config(model: str, pretrained: str | None) -> dict:
    """The UNet's constructor config: the pretrained folder's (or hub id's) unet/config.json, else the checked-in
    `families/configs/<model>.json`."""
    if pretrained:
        return dict(UNet2DConditionModel.load_config(resolve_model_dir(pretrained, "unet")))
    return load_config(model)


class SDXLFamily:
    def __init__(self, cfg, pretrained: str | None = None):
        self.cfg, self.pretrained = cfg, pretrained
        self.config = {k: v for k, v in unet_config(cfg.model, pretrained).items() if not k.startswith("_")}
        c = self.config
        self.latent_size = cfg.resolution // VAE_SCALE
        self.data_shape = (c.get("in_channels", 4), self.latent_size, self.latent_size)
        self.text_dim = c["cross_attention_dim"]
        self.pooled_dim = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        generator = torch.Generator().manual_seed(cfg.prompt_seed)
        # [P, L, D] token embeddings and [P, pooled] pooled embeddings, unit-variance rows
        self.prompt_tokens = torch.randn(cfg.num_prompts, cfg.prompt_length, self.text_dim, generator=generator)
        self.prompt_pooled = torch.randn(cfg.num_prompts, self.pooled_dim, generator=generator)

    def render_grid(self, samples: torch.Tensor):
        """HWC uint8 preview of latents [N, 4, h, w]: channels 0-2 as RGB, each sample scaled to its own range,
        tiled 4 per row. A latent preview, not pixels: the VAE decode lands with the text encoders (issue #6)."""
        import numpy as np
        x = samples.float().cpu()[:, :3]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).to(torch.uint8)            # [N, 3, h, w]
        cols = min(4, len(x))
        rows = (len(x) + cols - 1) // cols
        pad = torch.zeros(rows * cols - len(x), *x.shape[1:], dtype=torch.uint8)
        x = torch.cat([x, pad]).reshape(rows, cols, *x.shape[1:])                    # [R, C, 3, h, w]
        return np.ascontiguousarray(x.permute(0, 3, 1, 4, 2).reshape(rows * x.shape[3], cols * x.shape[4], 3).numpy())

    # --- roles -------------------------------------------------------------------------------------------------
    def build_denoiser(self) -> SDXLUNet:
        return SDXLUNet.from_config(self.config)

    def teacher_source(self, path: str) -> StateSource:
        """The teacher's weights: a pipeline folder or hub id (subfolder `unet`) or a UNet folder."""
        return StateSource(path, subfolder="unet")

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

    def build_heads(self) -> FeatureHeads:
        return FeatureHeads(self.tap_shapes(), hidden=self.cfg.head_hidden)

    # --- ADP's pixel discriminator: VAE decode -> SAM / DINOv2 (trainer/pixel_backbones.py) --------------------
    def vae_config(self) -> dict:
        from diffusers import AutoencoderKL
        if self.pretrained:
            config = dict(AutoencoderKL.load_config(resolve_model_dir(self.pretrained, "vae")))
        else:
            config = load_config("sdxl_vae_tiny" if self.cfg.model == "sdxl_tiny" else "sdxl_vae")
        return {k: v for k, v in config.items() if not k.startswith("_")}

    def vision_config(self) -> dict:
        from trainer.pixel_backbones import MODELS, vision_config
        full, tiny = MODELS[self.cfg.pixel_backbone]
        return vision_config(self.cfg.pixel_backbone, tiny if self.cfg.model == "sdxl_tiny" else full,
                             self.cfg.pixel_backbone_pretrained)

    def build_pixel_backbone(self):
        from diffusers import AutoencoderKL
        from trainer.pixel_backbones import PixelBackbone, build_vision
        return PixelBackbone(self.cfg.pixel_backbone, build_vision(self.cfg.pixel_backbone, self.vision_config()),
                             AutoencoderKL.from_config(self.vae_config()), self.cfg.pixel_image_size)

    def build_pixel_heads(self) -> FeatureHeads:
        from trainer.pixel_backbones import PixelBackbone, build_vision
        with torch.device("meta"):
            shapes = PixelBackbone(self.cfg.pixel_backbone, build_vision(self.cfg.pixel_backbone,
                                                                         self.vision_config()),
                                   None, self.cfg.pixel_image_size).feature_shapes()
        return FeatureHeads(shapes, hidden=self.cfg.head_hidden)

    def pixel_backbone_source(self, path: str | None = None):
        """The backbone's weights: the VAE from the teacher pipeline's vae/, the vision encoder from
        family.pixel_backbone_pretrained (a SAM checkpoint's `vision_encoder.` keys, or a DINOv2 model). Without
        them (the tiny twin) both are random with a fixed seed, written once under the run's teacher/ folder."""
        from parallel.loading import PrefixedSource, TensorsSource
        from trainer.pixel_backbones import pretrained_vision_state
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

    @staticmethod
    def shard_units(module) -> list:
        """FSDP units before the root: each down block, the mid block, each up block; one unit per head."""
        if isinstance(module, UNet2DConditionModel):
            return [*module.down_blocks, module.mid_block, *module.up_blocks]
        if isinstance(module, FeatureHeads):
            return list(module.heads)
        if isinstance(module, HybridHeads):   # ADP: latent and pixel heads, one unit each
            return [*module.latent.heads, *(module.pixel.heads if module.pixel is not None else [])]
        return []

    def example_inputs(self, batch: int, device) -> dict:
        x = torch.zeros(batch, *self.data_shape, device=device)
        t = torch.full((batch,), 500.0, device=device)
        cond = self.null_condition(batch, device)
        features = [torch.zeros(batch, *shape, device=device) for shape in self.tap_shapes()]
        return {"generator": (x, t, cond["encoder_hidden_states"], cond["added_cond_kwargs"]),
                "fake_score": (x, t, cond["encoder_hidden_states"], cond["added_cond_kwargs"]),
                "heads": (features,)}

    # --- conditioning --------------------------------------------------------------------------------------------
    conditional = True

    def time_ids(self, batch: int, device) -> torch.Tensor:
        size = float(self.cfg.resolution)
        return torch.tensor([size, size, 0.0, 0.0, size, size], device=device).expand(batch, 6)

    def condition(self, labels: torch.Tensor) -> dict:
        device = labels.device
        return {"encoder_hidden_states": self.prompt_tokens.to(device)[labels],
                "added_cond_kwargs": {"text_embeds": self.prompt_pooled.to(device)[labels],
                                      "time_ids": self.time_ids(len(labels), device)}}

    def null_condition(self, batch: int, device) -> dict:
        """DMD2's unconditional branch: zero text embeddings (the empty-prompt option arrives with the encoders)."""
        return {"encoder_hidden_states": torch.zeros(batch, self.cfg.prompt_length, self.text_dim, device=device),
                "added_cond_kwargs": {"text_embeds": torch.zeros(batch, self.pooled_dim, device=device),
                                      "time_ids": self.time_ids(batch, device)}}

    def drop_condition(self, labels: torch.Tensor, drop: torch.Tensor) -> dict:
        cond, null = self.condition(labels), self.null_condition(len(labels), labels.device)
        keep = ~drop
        return {"encoder_hidden_states": torch.where(keep[:, None, None], cond["encoder_hidden_states"],
                                                     null["encoder_hidden_states"]),
                "added_cond_kwargs": {"text_embeds": torch.where(keep[:, None], cond["added_cond_kwargs"]["text_embeds"],
                                                                 null["added_cond_kwargs"]["text_embeds"]),
                                      "time_ids": cond["added_cond_kwargs"]["time_ids"]}}

    def prompt_labels(self, indices, seed: int) -> torch.Tensor:
        """The prompt id of each generator sample: a pure function of (seed, sample index)."""
        return class_labels_for(indices, self.cfg.num_prompts, seed)
