"""ADP's pixel-discriminator backbone through the real transformers / diffusers classes (tiny random twins saved to
a temp dir and loaded back the way a pretrained SAM / DINOv2 / SDXL VAE is), and the SDXL tiny twin's DMDX stages
(collect -> ADP with the VAE + SAM pixel discriminator -> ADM) through the real CLI."""
import os
import subprocess
import sys

import pytest
import torch

from parallel.loading import PrefixedSource, StateSource, TensorsSource, load_full_state
from tests.helpers import ROOT, saved_vision, tiny_sdxl_pipeline
from trainer.families.pixel_backbones import (PixelBackbone, build_vision, pretrained_vision_state, vision_class,
                                     vision_config)


@pytest.mark.parametrize("kind", ["sam", "dinov2"])
def test_backbone_loads_pretrained_and_passes_gradients_to_its_input(tmp_path, kind):
    folder = saved_vision(kind, str(tmp_path / kind))
    reference = vision_class(kind).from_pretrained(folder).eval()
    backbone = PixelBackbone(kind, build_vision(kind, vision_config(kind, pretrained=folder)))
    with PrefixedSource({"vision.": (TensorsSource(pretrained_vision_state(kind, folder)), "")}) as source:
        load_full_state(backbone, source)
    backbone.requires_grad_(False).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(backbone.vision.state_dict()[name], tensor), name
    images = (torch.rand(2, 3, 48, 48) * 2 - 1).requires_grad_(True)     # resized to the backbone's 64 px
    features = backbone(images)
    assert [tuple(f.shape[1:]) for f in features] == backbone.feature_shapes()
    assert len(features) == (5 if kind == "sam" else 4)                 # 4 depth taps (+ SAM's neck)
    sum(f.square().mean() for f in features).backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_sam_checkpoint_keys_load_by_prefix(tmp_path):
    """A SAM encoder's own safetensors read slice by slice under the role's prefix (the StateSource path)."""
    folder = saved_vision("sam", str(tmp_path / "sam"))
    backbone = PixelBackbone("sam", build_vision("sam", vision_config("sam", pretrained=folder)))
    with PrefixedSource({"vision.": (StateSource(folder), "vision_encoder.")}) as source:
        load_full_state(backbone, source)
    assert torch.equal(backbone.vision.state_dict()["vision_encoder.pos_embed"],
                       vision_class("sam").from_pretrained(folder).state_dict()["vision_encoder.pos_embed"])


def test_sdxl_tiny_dmdx_stages(tmp_path):
    """collect -> ADP (velocity student of the eps teacher; latent D on the UNet's taps, pixel D = VAE decode ->
    SAM) -> ADM from ADP's generator, on the SDXL tiny twin, one process."""
    pipeline = tiny_sdxl_pipeline(str(tmp_path / "sdxl"))
    sam = saved_vision("sam", str(tmp_path / "sam"))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "trainer.main", os.path.join(ROOT, "recipes/tiny/sdxl_tiny.yaml"),
            f"run.dir={run_dir}", f"teacher.pretrained={pipeline}", f"family.pixel_backbone_pretrained={sam}",
            "stages=[collect,pretrain,distill]", "collect.num_pairs=8", "collect.micro_batch=4",
            "collect.sampler_steps=2", "pretrain.train.steps=2", "pretrain.train.batch_size=4",
            "pretrain.train.checkpoint_every=2", "pretrain.train.log_every=1", "distill.train.steps=2",
            "distill.generator.prediction=flow", "distill.generator.conditioning_timestep=null"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("ode_pairs/index.json", "pretrain/student.safetensors", "distill/student.safetensors"):
        assert (run_dir / path).is_file(), path
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "pretrain" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"metrics/generator_latent", "metrics/generator_pixel", "metrics/discriminator_pixel"} <= tags
    # ADM started from ADP's generator, not from the teacher
    from safetensors.torch import load_file
    from trainer.families.sdxl import SDXLUNet
    adp = load_file(str(run_dir / "pretrain" / "student.safetensors"))
    teacher = SDXLUNet.from_pretrained(os.path.join(pipeline, "unet")).state_dict()
    assert any(not torch.equal(adp[k], teacher[k]) for k in teacher)
