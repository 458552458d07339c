"""`python -m data.collect RECIPE [key=value ...]`: teacher ODE pairs into an MDS stream (kind `ode_pairs`).

Pair i: noise drawn from the per-sample seed derive_seed(run.seed, 0, i, "ode_noise") (stored, with the unit-variance
noise itself), the prompt / class of sample i, and the teacher's deterministic multi-step ODE solution at the
recipe's guidance scale (`collect.sampler_steps`, `collect.guidance_scale`). Micro-batch j holds pairs
[j*micro_batch, (j+1)*micro_batch) and goes to rank j mod world_size; each is written as its own part, so the
stream is identical for any number of ranks and a rerun after a crash writes only the missing parts.
Single process or under torchrun.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import trainer  # noqa: F401  (runtime env defaults)
from trainer.config import RecipeError, load_recipe


def collect_pairs(recipe, dist_info, progress: bool = True) -> str:
    import torch
    from tqdm import tqdm

    from data.parts import PartsWriter, units_of_rank
    from data.schemas import columns
    from parallel.distributed import barrier
    from trainer.families import build_family
    from trainer.randomness import StepRandom, derive_seed
    from trainer.sampling import teacher_sample
    from trainer.stages import build_denoiser, load_teacher

    cfg = recipe.collect
    out = cfg.out or os.path.join(recipe.run.dir, "ode_pairs")
    family, denoiser = build_family(recipe), build_denoiser(recipe)
    teacher = load_teacher(recipe, recipe.run.dir, family)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else recipe.distill.method.guidance_scale
    sampler = {"name": "ode_first_order", "steps": cfg.sampler_steps, "guidance_scale": guidance,
               "prediction": recipe.schedule.prediction}
    seed = recipe.run.seed
    num_units = math.ceil(cfg.num_pairs / cfg.micro_batch)
    writer = PartsWriter(out, columns("ode_pairs"))
    mine = [u for u in units_of_rank(num_units, dist_info.rank, dist_info.world_size) if not writer.done(u)]
    already = sum(writer.done(u) for u in range(num_units))
    if already and dist_info.is_main:
        print(f"[collect] resuming: {already} of {num_units} micro-batches already written", flush=True)
    bar = tqdm(mine, desc="collect ode pairs", unit="micro-batch", disable=not (progress and dist_info.is_main),
               file=sys.stderr)
    for unit in bar:
        indices = range(unit * cfg.micro_batch, min((unit + 1) * cfg.micro_batch, cfg.num_pairs))
        labels = family.prompt_labels(indices, seed)
        noise = StepRandom(seed, 0, indices).normal("ode_noise", family.data_shape)
        with torch.no_grad():
            outputs = teacher_sample(denoiser, teacher, noise, family.condition(labels),
                                     family.null_condition(len(indices), "cpu"), guidance, cfg.sampler_steps)
        writer.write(unit, ({"id": i, "noise": noise[k].numpy(), "noise_seed": derive_seed(seed, 0, i, "ode_noise"),
                             "output": outputs[k].numpy(), "text": f"class {int(labels[k])}" if family.conditional
                             else "", "label": int(labels[k]) if family.conditional else -1, "sampler": sampler}
                            for k, i in enumerate(indices)))
    barrier()
    message = writer.merge(num_units) if dist_info.is_main else ""
    barrier()
    return message


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainer.stages import teacher_path
    t_path = teacher_path(recipe, recipe.run.dir)
    if not os.path.exists(t_path) and recipe.teacher.pretrained is None:
        print(f"error: {args.recipe}: teacher.pretrained: no teacher at {t_path} (hint: run python -m trainer.main "
              f"{args.recipe} stages=[teacher] first, or set teacher.pretrained)", file=sys.stderr)
        return 2
    from parallel.distributed import init_distributed, shutdown
    info = init_distributed()
    message = collect_pairs(recipe, info)
    if info.is_main:
        print(f"wrote {message}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
