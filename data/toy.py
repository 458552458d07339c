"""The bundled toy datasets (nothing is downloaded).

- digits: scikit-learn's bundled `load_digits` (1797 8x8 images), as 64-vectors x = pixel / 8 - 1 in [-1, 1],
  class-conditional (10 classes), so the CFG paths are real.
- grid25 / grid25u: 2-D mixture of 25 Gaussians, means (-4 + 2i, -4 + 2j), std 0.05; equal weights, or the unequal
  weights of data/toy/grid25u_weights.txt. Unconditional; the mode index is kept as a label for evaluation only.

Splits are fixed (seeded) and disjoint: `train` feeds the teacher and the DMD2 real branch; `heldout` is the
reference for every metric; `classifier` (half of train) trains the evaluation classifier; `classifier_b` (the other
half) is reserved for a second network that must not share the evaluation classifier's data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from sklearn.datasets import load_digits

from parallel.randomness import derive_seed

GRID_STD = 0.05
HERE = os.path.dirname(os.path.abspath(__file__))
GRID_WEIGHTS_FILE = os.path.join(HERE, "toy", "grid25u_weights.txt")
DATA_SEED = 20250718   # fixed: splits must not move with the run's seed


@dataclass(frozen=True)
class ToyDataset:
    name: str
    data_dim: int
    num_classes: int           # classes the model is conditioned on (0 = unconditional)
    num_label_classes: int     # classes of the evaluation labels (digits 10, grid modes 25)
    train_x: torch.Tensor      # [N_train, D] float32
    train_y: torch.Tensor      # [N_train] int64
    heldout_x: torch.Tensor    # [N_heldout, D]
    heldout_y: torch.Tensor
    classifier_idx: torch.Tensor     # indices into train for the evaluation classifier
    classifier_b_idx: torch.Tensor   # the disjoint other half
    mode_means: torch.Tensor | None  # [25, 2] for the grids
    mode_weights: torch.Tensor | None


def grid_means() -> torch.Tensor:
    coords = torch.arange(5, dtype=torch.float32) * 2 - 4
    return torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1).reshape(25, 2)


def read_grid_weights(path: str = GRID_WEIGHTS_FILE) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [line.split() for line in open(path) if line.strip() and not line.startswith("#")]
    means = torch.tensor([[float(r[0]), float(r[1])] for r in rows])
    weights = torch.tensor([float(r[2]) for r in rows], dtype=torch.float64)
    return means, weights / weights.sum()


def _grid(name: str, n_train: int = 20000, n_heldout: int = 5000) -> ToyDataset:
    if name == "grid25":
        means, weights = grid_means(), torch.full((25,), 1 / 25, dtype=torch.float64)
    else:
        means, weights = read_grid_weights()
    g = torch.Generator().manual_seed(derive_seed(DATA_SEED, name))
    n = n_train + n_heldout
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[labels] + GRID_STD * torch.randn(n, 2, generator=g)
    half = torch.randperm(n_train, generator=g)
    return ToyDataset(name, 2, 0, 25, x[:n_train], labels[:n_train], x[n_train:], labels[n_train:],
                      half[: n_train // 2], half[n_train // 2:], means, weights.float())


def _digits(n_heldout: int = 397) -> ToyDataset:
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 8.0 - 1.0   # pixels 0..16 -> [-1, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(derive_seed(DATA_SEED, "digits"))
    perm = torch.randperm(len(x), generator=g)
    heldout, train = perm[:n_heldout], perm[n_heldout:]
    n_train = len(train)
    half = torch.randperm(n_train, generator=g)
    return ToyDataset("digits", 64, 10, 10, x[train], y[train], x[heldout], y[heldout],
                      half[: n_train // 2], half[n_train // 2:], None, None)


@lru_cache(maxsize=None)
def load_toy(name: str) -> ToyDataset:
    """Cached for the process, so built on the CPU whatever default device the first caller set (a first call
    under `torch.device("meta")`, e.g. while building a network shell, used to cache meta tensors for everyone)."""
    with torch.device("cpu"):
        if name == "digits":
            return _digits()
        if name in ("grid25", "grid25u"):
            return _grid(name)
    raise ValueError(f"unknown toy dataset '{name}' (digits, grid25, grid25u)")


class ToyStream:
    """Real training samples by global sample index: epoch e = index // N uses permutation P_e (seeded), so the
    data position is just `samples_seen` and any number of ranks reads the same samples for the same indices."""

    def __init__(self, dataset: ToyDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "data_order"))
            self._perms = {epoch: torch.randperm(len(self.dataset.train_x), generator=g)}
        return self._perms[epoch]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, D], labels [B]) for the given global sample indices."""
        n = len(self.dataset.train_x)
        rows = torch.stack([self._perm(i // n)[i % n] for i in indices])
        return self.dataset.train_x[rows], self.dataset.train_y[rows]


def class_labels_for(indices, num_classes: int, seed: int) -> torch.Tensor:
    """Generator-side labels (the 'prompts' of the toy) for sample indices: uniform over classes, seeded."""
    if num_classes == 0:
        return torch.zeros(len(indices), dtype=torch.int64)
    return torch.tensor([derive_seed(seed, i, "prompt_class") % num_classes for i in indices], dtype=torch.int64)
