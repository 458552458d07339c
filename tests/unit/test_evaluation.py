"""Evaluation pieces: metrics on real data are sane, and both PNG renderings draw what they are given."""
import numpy as np

from data.toy import load_toy
from trainer.evaluation import frechet_distance, grid_modes, precision_recall, sample_grid_png


def test_grid_png_draws_points_and_mode_rings(tmp_path):
    dataset = load_toy("grid25u")
    img = sample_grid_png(dataset.heldout_x[:500], dataset, str(tmp_path / "g.png"))
    assert img.shape == (512, 512, 3) and (tmp_path / "g.png").is_file()
    assert ((img == (30, 60, 200)).all(-1)).sum() > 100          # sample points
    assert ((img == (200, 200, 200)).all(-1)).sum() > 25 * 10    # a ring per mode


def test_digits_png_grid(tmp_path):
    dataset = load_toy("digits")
    img = sample_grid_png(dataset.heldout_x[:64], dataset, str(tmp_path / "d.png"))
    assert img.shape == (8 * 9 * 4 + 4, 8 * 9 * 4 + 4, 3)


def test_metrics_on_real_data():
    dataset = load_toy("grid25u")
    modes = grid_modes(dataset.heldout_x, dataset)
    # within 3 std of the mode in 2-D: P(r <= 3 sigma) = 1 - exp(-4.5) = 0.989
    assert modes["modes_covered"] == 25 and abs(modes["high_quality_fraction"] - 0.989) < 0.005
    collapsed = grid_modes(dataset.heldout_x[dataset.heldout_y == 0], dataset)
    assert collapsed["modes_covered"] == 1
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((800, 4)), rng.standard_normal((800, 4))
    assert frechet_distance(a, b) < 0.1 and frechet_distance(a, b + 3) > 30
    precision, recall = precision_recall(a, b)
    assert precision > 0.8 and recall > 0.8
    precision, recall = precision_recall(a, a[:, :] * 0.05)     # a collapsed set: precise, no recall
    assert precision > 0.9 and recall < 0.2
