"""Metrics of decoded samples for the latent families (docs/evaluation.md), with local weights only:

- FD-DINOv2: the Fréchet distance between Gaussians fitted to DINOv2 features (the CLS token after the last layer
  norm, transformers' `Dinov2Model.pooler_output`) of the samples and of a reference set. Stein et al. (NeurIPS 2023)
  found it tracks human judgement where Inception FID does not. The accumulation and the distance are torchmetrics'
  `FrechetInceptionDistance` with a DINOv2 feature module; this file adds the preprocessing, the reduction over
  ranks and the reference statistics' file.
- CLIP score: 100 * max(cos(image embedding, caption embedding), 0), averaged over samples (Hessel et al. 2021, the
  definition torchmetrics uses). Computed here with transformers' `CLIPModel`: torchmetrics' CLIPScore does not load
  with transformers 5.x.

Images are [N, 3, H, W] floats in [0, 1]; video frames are scored as images (the caller flattens them).
Reference statistics are one safetensors file: the feature sums, the sum of outer products and the count (float64,
over every rank), with the feature model's hash, the input resolution and the sample count in its metadata; a file
made with another model or resolution, or with fewer samples than the evaluation draws, is refused with one line.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import AutoTokenizer, CLIPModel, Dinov2Model
from transformers.utils.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD)

from parallel.loading import resolve_model_dir

REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
SAMPLE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


class ReferenceError(ValueError):
    """A reference-statistics file that does not fit the evaluation: one line, file, problem and hint."""


def model_hash(folder: str) -> str:
    """sha256 over the model folder's weights and config files (names and contents, in name order): a reference
    made with other weights is refused. Reads the files once (DINOv2-g: 4.5 GB, seconds)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(WEIGHT_SUFFIXES):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def processor_stats(folder: str, mean, std) -> tuple[tuple, tuple]:
    """The image mean and std of the model's preprocessor_config.json, else the given defaults."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        return tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return tuple(mean), tuple(std)


def square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, size, size] in [0, 1]: the shorter side resized to `size` (bicubic,
    antialiased), then the centre crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def resized(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """`square`, then normalised with the model's mean and std."""
    x = square(images, size)
    return (x - x.new_tensor(mean).reshape(1, 3, 1, 1)) / x.new_tensor(std).reshape(1, 3, 1, 1)


