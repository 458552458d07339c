"""What the latent-diffusion families (SDXL, SD3, CogVideoX) share: a diffusers denoiser built from a checked-in config
or a pretrained folder / hub id, conditioning from text embeddings, the null branch, discriminator heads on the
family's taps, FSDP units, and the latent preview for tensorboard.

Prompts. A sample's conditioning is its text-encoder outputs, one tensor per conditioning input of the denoiser
(`embedding_shapes()`). `condition(prompts)` takes them either as embeddings {input: [B, ...]} (a batch of the
prompt stream, or those stored beside a real latent or an ODE pair: what training uses) or as prompt ids [B], rows
of `self.prompts` (trainer/families/prompts.py: the encoded prompt stream read by row, or without a prompt file a
small random table from `family.prompt_seed`; sampling, grids, collection).

Each family subclass names: `denoiser_class` (a subclass of the diffusers class whose forward takes
`(sample, timestep, **condition, taps_only=False)`), `subfolder`, `embedding_shapes()`, `assemble()` (flat embeddings
-> the network's keyword arguments), `tap_shapes()` and `denoiser_units()`.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np
import torch

from diffusers import AutoencoderKL

from data.streams import StreamError
from data.toy import class_labels_for
from parallel.loading import StateSource, resolve_model_dir
from trainer.families.configs import load_config
from trainer.families.prompts import RandomPromptTable, StreamPromptTable
from trainer.heads import FeatureHeads, HybridHeads


GRID_IMAGES, GRID_VIDEOS, GRID_FRAMES = 16, 4, 8   # decoded grids: images, or videos x frames


def depth_taps(num_layers: int, taps: list[int] | None) -> list[int]:
    """Tapped block indices: the recipe's, else the ends of the 1/4, 1/2, 3/4 and full depth (docs/algorithms.md
    §10.11), without repeats."""
    if taps:
        return sorted(set(taps))
    return sorted({max(round(num_layers * f) - 1, 0) for f in (0.25, 0.5, 0.75, 1.0)})


class LatentFamily(ABC):
    denoiser_class: type
    subfolder: str           # the denoiser's folder inside a diffusers pipeline
    vae_class: type = AutoencoderKL
    conditional = True

    def __init__(self, cfg, pretrained: str | None = None, prompt_stream: str | None = None):
        """prompt_stream: the local `prompts` stream folder (encoded prompts); None: the random table."""
        self.cfg, self.pretrained = cfg, pretrained
        if pretrained:
            config = dict(self.denoiser_class.load_config(resolve_model_dir(pretrained, self.subfolder)))
        else:
            config = load_config(cfg.model)
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.setup()
        self.prompt_stream = prompt_stream
        if prompt_stream is not None:
            self.prompts = StreamPromptTable(prompt_stream, self.embedding_shapes())
        else:
            self.prompts = RandomPromptTable(self.embedding_shapes(), cfg.num_prompts, cfg.prompt_seed)
        # the null branch: the encoded empty prompt with `uncond: empty_prompt`, else zeros (null_embeddings)
        wants_empty = getattr(cfg, "uncond", "zeros") == "empty_prompt"
        self.empty_prompt = self.prompts.empty if wants_empty else None
        if prompt_stream is not None and wants_empty and self.empty_prompt is None:
            raise StreamError(f"{prompt_stream}: family.uncond: empty_prompt, but the prompt stream has no "
                              f"empty_prompt.safetensors (hint: encode it with python -m trainer.prepare prompts)")
        self._device_empty = {}   # device -> the empty prompt's rows there: moved once, not per step
        self._grid_vae = None     # render_grid's VAE (False: the teacher has none)

    @property
    def num_prompts(self) -> int:
        return self.prompts.num_prompts

    # --- per family ------------------------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Derive data_shape and the embedding sizes from self.config."""

    @abstractmethod
    def embedding_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per conditioning input, the shape of one prompt's row (no batch dim)."""

    def assemble(self, flat: dict[str, torch.Tensor], batch: int, device) -> dict:
        """Batched flat embeddings -> the denoiser's keyword arguments."""
        return dict(flat)

    @abstractmethod
    def tap_shapes(self) -> list[tuple[int, ...]]:
        """Per tap, the feature shape the heads see (no batch dim)."""

    @abstractmethod
    def denoiser_units(self, module) -> list:
        """The denoiser's blocks: its FSDP units."""

    # --- roles ----------------------------------------------------------------------------------------------
    def build_denoiser(self):
        net = self.denoiser_class.from_config(self.config)
        if hasattr(self, "taps"):          # transformer families stop their taps_only forward after the last tap
            net.tap_blocks = tuple(self.taps)
        return net

    def teacher_source(self, path: str) -> StateSource:
        """The teacher's weights: a pipeline folder or hub id (the family's subfolder) or a model folder."""
        return StateSource(path, subfolder=self.subfolder)

    def build_heads(self, hidden: int | None = None, norm: bool | None = None, bottleneck_only: bool = False
                    ) -> FeatureHeads:
        """Heads on the denoiser's taps (the last tap is the mid block: the bottleneck). hidden: None -> the family's
        `head_hidden`; norm, bottleneck_only: the method's head options (trainer.heads.FeatureHeads)."""
        shapes = self.tap_shapes()
        return FeatureHeads(shapes, hidden=hidden or self.cfg.head_hidden, norm=norm,
                            use=[len(shapes) - 1] if bottleneck_only else None)

    def shard_units(self, module) -> list:
        """FSDP units before the root: the denoiser's blocks; one unit per discriminator head."""
        if isinstance(module, self.denoiser_class):
            return self.denoiser_units(module)
        if isinstance(module, FeatureHeads):
            return list(module.heads)
        if isinstance(module, HybridHeads):   # ADP: latent and pixel heads, one unit each
            return [*module.latent.heads, *(module.pixel.heads if module.pixel is not None else [])]
        return []

    def example_inputs(self, batch: int, device) -> dict:
        """Arguments of one call per role (FSDP2's bf16 warm-up)."""
        x = torch.zeros(batch, *self.data_shape, device=device)
        t = torch.full((batch,), 500.0, device=device)
        cond = self.null_condition(batch, device)
        features = [torch.zeros(batch, *shape, device=device) for shape in self.tap_shapes()]
        call = (x, t, *cond.values())
        return {"generator": call, "fake_score": call, "heads": (features,)}

    # --- conditioning ---------------------------------------------------------------------------------------
    def embeddings(self, prompts, device=None) -> dict[str, torch.Tensor]:
        """{input: [B, ...]} float32 on `device` (default: where `prompts` are) of prompt ids [B] (rows of
        self.prompts, read on the host: only those rows) or of embeddings {input: [B, ...]} (any float dtype)."""
        if isinstance(prompts, dict):
            device = device or next(iter(prompts.values())).device
        else:
            device = device or prompts.device
            prompts = self.prompts.rows(prompts.cpu())
        return {name: value.to(device=device, dtype=torch.float32) for name, value in prompts.items()}

    def null_embeddings(self, batch: int, device) -> dict[str, torch.Tensor]:
        """The unconditional branch: the empty prompt's embeddings when the prompt stream has them (`uncond:
        empty_prompt`), else zeros as DMD2."""
        if self.empty_prompt is not None:
            device = torch.device(device)
            if device not in self._device_empty:
                self._device_empty[device] = {name: row.to(device) for name, row in self.empty_prompt.items()}
            return {name: row.expand(batch, *row.shape) for name, row in self._device_empty[device].items()}
        return {name: torch.zeros(batch, *shape, device=device) for name, shape in self.embedding_shapes().items()}

    @staticmethod
    def batch_size(prompts) -> int:
        return len(next(iter(prompts.values()))) if isinstance(prompts, dict) else len(prompts)

    def condition(self, prompts, device=None) -> dict:
        """The denoiser's keyword arguments for prompt ids [B] or embeddings {input: [B, ...]} (see `embeddings`)."""
        flat = self.embeddings(prompts, device)
        return self.assemble(flat, self.batch_size(prompts), next(iter(flat.values())).device)

    def null_condition(self, batch: int, device) -> dict:
        return self.assemble(self.null_embeddings(batch, device), batch, device)

    def drop_condition(self, prompts, drop: torch.Tensor) -> dict:
        """CFG training: the null branch's embeddings where `drop` [B] is True."""
        cond = self.embeddings(prompts, drop.device)
        null = self.null_embeddings(len(drop), drop.device)
        keep = ~drop
        mixed = {name: torch.where(keep.reshape(-1, *[1] * (c.dim() - 1)), c, null[name]) for name, c in cond.items()}
        return self.assemble(mixed, len(drop), drop.device)

    def prompt_labels(self, indices, seed: int) -> torch.Tensor:
        """The prompt id of each generator sample: a pure function of (seed, sample index)."""
        return class_labels_for(indices, self.num_prompts, seed)

    # --- decoding ------------------------------------------------------------------------------------------
    def load_vae(self, device):
        """The teacher pipeline's VAE (`vae/` of teacher.pretrained), fp32 (SDXL's VAE overflows in fp16), frozen, on
        `device`; None when the teacher is not a pipeline with a VAE (a bare denoiser folder)."""
        if not self.pretrained:
            return None
        try:
            folder = resolve_model_dir(self.pretrained, "vae")
        except OSError:
            return None
        if os.path.basename(os.path.normpath(folder)) != "vae":   # no vae/ beside the denoiser
            return None
        return self.vae_class.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, *data_shape] -> RGB frames [N, F, 3, H, W] in [0, 1] (F = 1 for images), as the stock
        pipelines decode: image latents / scaling_factor + shift_factor; video latents channels first, / scaling."""
        cfg = vae.config
        x = latents.to(next(vae.parameters()).device, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            if x.dim() == 5:   # [N, F, C, h, w] -> the 3-D VAE's [N, C, F, h, w]
                frames = vae.decode(x.permute(0, 2, 1, 3, 4) / cfg.scaling_factor).sample.permute(0, 2, 1, 3, 4)
            else:
                shift = getattr(cfg, "shift_factor", None) or 0.0
                frames = vae.decode(x / cfg.scaling_factor + shift).sample.unsqueeze(1)
        return ((frames.float() + 1) / 2).clamp(0, 1)

    # --- previews -------------------------------------------------------------------------------------------
    def render_grid(self, samples: torch.Tensor):
        """HWC uint8 grid of latents [N, C, h, w] (video [N, F, C, h, w]): decoded with the teacher pipeline's VAE
        (loaded once, on the samples' device) into `frame_grid`; without a VAE a latent preview: channels 0-2 as
        RGB (video: the first frame), each sample scaled to its own range, tiled 4 per row."""
        if self._grid_vae is None:
            self._grid_vae = self.load_vae(samples.device) or False
        if self._grid_vae:
            return frame_grid(self.decode(self._grid_vae, samples))
        x = samples.float().cpu()
        if x.dim() == 5:
            x = x[:, 0]
        x = x[:, :3]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).to(torch.uint8)            # [N, 3, h, w]
        cols = min(4, len(x))
        rows = (len(x) + cols - 1) // cols
        pad = torch.zeros(rows * cols - len(x), *x.shape[1:], dtype=torch.uint8)
        x = torch.cat([x, pad]).reshape(rows, cols, *x.shape[1:])                    # [R, C, 3, h, w]
        return np.ascontiguousarray(x.permute(0, 3, 1, 4, 2).reshape(rows * x.shape[3], cols * x.shape[4], 3).numpy())


def frame_grid(frames: torch.Tensor) -> np.ndarray:
    """Decoded frames [N, F, 3, H, W] in [0, 1] -> HWC uint8: images (F = 1) 4 per row; videos one per row, up to
    GRID_FRAMES evenly spaced frames each."""
    if frames.shape[1] == 1:
        x = frames[:GRID_IMAGES, 0]
        cols = min(4, len(x))
        rows = (len(x) + cols - 1) // cols
        x = torch.cat([x, x.new_zeros(rows * cols - len(x), *x.shape[1:])]).reshape(rows, cols, *x.shape[1:])
    else:
        keep = torch.linspace(0, frames.shape[1] - 1, min(GRID_FRAMES, frames.shape[1])).round().long()
        x = frames[:GRID_VIDEOS, keep]
    rows, cols, _, h, w = x.shape
    x = (x.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3).numpy())


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Image / video tokens [B, N, D] in row-major (frames, height, width) order -> [B, D, *grid] for conv heads."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
