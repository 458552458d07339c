"""The CogVideoX family (2B, 5B): `CogVideoXTransformer3DModel`, v prediction on scaled-linear betas with the SNR
shift (3.0 for 2B, 1.0 for 5B) and zero terminal SNR, built from a checked-in config (`cogvideox_2b`,
`cogvideox_5b`, or the tiny twins) or a pretrained diffusers folder / hub id (subfolder `transformer`).

Latents are in the transformer's own layout [B, F, C, h, w] (frames before channels, as `CogVideoXPipeline` keeps
them; the 3-D VAE takes channels first). F = (frames - 1) / 4 + 1 latent frames, h, w = height / 8, width / 8.

Conditioning: `encoder_hidden_states` [B, 226, 4096], the T5-XXL tokens of the prompt (the pipeline's
`max_sequence_length`), encoded once before training (trainer/families/prompts.py). 5B uses 3-D rotary position
embeddings, which the forward computes from the latent shape exactly as `CogVideoXPipeline` does (cached per shape).

Taps: the video tokens after the tapped blocks, [B, F h' w', D] -> [B, D, F, h', w'] for 3-D conv heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from parallel.sequence import SequenceShards, check_heads
from trainer.families.latent import LatentFamily, depth_taps, tokens_to_grid

VAE_SCALE = 8
TEMPORAL_COMPRESSION = 4


class CogVideoXTransformer(CogVideoXTransformer3DModel):
    """`CogVideoXTransformer3DModel` with the project's call convention (sample, timestep, **condition) and taps."""

    tap_blocks: tuple[int, ...] = ()
    sequence = SequenceShards()     # no sequence parallelism until enable_sequence_parallel

    def rotary_embedding(self, sample: torch.Tensor):
        """(cos, sin) [F h' w', head_dim] of the 5B's 3-D RoPE for latents [B, F, C, h, w], as the pipeline's
        `_prepare_rotary_positional_embeddings` builds them; None for the 2B (learned sincos positions)."""
        if not self.config.use_rotary_positional_embeddings:
            return None
        patch = self.config.patch_size
        frames, height, width = sample.shape[1], sample.shape[-2] // patch, sample.shape[-1] // patch
        key = (frames, height, width, sample.device)
        cache = self.__dict__.setdefault("_rotary_cache", {})
        if key not in cache:
            crops = get_resize_crop_region_for_grid((height, width), self.config.sample_width // patch,
                                                    self.config.sample_height // patch)
            cache[key] = get_3d_rotary_pos_embed(embed_dim=self.config.attention_head_dim, crops_coords=crops,
                                                 grid_size=(height, width), temporal_size=frames,
                                                 device=sample.device)
        return cache[key]

    def enable_sequence_parallel(self, shards: SequenceShards) -> None:
        """Ulysses over `shards`' group (parallel/sequence.py): every attention layer gets the all-to-all processor and
        the forward shards the video tokens after patch embedding and gathers them before unpatchify."""
        problem = check_heads(self.config.num_attention_heads, shards.size)
        if problem:
            raise ValueError(problem)
        self.sequence = shards
        self.set_attn_processor(UlyssesCogVideoXAttnProcessor(shards))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                taps_only: bool = False):
        """sample [B, F, C, h, w], timestep [B] (0..999), encoder_hidden_states [B, L, 4096] -> v [B, F, C, h, w];
        with taps_only: per tapped block [B, D, F, h/p, w/p]. Under sequence parallelism each rank's blocks see
        [B, ceil(S/P), D] of the S = F h/p w/p video tokens; outputs and taps are whole on every rank."""
        rotary = self.rotary_embedding(sample)
        if not taps_only and not self.sequence.active:
            return super().forward(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                                   timestep=timestep, image_rotary_emb=rotary, return_dict=False)[0]
        # CogVideoXTransformer3DModel.forward (CogVideoX 1.0: no ofs, no patch_size_t) with the token shard/gather
        # and an early stop after the last tap; kept in step with diffusers by tests/unit/test_latent_families.py
        shards = self.sequence
        patch = self.config.patch_size
        batch, frames, _, height, width = sample.shape
        grid = (frames, height // patch, width // patch)
        emb = self.time_embedding(self.time_proj(timestep).to(dtype=sample.dtype), None)
        hidden = self.embedding_dropout(self.patch_embed(encoder_hidden_states, sample))
        text_length = encoder_hidden_states.shape[1]
        # the text rows copied out of the joint embedding: as a view they would keep all of [B, L + S, D] alive while
        # the first block's input is saved for backward, undoing the token split
        context, hidden = hidden[:, :text_length].clone(), hidden[:, text_length:]
        video_length = hidden.shape[1]
        hidden = shards.shard(hidden)                                   # [B, ceil(S/P), D]
        attention_kwargs = {"video_length": video_length} if shards.active else None
        blocks = self.transformer_blocks[:max(self.tap_blocks) + 1] if taps_only else self.transformer_blocks
        taps = []
        for index, block in enumerate(blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden, context = self._gradient_checkpointing_func(block, hidden, context, emb, rotary,
                                                                    attention_kwargs)
            else:
                hidden, context = block(hidden_states=hidden, encoder_hidden_states=context, temb=emb,
                                        image_rotary_emb=rotary, attention_kwargs=attention_kwargs)
            if taps_only and index in self.tap_blocks:
                taps.append(tokens_to_grid(shards.gather(hidden, video_length), grid))
        if taps_only:
            return taps
        hidden = self.proj_out(self.norm_out(self.norm_final(hidden), temb=emb))
        hidden = shards.gather(hidden, video_length)                    # [B, S, C p^2]: a latent's size
        output = hidden.reshape(batch, frames, height // patch, width // patch, -1, patch, patch)
        return output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


class UlyssesCogVideoXAttnProcessor:
    """diffusers' `CogVideoXAttnProcessor2_0` over a sequence-parallel group (parallel/sequence.py).

    hidden_states: this rank's video chunk [B, ceil(S/P), D]; encoder_hidden_states: the text [B, L, D], whole on
    every rank. q, k, v of the video chunk go through one all-to-all each to [B, S, H/P, d]; the text's are sliced
    to this rank's heads; attention runs on [text ; video] for H/P heads with the 5B's RoPE applied at the full
    sequence's positions. The video rows go back by the inverse all-to-all, the text rows are all-gathered over heads.
    Communication per layer: 4 all-to-alls of B S D / P elements and one all-gather of the text's B L D.
    """

    def __init__(self, shards: SequenceShards):
        self.shards = shards

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask=None, image_rotary_emb=None, video_length: int | None = None):
        if attention_mask is not None:
            raise ValueError("CogVideoX attention takes no mask")
        shards, heads = self.shards, attn.heads
        text_length = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        joint = []
        for project, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None)):
            x = project(tokens).unflatten(-1, (heads, -1))                     # [B, L + s, H, d]
            if norm is not None:
                x = norm(x)     # per-head LayerNorm over d: the same on [B, S, H, d] as on the stock [B, H, S, d]
            x = torch.cat([shards.local_heads(x[:, :text_length]), shards.to_heads(x[:, text_length:], video_length)],
                          dim=1)                                               # [B, L + S, H/P, d]
            joint.append(x.transpose(1, 2))                                    # [B, H/P, L + S, d]
        query, key, value = joint
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :text_length],
                               apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :text_length], apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)],
                                dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)
        out = torch.cat([shards.gather_heads(out[:, :text_length]), shards.to_tokens(out[:, text_length:])],
                        dim=1).flatten(2)                                      # [B, L + s, H d]
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_length:], out[:, :text_length]


