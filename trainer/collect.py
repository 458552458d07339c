"""`python -m trainer.collect RECIPE [key=value ...]`: the recipe's collect stage alone: teacher ODE pairs into an MDS
stream (kind `ode_pairs`) at `collect.out` (default <run.dir>/ode_pairs). Single process or under torchrun; a rerun
writes only the missing parts. What a pair holds: trainer/stages/collect.py; docs/data.md "ODE pairs".
"""
from __future__ import annotations

import argparse
import os
import sys

from parallel.distributed import init_distributed, shutdown
from parallel.runtime_env import apply_runtime_defaults
from trainer.config import RecipeError, load_recipe
from trainer.stages.artifacts import teacher_path
from trainer.stages.collect import collect_pairs


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m trainer.collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_path = teacher_path(recipe, recipe.run.dir)
    if not os.path.exists(t_path) and recipe.teacher.pretrained is None:
        print(f"error: {args.recipe}: teacher.pretrained: no teacher at {t_path} (hint: run python -m trainer.main "
              f"{args.recipe} stages=[teacher] first, or set teacher.pretrained)", file=sys.stderr)
        return 2
    info = init_distributed()
    message = collect_pairs(recipe, info)
    if info.is_main:
        print(f"wrote {message}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
