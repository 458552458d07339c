"""Model families: how to build or load each role, encode conditioning, where the taps are.

`build_family(recipe)` returns the family object for `recipe.family.name`."""
from __future__ import annotations

import os

from data.convert import is_prompt_file
from trainer.families.cogvideox import CogVideoXFamily
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


def prompt_stream_path(recipe, run_dir: str | None = None) -> str | None:
    """The `prompts` stream of the recipe: family.prompts when it names a stream folder, <run.dir>/prompts when it
    names a prompt file (encoded there by the stages, trainer/stages/__init__.py), None without prompts."""
    prompts = getattr(recipe.family, "prompts", None)
    if prompts is None:
        return None
    if is_prompt_file(prompts):
        return os.path.join(run_dir or recipe.run.dir, "prompts")
    return prompts


def build_family(recipe, planning: bool = False, run_dir: str | None = None, read_prompts: bool = True):
    """planning: the memory planner's use; a pretrained teacher that is not a local folder (a hub id that is not
    cached here) is described by the family's checked-in config instead of being resolved, and the prompts are not
    read. run_dir: where a prompt file's stream was encoded (default: run.dir). read_prompts=False: the random table
    stands in for the prompts (the encoding itself needs only the family's embedding shapes)."""
    if recipe.family.name == "toy":
        return ToyFamily(recipe.family)
    pretrained = recipe.teacher.pretrained
    if planning and pretrained and not os.path.isdir(pretrained):
        pretrained = None
    if pretrained and pretrained.endswith(".safetensors"):
        pretrained = None
    stream = None if planning or not read_prompts else prompt_stream_path(recipe, run_dir)
    if stream is not None and not os.path.isfile(os.path.join(stream, "index.json")):
        raise FileNotFoundError(f"{stream}: no encoded prompts (hint: run python -m trainer.main on the recipe, whose "
                                f"first step encodes family.prompts, or python -m trainer.prepare prompts)")
    return family_class(recipe.family.name)(recipe.family, pretrained, stream)