class DinoFeatures(nn.Module):
    """images [N, 3, H, W] in [0, 1] -> DINOv2 features [N, hidden] (the pooled CLS token), fp32."""

    def __init__(self, path: str, resolution: int):
        super().__init__()
        self.folder = resolve_model_dir(path)
        self.model = Dinov2Model.from_pretrained(self.folder).eval().requires_grad_(False)
        self.resolution = resolution
        self.num_features = self.model.config.hidden_size   # torchmetrics reads it instead of a dummy forward
        self.mean, self.std = processor_stats(self.folder, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = resized(images, self.resolution, self.mean, self.std)
        return self.model(pixel_values=pixels.to(self.model.dtype)).pooler_output.float()


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a copy; the tensor itself when there is no process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class FrechetDINOv2:
    """Fréchet distance in DINOv2 space: `update(images)` per rank on its own samples, `update_reference(images)` to
    accumulate a reference set, `compute()` (collective) sums every rank's states and returns the distance."""

    def __init__(self, path: str, resolution: int, device):
        self.features = DinoFeatures(path, resolution).to(device)
        # the states are summed over ranks here (summed()): torchmetrics' own sync would add a loaded reference once
        # per rank
        self.metric = FrechetInceptionDistance(feature=self.features, reset_real_features=False,
                                               sync_on_compute=False, compute_with_cache=False).to(device)
        # compute() casts to the features' dtype, which update() records: set here for a rank that drew no samples
        self.metric.orig_dtype = torch.float32
        self.reference_ready = False

    def update(self, images: torch.Tensor) -> None:
        self.metric.update(images, real=False)

    def update_reference(self, images: torch.Tensor) -> None:
        self.metric.update(images, real=True)

    def reduce_reference(self) -> None:
        """Collective: every rank's reference states -> their sum on every rank."""
        for name in REFERENCE_STATES:
            setattr(self.metric, name, summed(getattr(self.metric, name)))
        self.reference_ready = True

    def compute(self) -> float:
        for name in SAMPLE_STATES:
            setattr(self.metric, name, summed(getattr(self.metric, name)))
        value = float(self.metric.compute())
        self.metric.reset()   # the samples' states; the reference stays (reset_real_features=False)
        return value

    # --- reference statistics -----------------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        return {"feature_model": "dinov2", "feature_model_sha256": model_hash(self.features.folder),
                "resolution": str(self.features.resolution)}

    def save_reference(self, path: str, source: str) -> dict:
        """Write the (already reduced) reference states with their metadata, atomically; returns the metadata."""
        states = {name: getattr(self.metric, name).detach().cpu().contiguous() for name in REFERENCE_STATES}
        meta = {**self.identity(), "num_samples": str(int(states["real_features_num_samples"])), "source": source}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file(states, tmp, metadata=meta)
        os.replace(tmp, path)
        return meta

    def load_reference(self, path: str, min_samples: int, hint: str, source: str | None = None) -> dict:
        """Load a reference file into the states (every rank reads it); a ReferenceError when it was made with
        another feature model or resolution, or holds fewer than `min_samples` samples, or (source given) comes from
        another source."""
        if not os.path.isfile(path):
            raise ReferenceError(f"{path}: no such reference statistics file (hint: {hint})")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            states = {name: f.get_tensor(name) for name in REFERENCE_STATES if name in f.keys()}
        if len(states) != len(REFERENCE_STATES):
            raise ReferenceError(f"{path}: not a reference statistics file (hint: {hint})")
        ours = self.identity()
        for key in ("feature_model", "feature_model_sha256", "resolution"):
            if meta.get(key) != ours[key]:
                raise ReferenceError(f"{path}: made with {key} {meta.get(key)!r}, this evaluation uses {ours[key]!r}: "
                                     f"the distances would not compare (hint: {hint})")
        if source is not None and meta.get("source") != source:
            raise ReferenceError(f"{path}: made from {meta.get('source')!r}, not {source!r} (hint: {hint})")
        count = int(meta.get("num_samples", 0))
        if count < min_samples:
            raise ReferenceError(f"{path}: {count} reference samples, fewer than the {min_samples} the evaluation "
                                 f"draws: the distance's bias would follow the smaller set (hint: {hint})")
        device = self.metric.real_features_sum.device
        for name, value in states.items():
            setattr(self.metric, name, value.to(device))
        self.reference_ready = True
        return meta


class ClipScore:
    """Mean CLIP score of (image, caption) pairs: `update(images, captions)` per rank, `compute()` collective."""

    def __init__(self, path: str, device):
        folder = resolve_model_dir(path)
        self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_size = self.model.config.vision_config.image_size
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.mean, self.std = processor_stats(folder, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.device = torch.device(device)
        self.total = torch.zeros(2, dtype=torch.float64, device=self.device)   # [sum of scores, count]

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """[N] per-pair scores."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        pixels = resized(images.to(self.device), self.image_size, self.mean, self.std)
        image = self.model.get_image_features(pixel_values=pixels)
        text = self.model.get_text_features(**tokens)
        image = getattr(image, "pooler_output", image)   # transformers 5 may return an output object
        text = getattr(text, "pooler_output", text)
        return (100 * F.cosine_similarity(image.float(), text.float(), dim=-1)).clamp_min(0)

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        s = self.scores(images, captions)
        self.total += torch.stack([s.double().sum(), s.new_tensor(len(s), dtype=torch.float64)])

    def compute(self) -> float:
        total = summed(self.total)
        self.total = torch.zeros_like(self.total)
        return float(total[0] / total[1].clamp_min(1))
