"""Toy evaluation: Fréchet distance in a small classifier's feature space, class / mode coverage, precision and
recall (Kynkäänniemi et al. 2019, k = 3), for the student and — at the same guidance scale — the teacher's
multi-step sampler, all against held-out real data. Writes metrics.json, a PNG grid and tensorboard scalars.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.neighbors import NearestNeighbors
from torch import nn

from data.toy import GRID_STD, ToyDataset
from parallel.randomness import StepRandom, derive_seed

CLASSIFIER_SEED = 7   # fixed: every run and method is measured in the same feature space


class ToyClassifier(nn.Module):
    def __init__(self, data_dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.logits = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.logits(self.features(x))


def train_classifier(dataset: ToyDataset, split: str = "classifier", steps: int = 600) -> ToyClassifier:
    """Full-batch AdamW on one half of the training split (deterministic; about a second on a CPU core)."""
    idx = dataset.classifier_idx if split == "classifier" else dataset.classifier_b_idx
    x, y = dataset.train_x[idx], dataset.train_y[idx]
    g = torch.Generator().manual_seed(derive_seed(CLASSIFIER_SEED, dataset.name, split))
    torch.manual_seed(derive_seed(CLASSIFIER_SEED, dataset.name, split, "init"))
    model = ToyClassifier(dataset.data_dim, dataset.num_label_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        # light input noise makes the features smooth around the data manifold
        xb = x + 0.05 * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall: a sample is inside a set's manifold if it falls within the k-NN radius of some
    member of that set."""
    def radii(x):
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return dist[:, -1]

    def coverage(ref, ref_radii, query):
        dist, idx = NearestNeighbors(n_neighbors=min(len(ref), 64)).fit(ref).kneighbors(query)
        return float((dist <= ref_radii[idx]).any(axis=1).mean())

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def grid_modes(samples: torch.Tensor, dataset: ToyDataset, min_share: float = 0.1) -> dict:
    """Mode coverage on the grids: a sample is high quality within 3 std of a mode; a mode is covered when it
    receives at least `min_share` of its expected count."""
    d = torch.cdist(samples.float(), dataset.mode_means)
    nearest = d.argmin(1)
    good = d.min(1).values <= 3 * GRID_STD
    counts = torch.bincount(nearest[good], minlength=25).float()
    expected = dataset.mode_weights * len(samples)
    return {"modes_covered": int((counts >= torch.clamp(min_share * expected, min=1.0)).sum()),
            "high_quality_fraction": float(good.float().mean())}


def metrics_for(samples: torch.Tensor, labels: torch.Tensor, dataset: ToyDataset, classifier: ToyClassifier) -> dict:
    feats = classifier.features(samples.float()).numpy().astype(np.float64)
    ref = classifier.features(dataset.heldout_x).numpy().astype(np.float64)
    precision, recall = precision_recall(ref, feats)
    out = {"fd": frechet_distance(feats, ref), "precision": precision, "recall": recall}
    predicted = classifier(samples.float()).argmax(1)
    hist = torch.bincount(predicted, minlength=dataset.num_label_classes).float()
    expected = len(samples) / dataset.num_label_classes
    if dataset.num_classes:   # conditional: did each requested class come out as that class?
        out["class_accuracy"] = float((predicted == labels).float().mean())
        out["classes_covered"] = int((hist >= 0.1 * expected).sum())
    else:
        out.update(grid_modes(samples, dataset))
    return out


def sample_grid_png(samples: torch.Tensor, dataset: ToyDataset, path: str | None) -> np.ndarray:
    """Digits: an 8x8 grid of 8x8 images (x4); grids: a 512 px scatter plot. Returns the HWC uint8 image, also
    written to `path` unless it is None."""
    if dataset.data_dim == 64:
        n = min(64, len(samples))
        cols = 8
        rows = (n + cols - 1) // cols
        canvas = np.zeros((rows * 9 + 1, cols * 9 + 1), dtype=np.float32)
        imgs = ((samples[:n].clamp(-1, 1) + 1) / 2).reshape(n, 8, 8).numpy()
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[1 + r * 9: 1 + r * 9 + 8, 1 + c * 9: 1 + c * 9 + 8] = imgs[i]
        img = (np.kron(canvas, np.ones((4, 4))) * 255).astype(np.uint8)
        rgb = np.stack([img] * 3, -1)
    else:
        size = 512
        rgb = np.full((size, size, 3), 255, dtype=np.uint8)
        to_px = lambda v: np.clip(((v + 5) / 10 * (size - 1)).round().astype(int), 0, size - 1)  # noqa: E731
        for mx, my in dataset.mode_means.numpy():   # a light grey ring of radius 3 std around every mode
            cx, cy = int(to_px(np.array([mx]))[0]), size - 1 - int(to_px(np.array([my]))[0])
            radius = max(2, int(round(3 * GRID_STD / 10 * (size - 1))))
            angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            rgb[np.clip(cy + (radius * np.sin(angles)).round().astype(int), 0, size - 1),
                np.clip(cx + (radius * np.cos(angles)).round().astype(int), 0, size - 1)] = (200, 200, 200)
        xs, ys = to_px(samples[:, 0].numpy()), to_px(samples[:, 1].numpy())
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                rgb[np.clip(size - 1 - ys + dy, 0, size - 1), np.clip(xs + dx, 0, size - 1)] = (30, 60, 200)
    if path is not None:
        Image.fromarray(rgb).save(path)
    return rgb


def eval_labels(num: int, dataset: ToyDataset) -> torch.Tensor:
    """Balanced class requests for conditional toys (i mod classes); zeros for unconditional ones."""
    if dataset.num_classes == 0:
        return torch.zeros(num, dtype=torch.int64)
    return torch.arange(num) % dataset.num_classes


def eval_noise(num: int, seed: int, shape, purpose: str) -> torch.Tensor:
    return StepRandom(seed, 0, range(num)).normal(purpose, shape)


def write_metrics(path: str, metrics: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
