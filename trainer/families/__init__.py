"""Model families: how to build or load each role, encode conditioning, where the taps are.

`build_family(recipe)` returns the family object for `recipe.family.name`."""
from __future__ import annotations


def build_family(recipe, planning: bool = False):
    """planning: the memory planner's use; a pretrained teacher that is not a local folder (a hub id that is not
    cached here) is described by the family's checked-in config instead of being resolved."""
    if recipe.family.name == "toy":
        from trainer.families.toy import ToyFamily
        return ToyFamily(recipe.family)
    if recipe.family.name == "sdxl":
        from trainer.families.sdxl import SDXLFamily
        import os
        pretrained = recipe.teacher.pretrained
        if planning and pretrained and not os.path.isdir(pretrained):
            pretrained = None
        return SDXLFamily(recipe.family, pretrained if pretrained and not pretrained.endswith(".safetensors")
                          else None)
    raise ValueError(f"unknown family '{recipe.family.name}'")
