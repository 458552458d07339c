"""What the latent-diffusion families (SDXL, SD3, CogVideoX) share: a diffusers denoiser built from a checked-in config
or a pretrained folder / hub id, prompts as rows of a conditioning table, the null branch, discriminator heads on the
family's taps, FSDP units, and the latent preview for tensorboard.

Prompts. A generator sample's prompt is an id (a pure function of the seed and the sample index, as the toy's
classes), and its conditioning is that row of a table of text-encoder outputs: one tensor per conditioning input of
the denoiser (`embedding_shapes()`). The table is either the prompt file's embeddings, encoded once by the teacher
pipeline's own `encode_prompt` (trainer/families/prompts.py: the precomputed-embeddings path), or, without a prompt
file, unit-variance random rows from `family.prompt_seed` (tiny twins, benchmarks, planning).

Each family subclass names: `denoiser_class` (a subclass of the diffusers class whose forward takes
`(sample, timestep, **condition, taps_only=False)`), `subfolder`, `embedding_shapes()`, `assemble()` (flat embeddings
-> the network's keyword arguments), `tap_shapes()` and `denoiser_units()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from data.toy import class_labels_for
from parallel.loading import StateSource, resolve_model_dir
from trainer.families.configs import load_config
from trainer.heads import FeatureHeads, HybridHeads


def depth_taps(num_layers: int, taps: list[int] | None) -> list[int]:
    """Tapped block indices: the recipe's, else the ends of the 1/4, 1/2, 3/4 and full depth (docs/algorithms.md
    §10.11), without repeats."""
    if taps:
        return sorted(set(taps))
    return sorted({max(round(num_layers * f) - 1, 0) for f in (0.25, 0.5, 0.75, 1.0)})


class LatentFamily(ABC):
    denoiser_class: type
    subfolder: str           # the denoiser's folder inside a diffusers pipeline
    conditional = True

    def __init__(self, cfg, pretrained: str | None = None, prompt_table: dict | None = None):
        self.cfg, self.pretrained = cfg, pretrained
        if pretrained:
            config = dict(self.denoiser_class.load_config(resolve_model_dir(pretrained, self.subfolder)))
        else:
            config = load_config(cfg.model)
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.setup()
        table = dict(prompt_table) if prompt_table is not None else self.random_prompt_table()
        empty = {name[len("empty."):]: table.pop(name) for name in list(table) if name.startswith("empty.")}
        # the null branch: the encoded empty prompt with `uncond: empty_prompt`, else zeros (null_embeddings)
        self.empty_prompt = empty if getattr(cfg, "uncond", "zeros") == "empty_prompt" else None
        self.prompt_table = table
        self.num_prompts = len(next(iter(table.values())))

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

    def build_heads(self) -> FeatureHeads:
        return FeatureHeads(self.tap_shapes(), hidden=self.cfg.head_hidden)

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
    def random_prompt_table(self) -> dict[str, torch.Tensor]:
        """[P, ...] unit-variance rows per conditioning input, a pure function of `family.prompt_seed`."""
        generator = torch.Generator().manual_seed(self.cfg.prompt_seed)
        return {name: torch.randn(self.cfg.num_prompts, *shape, generator=generator)
                for name, shape in self.embedding_shapes().items()}

    def embeddings(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        device = labels.device
        return {name: table.to(device)[labels] for name, table in self.prompt_table.items()}

    def null_embeddings(self, batch: int, device) -> dict[str, torch.Tensor]:
        """The unconditional branch: the empty prompt's embeddings when the prompt table has them (`uncond:
        empty_prompt`), else zeros as DMD2."""
        if self.empty_prompt is not None:
            return {name: row.to(device).expand(batch, *row.shape) for name, row in self.empty_prompt.items()}
        return {name: torch.zeros(batch, *shape, device=device) for name, shape in self.embedding_shapes().items()}

    def condition(self, labels: torch.Tensor) -> dict:
        return self.assemble(self.embeddings(labels), len(labels), labels.device)

    def null_condition(self, batch: int, device) -> dict:
        return self.assemble(self.null_embeddings(batch, device), batch, device)

    def drop_condition(self, labels: torch.Tensor, drop: torch.Tensor) -> dict:
        """CFG training: the null branch's embeddings where `drop` [B] is True."""
        cond, null = self.embeddings(labels), self.null_embeddings(len(labels), labels.device)
        keep = ~drop
        mixed = {name: torch.where(keep.reshape(-1, *[1] * (c.dim() - 1)), c, null[name]) for name, c in cond.items()}
        return self.assemble(mixed, len(labels), labels.device)

    def prompt_labels(self, indices, seed: int) -> torch.Tensor:
        """The prompt id of each generator sample: a pure function of (seed, sample index)."""
        return class_labels_for(indices, self.num_prompts, seed)

    # --- previews -------------------------------------------------------------------------------------------
    def render_grid(self, samples: torch.Tensor):
        """HWC uint8 preview of latents [N, C, h, w] (video [N, F, C, h, w]: the first frame): channels 0-2 as RGB,
        each sample scaled to its own range, tiled 4 per row. A latent preview: decoding is the export's job."""
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


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Image / video tokens [B, N, D] in row-major (frames, height, width) order -> [B, D, *grid] for conv heads."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
