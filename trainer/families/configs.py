"""Checked-in full-size architecture configs (trainer/families/configs/*.json) and building them on the meta device
(no weights, no download): what the memory planner and the parameter-count test use."""
from __future__ import annotations

import json
import os

import diffusers
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MODELS = ("sdxl", "sd3_medium", "sd35_large", "cogvideox_2b", "cogvideox_5b")


def load_config(name: str) -> dict:
    with open(os.path.join(HERE, f"{name}.json")) as f:
        return json.load(f)


def build_on_meta(name: str):
    """The diffusers denoiser of `name` with meta tensors: shapes only, no memory."""
    config = load_config(name)
    cls = getattr(diffusers, config.pop("_class_name"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls(**kwargs)


def model_config(name: str, pretrained: str | None = None, subfolder: str | None = None) -> dict:
    """The denoiser's config: a local pretrained folder's own (`subfolder`/config.json when present), else the
    checked-in `name` (for hub ids too: checks must not download, and the checked-in configs mirror them)."""
    if pretrained and os.path.isdir(pretrained):
        folder = os.path.join(pretrained, subfolder) if subfolder and os.path.isdir(
            os.path.join(pretrained, subfolder)) else pretrained
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    return load_config(name)
