"""MDS schemas for every stream, and the typed batches they collate into.

A stream is a folder of MDS shards with an `index.json` (local directory or object-store URI). Each kind has fixed
columns; `columns(kind, ...)` gives the MDSWriter spec and `check_columns` compares a stream's index against it, so
a stream of the wrong kind fails at open with the shard and column named, not mid-training.

Shapes (B = batch):
  prompts        ids [B] int64, texts list[str], labels [B] int64 (class id or -1)
  images         ids [B], images list[PIL.Image], captions list[str]            (raw, before VAE encoding)
  real_latents   ids [B], latents [B, C, H, W] float16 (toy: [B, D]), captions list[str], labels [B]
  video_latents  ids [B], latents [B, C, F, H, W] float16, captions list[str], num_frames [B] int64
  ode_pairs      ids [B], noise [B, ...] float32 (unit variance, as drawn), noise_seeds [B] int64 (the draw's key:
                 parallel/randomness.py counter_normal(key, ids, shape) regenerates the noise),
                 outputs [B, ...] float32 (the teacher's deterministic ODE solution), texts, labels [B],
                 sampler dict (name, steps, guidance_scale, schedule) per sample

Text embeddings. `prompts`, `real_latents`, `video_latents` and `ode_pairs` may carry the family's text-encoder
outputs of their text / caption: one column `emb_<input>` per conditioning input of the denoiser (SDXL
`emb_encoder_hidden_states` [L, D] and `emb_text_embeds` [P]; SD3 `emb_encoder_hidden_states`,
`emb_pooled_projections`; CogVideoX `emb_encoder_hidden_states`), float16 or float32. They collate into
`embeddings` {input: [B, ...]} (empty without them). The latent families train on them: a sample is conditioned
on the embeddings stored beside it (trainer/families/prompts.py writes them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

KINDS = ("prompts", "images", "real_latents", "video_latents", "ode_pairs")
EMBEDDING_PREFIX = "emb_"
EMBEDDING_ENCODINGS = ("ndarray:float16", "ndarray:float32")


def embedding_columns(names, dtype: str = "float16") -> dict[str, str]:
    """The `emb_<input>` columns of a family's conditioning inputs (`names`), stored as `dtype`."""
    return {EMBEDDING_PREFIX + name: f"ndarray:{dtype}" for name in names}


def columns(kind: str, embeddings: dict[str, str] | None = None) -> dict[str, str]:
    """The MDSWriter column spec of `kind`; `embeddings`: extra `emb_*` columns (embedding_columns)."""
    return {**_columns(kind), **(embeddings or {})}


def _columns(kind: str) -> dict[str, str]:
    base = {"id": "int"}
    if kind == "prompts":
        return {**base, "text": "str", "label": "int"}
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
    """Compare each shard's columns in `index.json` with the schema of `kind` (`emb_*` columns allowed besides)."""
    required = columns(kind)
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
        extra = {c for c in set(have) - set(required)
                 if not (c.startswith(EMBEDDING_PREFIX) and kind != "images" and have[c] in EMBEDDING_ENCODINGS)}
        if extra:
            raise StreamSchemaError(f"{where}: shard {name}: unexpected columns {sorted(extra)} for a '{kind}' "
                                    f"stream")


@dataclass
class PromptsBatch:
    ids: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    embeddings: dict = field(default_factory=dict)


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
    embeddings: dict = field(default_factory=dict)


@dataclass
class VideoLatentsBatch:
    ids: torch.Tensor
    latents: torch.Tensor
    captions: list[str]
    num_frames: torch.Tensor
    embeddings: dict = field(default_factory=dict)


@dataclass
class OdePairsBatch:
    ids: torch.Tensor
    noise: torch.Tensor
    noise_seeds: torch.Tensor
    outputs: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    sampler: list[dict] = field(default_factory=list)
    embeddings: dict = field(default_factory=dict)


def _ids(samples):
    return torch.tensor([s["id"] for s in samples], dtype=torch.int64)


def _stack(samples, key, dtype=None):
    return torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])).to(dtype or torch.float32)


def stack_embeddings(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{input: [B, ...]} of the samples' `emb_<input>` columns, in their stored dtype (float16 / float32)."""
    return {key[len(EMBEDDING_PREFIX):]: torch.from_numpy(np.stack([s[key] for s in samples]))
            for key in samples[0] if key.startswith(EMBEDDING_PREFIX)}


def collate(kind: str, samples: list[dict[str, Any]]):
    """List of decoded MDS samples -> the kind's typed batch."""
    if kind == "prompts":
        return PromptsBatch(_ids(samples), [s["text"] for s in samples], torch.tensor([s["label"] for s in samples]),
                            stack_embeddings(samples))
    if kind == "images":
        return ImagesBatch(_ids(samples), [s["image"] for s in samples], [s["caption"] for s in samples])
    if kind == "real_latents":
        return RealLatentsBatch(_ids(samples), _stack(samples, "latent", torch.float16),
                                [s["caption"] for s in samples], torch.tensor([s["label"] for s in samples]),
                                stack_embeddings(samples))
    if kind == "video_latents":
        return VideoLatentsBatch(_ids(samples), _stack(samples, "latent", torch.float16),
                                 [s["caption"] for s in samples], torch.tensor([s["num_frames"] for s in samples]),
                                 stack_embeddings(samples))
    if kind == "ode_pairs":
        sampler = [s["sampler"] if isinstance(s["sampler"], dict) else json.loads(s["sampler"]) for s in samples]
        return OdePairsBatch(_ids(samples), _stack(samples, "noise"), torch.tensor([s["noise_seed"] for s in samples]),
                             _stack(samples, "output"), [s["text"] for s in samples],
                             torch.tensor([s["label"] for s in samples]), sampler, stack_embeddings(samples))
    raise ValueError(kind)
