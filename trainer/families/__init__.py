"""Model families: how to build or load each role, encode conditioning, where the taps are.

`build_family(recipe)` returns the family object for `recipe.family.name`."""
from __future__ import annotations


def build_family(recipe):
    if recipe.family.name == "toy":
        from trainer.families.toy import ToyFamily
        return ToyFamily(recipe.family)
    if recipe.family.name == "sdxl":
        from trainer.families.sdxl import SDXLFamily
        pretrained = recipe.teacher.pretrained
        return SDXLFamily(recipe.family, pretrained if pretrained and not pretrained.endswith(".safetensors")
                          else None)
    raise ValueError(f"unknown family '{recipe.family.name}'")
