"""The recipe's `eval:` section (docs/evaluation.md), beside the sections of trainer/config.py."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from trainer.sections import Section


class EvalConfig(Section):
    """The evaluate stage, `python -m trainer.evaluate` and in-loop evaluation (docs/evaluation.md). Toys: FD,
    precision and recall in a small classifier's features. Latent families: FD-DINOv2 and CLIP score of decoded
    samples (trainer/image_metrics.py), with local model folders or cached hub ids; nothing is downloaded."""
    num_samples: int = Field(2000, gt=0, description="samples drawn (latent families: over all ranks)")
    sample_seed: int = 12345
    grid_samples: int = Field(64, gt=0, description="fixed-seed samples drawn into the PNG grid (toys)")
    dinov2: Optional[str] = Field(None, description="latent families: a DINOv2 folder or cached hub id (e.g. "
                                  "facebook/dinov2-large) for FD-DINOv2")
    clip: Optional[str] = Field(None, description="latent families: a CLIP folder or cached hub id (e.g. "
                                "openai/clip-vit-large-patch14) for the CLIP score against each sample's prompt")
    resolution: int = Field(224, gt=0, description="DINOv2's input side in pixels: decoded samples are resized "
                            "(shorter side, bicubic) and centre-cropped to it")
    reference: Optional[str] = Field(None, description="FD-DINOv2's reference statistics (python -m "
                                     "trainer.reference_stats on real images); default: the teacher's samples for the "
                                     "same prompts and noise, computed once per run")
    prompts: Optional[str] = Field(None, description="held-out prompts: a .txt / .jsonl / .parquet file (encoded into "
                                   "<run.dir>/eval_prompts) or an encoded stream folder; default: the training prompts "
                                   "(then metrics.json says so)")
    every: int = Field(0, ge=0, description="latent families: distill-stage steps between in-loop evaluations "
                       "(tensorboard eval/*); 0: off")
    batch_size: int = Field(8, gt=0, description="latent families: samples per rank per sampling call")
