"""FD-DINOv2 and CLIP score (trainer/image_metrics.py) with tiny random DINOv2 / CLIP models saved to temp folders,
and the reference-statistics command (trainer/reference_stats.py)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers import ROOT, saved_clip, saved_vision
from trainer.families.pixel_backbones import build_vision, vision_config
from trainer.image_metrics import ClipScore, FrechetDINOv2, ReferenceError
from trainer.reference_stats import main as reference_main

RECIPE = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return saved_vision("dinov2", str(root / "dino")), saved_clip(str(root / "clip"))


def gaussian_states(mean: torch.Tensor, variance: torch.Tensor, n: int) -> tuple:
    """(sum, sum of outer products, count) of n samples whose sample mean is `mean` and whose sample covariance
    (n - 1 denominator) is diag(variance): the sufficient statistics the metric accumulates."""
    cov = torch.diag(variance)
    return n * mean, (n - 1) * cov + n * torch.outer(mean, mean), torch.tensor(n)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form(models, tmp_path):
    dino, _ = models
    fd = FrechetDINOv2(dino, 56, "cpu")
    dim = fd.features.num_features
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    var1 = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    var2 = torch.rand(dim, generator=g, dtype=torch.float64) * 3 + 0.1
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(var1) - sqrt(var2))^2
    closed_form = float(((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())
    for name, value in zip(("real_features_sum", "real_features_cov_sum", "real_features_num_samples"),
                           gaussian_states(mu1, var1, 1000)):
        setattr(fd.metric, name, value)
    fd.reduce_reference()
    path = str(tmp_path / "ref.safetensors")
    fd.save_reference(path, "two Gaussians")
    fresh = FrechetDINOv2(dino, 56, "cpu")     # the reference read back from its file
    fresh.load_reference(path, 1000, "hint")
    for name, value in zip(("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples"),
                           gaussian_states(mu2, var2, 500)):
        setattr(fresh.metric, name, value)
    got = fresh.compute()
    print(f"FD {got:.6f}, closed form {closed_form:.6f}")
    assert abs(got - closed_form) <= 1e-4 * max(1.0, closed_form)


def test_permuting_the_captions_changes_the_clip_score(models):
    _, clip = models
    scorer = ClipScore(clip, "cpu")
    images = torch.rand(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    captions = ["a red fox in the snow", "a bowl of ramen", "a lighthouse at dusk", "two cats on a sofa",
                "a city skyline", "a field of sunflowers", "an old steam train", "a sailboat on a lake"]
    scores = scorer.scores(images, captions)
    assert (scores > 1).sum() >= 6, scores   # most above the clamp at 0: the comparison below means something
    order = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    # each pair keeps its score when the batch is reordered together ...
    assert torch.allclose(scorer.scores(images[order], [captions[i] for i in order]), scores[order], atol=1e-4)
    # ... and the mean changes when only the captions move
    scorer.update(images, captions)
    paired = scorer.compute()
    scorer.update(images, [captions[i] for i in order])
    shuffled = scorer.compute()
    print(f"CLIP score paired {paired:.4f}, captions permuted {shuffled:.4f}")
    assert abs(paired - float(scores.mean())) < 1e-4
    assert abs(paired - shuffled) > 1e-3


def test_reference_statistics_record_the_model_resolution_and_count_and_a_mismatch_is_refused(models, tmp_path,
                                                                                               capsys):
    dino, _ = models
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):   # sizes differ: each image is resized and centre-cropped on its own
        Image.fromarray((rng.random((40 + 4 * i, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = str(tmp_path / "ref.safetensors")
    args = [str(folder), "--recipe", RECIPE, "--out", out, "teacher.pretrained=org/model", f"eval.dinov2={dino}",
            "eval.resolution=56", "--batch", "5"]
    assert reference_main(args) == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        count = int(f.get_tensor("real_features_num_samples"))
    fd = FrechetDINOv2(dino, 56, "cpu")
    assert meta["num_samples"] == "12" and count == 12 and meta["resolution"] == "56"
    assert meta["feature_model_sha256"] == fd.identity()["feature_model_sha256"]
    assert reference_main(args) == 2                                   # never overwritten
    assert "exists" in capsys.readouterr().err
    fd.load_reference(out, 12, "hint")                                  # the same model, resolution and count: read
    torch.manual_seed(1)   # other weights: the same tiny architecture from another seed
    other = str(tmp_path / "other_dino")
    build_vision("dinov2", vision_config("dinov2", "dinov2_tiny")).save_pretrained(other)
    for model, resolution, samples, problem in ((dino, 64, 12, "resolution"), (dino, 56, 13, "fewer than"),
                                                (other, 56, 12, "feature_model_sha256")):
        with pytest.raises(ReferenceError) as refused:
            FrechetDINOv2(model, resolution, "cpu").load_reference(out, samples, "recompute it")
        message = str(refused.value)
        assert problem in message and out in message and "\n" not in message, message
