"""MDS schemas for every stream, and the typed batches they collate into.

A stream is a folder of MDS shards with an `index.json` (local directory or object-store URI). Each kind has fixed
columns; `columns(kind, ...)` gives the MDSWriter spec and `check_columns` compares a stream's index against it, so
a stream of the wrong kind fails at open with the shard and column named, not mid-training.

Shapes (B = batch):
  prompts        ids [B] int64, texts list[str], labels [B] int64 (class id or -1),
                 text_embeddings [B, L, D] float16 (optional: precomputed with the family's text encoder)
  images         ids [B], images list[PIL.Image], captions list[str]            (raw, before VAE encoding)
  real_latents   ids [B], latents [B, C, H, W] float16 (toy: [B, D]), captions list[str], labels [B]
  video_latents  ids [B], latents [B, C, F, H, W] float16, captions list[str], num_frames [B] int64
  ode_pairs      ids [B], noise [B, ...] float32 (unit variance, as drawn), noise_seeds [B] int64,
                 outputs [B, ...] float32 (the teacher's deterministic ODE solution), texts, labels [B],
                 sampler dict (name, steps, guidance_scale, schedule) per sample
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

KINDS = ("prompts", "images", "real_latents", "video_latents", "ode_pairs")


def columns(kind: str, text_embeddings: bool = False) -> dict[str, str]:
    base = {"id": "int"}
    if kind == "prompts":
        cols = {**base, "text": "str", "label": "int"}
        if text_embeddings:
            cols["text_embedding"] = "ndarray:float16"
        return cols
    if kind == "images":
        return {**base, "image": "png", "caption": "str"}
    if kind == "real_latents":
        return {**base, "latent": "ndarray:float16", "caption": "str", "label": "int"}
    if kind == "video_latents":
        return {**base, "latent": "ndarray:float16", "caption": "str", "num_frames": "int"}
    if kind == "ode_pairs":
        return {**base, "noise": "ndarray:float32", "noise_seed": "int", "output": "ndarray:float32", "text": "str",
                "label": "int", "sampler": "json"}
    raise ValueError(f"unknown stream kind '{kind}' (one of {', '.join(KINDS)})")


class StreamSchemaError(ValueError):
    """A stream's shards do not hold the columns its kind needs."""


def check_columns(kind: str, index: dict, where: str) -> None:
    """Compare each shard's columns in `index.json` with the schema of `kind` (extra optional columns allowed)."""
    required = columns(kind)
    optional = set(columns(kind, text_embeddings=True)) - set(required)
    for shard in index.get("shards", []):
        name = shard.get("raw_data", {}).get("basename", "?")
        have = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        for col, enc in required.items():
            if col not in have:
                raise StreamSchemaError(f"{where}: shard {name}: column '{col}' missing for a '{kind}' stream "
                                        f"(has {sorted(have)}); hint: was it written for another kind?")
            if have[col] != enc:
                raise StreamSchemaError(f"{where}: shard {name}: column '{col}' is '{have[col]}', a '{kind}' stream "
                                        f"needs '{enc}'")
        extra = set(have) - set(required) - optional
        if extra:
            raise StreamSchemaError(f"{where}: shard {name}: unexpected columns {sorted(extra)} for a '{kind}' "
                                    f"stream")


@dataclass
class PromptsBatch:
    ids: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    text_embeddings: Optional[torch.Tensor] = None


@dataclass
class ImagesBatch:
    ids: torch.Tensor
    images: list
    captions: list[str]


@dataclass
class RealLatentsBatch:
    ids: torch.Tensor
    latents: torch.Tensor
    captions: list[str]
    labels: torch.Tensor


@dataclass
class VideoLatentsBatch:
    ids: torch.Tensor
    latents: torch.Tensor
    captions: list[str]
    num_frames: torch.Tensor


@dataclass
class OdePairsBatch:
    ids: torch.Tensor
    noise: torch.Tensor
    noise_seeds: torch.Tensor
    outputs: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    sampler: list[dict] = field(default_factory=list)


def _ids(samples):
    return torch.tensor([s["id"] for s in samples], dtype=torch.int64)


def _stack(samples, key, dtype=None):
    return torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])).to(dtype or torch.float32)


def collate(kind: str, samples: list[dict[str, Any]]):
    """List of decoded MDS samples -> the kind's typed batch."""
    if kind == "prompts":
        emb = _stack(samples, "text_embedding", torch.float16) if "text_embedding" in samples[0] else None
        return PromptsBatch(_ids(samples), [s["text"] for s in samples],
                            torch.tensor([s["label"] for s in samples]), emb)
    if kind == "images":
        return ImagesBatch(_ids(samples), [s["image"] for s in samples], [s["caption"] for s in samples])
    if kind == "real_latents":
        return RealLatentsBatch(_ids(samples), _stack(samples, "latent", torch.float16),
                                [s["caption"] for s in samples], torch.tensor([s["label"] for s in samples]))
    if kind == "video_latents":
        return VideoLatentsBatch(_ids(samples), _stack(samples, "latent", torch.float16),
                                 [s["caption"] for s in samples], torch.tensor([s["num_frames"] for s in samples]))
    if kind == "ode_pairs":
        sampler = [s["sampler"] if isinstance(s["sampler"], dict) else json.loads(s["sampler"]) for s in samples]
        return OdePairsBatch(_ids(samples), _stack(samples, "noise"), torch.tensor([s["noise_seed"] for s in samples]),
                             _stack(samples, "output"), [s["text"] for s in samples],
                             torch.tensor([s["label"] for s in samples]), sampler)
    raise ValueError(kind)