class CogVideoXFamily(LatentFamily):
    denoiser_class = CogVideoXTransformer
    subfolder = "transformer"
    vae_class = AutoencoderKLCogVideoX

    def setup(self) -> None:
        c, cfg = self.config, self.cfg
        if c.get("patch_size_t") is not None or c.get("ofs_embed_dim") is not None:
            raise ValueError("CogVideoX 1.5 / image-to-video transformers (patch_size_t, ofs) are not supported: "
                             "the family covers CogVideoX-2b and -5b")
        patch = c["patch_size"]
        if (cfg.frames - 1) % TEMPORAL_COMPRESSION:
            raise ValueError(f"family.frames {cfg.frames}: must be 4k + 1 (the 3-D VAE compresses time 4x)")
        if (cfg.height // VAE_SCALE) % patch or (cfg.width // VAE_SCALE) % patch:
            raise ValueError(f"family.height/width {cfg.height}x{cfg.width}: latents must split into {patch}x{patch} "
                             f"patches")
        self.latent_frames = (cfg.frames - 1) // TEMPORAL_COMPRESSION + 1
        self.latent_size = (cfg.height // VAE_SCALE, cfg.width // VAE_SCALE)
        self.data_shape = (self.latent_frames, c["in_channels"], *self.latent_size)
        self.taps = depth_taps(c["num_layers"], cfg.taps)
        self.prompt_length = cfg.prompt_length or c["max_text_seq_length"]

    def embedding_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (self.prompt_length, self.config["text_embed_dim"])}

    def tap_shapes(self) -> list[tuple[int, int, int, int]]:
        c = self.config
        patch = c["patch_size"]
        shape = (c["num_attention_heads"] * c["attention_head_dim"], self.latent_frames,
                 self.latent_size[0] // patch, self.latent_size[1] // patch)
        return [shape] * len(self.taps)

    def denoiser_units(self, module) -> list:
        return list(module.transformer_blocks)
