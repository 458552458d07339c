"""Model families: how to build or load each role, encode conditioning, where the taps are.

`build_family(recipe)` returns the family object for `recipe.family.name`."""
from __future__ import annotations

import os

from trainer.families.cogvideox import CogVideoXFamily
from trainer.families.prompts import load_prompt_table
from trainer.families.sd3 import SD3Family
from trainer.families.sdxl import SDXLFamily
from trainer.families.toy import ToyFamily

# the teacher's native parameterisation per family (docs/algorithms.md "One denoiser"): a recipe whose schedule says
# otherwise is a configuration error
TEACHER_PREDICTION = {"sdxl": "eps", "sd3": "flow", "cogvideox": "v"}


def family_class(name: str):
    if name == "sdxl":
        return SDXLFamily
    if name == "sd3":
        return SD3Family
    if name == "cogvideox":
        return CogVideoXFamily
    raise ValueError(f"unknown family '{name}'")


def build_family(recipe, planning: bool = False):
    """planning: the memory planner's use; a pretrained teacher that is not a local folder (a hub id that is not
    cached here) is described by the family's checked-in config instead of being resolved."""
    if recipe.family.name == "toy":
        return ToyFamily(recipe.family)
    pretrained = recipe.teacher.pretrained
    if planning and pretrained and not os.path.isdir(pretrained):
        pretrained = None
    if pretrained and pretrained.endswith(".safetensors"):
        pretrained = None
    prompt_table = None
    if recipe.family.prompts is not None and not planning:
        prompt_table = load_prompt_table(recipe)
    return family_class(recipe.family.name)(recipe.family, pretrained, prompt_table)
