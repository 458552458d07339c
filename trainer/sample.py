"""`python -m trainer.sample RUN_DIR --num N --out FILE.npz [--steps K] [--seed S] [--prompt-ids I,J,...]`

Draws N samples from a finished run's student (EMA weights) with its own K-step sampler and writes
`samples` [N, ...] float32 and `labels` [N] int64.
- Toys: samples in data space (64 for digits, 2 for the grids); labels: the requested class for conditional toys
  (i mod classes, balanced), -1 for unconditional ones. Noise keyed by (seed, sample index).
- Latent families: scaled latents [N, *latent shape] (SDXL / SD3 [N, C, h, w], CogVideoX [N, F, C, h, w]); labels:
  the prompt ids (rows of the run's prompt table; default i mod prompts). The noise is drawn in ONE batch from
  `torch.Generator().manual_seed(seed)`, the initial latents first and then each re-noising, in the order the stock
  diffusers pipelines draw it, so the exported pipeline (trainer/export.py) called with the same generator seed and
  the same prompts' embeddings returns these latents (SD3: after `torch.manual_seed(seed)` too, since its pipeline
  re-noises from the global RNG).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from parallel.runtime_env import apply_runtime_defaults
from trainer.config import load_recipe
from trainer.evaluation import eval_labels
from trainer.sampling import student_sample
from trainer.stages.artifacts import final_stage, stage_student_path
from trainer.stages.students import draw_student_samples, load_student


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--steps", type=int, default=None, help="student steps K (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-ids", default=None, help="latent families: comma-separated prompt ids, cycled "
                        "over the N samples (default: 0, 1, ..., N-1 modulo the number of prompts)")
    args = parser.parse_args(argv)
    config = os.path.join(args.run_dir, "config.yaml")
    student = None
    if os.path.isfile(config):
        student = stage_student_path(args.run_dir, final_stage(load_recipe(config)) or "distill")
    if student is None or not os.path.isfile(student):
        print(f"error: {args.run_dir}: no finished training stage (missing {config if student is None else student}) "
              f"(hint: run python -m trainer.main RECIPE first)", file=sys.stderr)
        return 2
    if args.num <= 0 or (args.steps is not None and args.steps <= 0):
        print("error: --num and --steps must be positive", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        print(f"error: --out {args.out}: is a directory (hint: name the .npz file to write, e.g. "
              f"{os.path.join(args.out, 'samples.npz')})", file=sys.stderr)
        return 2
    recipe, family, denoiser, generator = load_student(args.run_dir)
    if recipe.family.name == "toy":
        labels = eval_labels(args.num, family.dataset)
        samples = draw_student_samples(recipe, family, denoiser, generator, labels, args.seed, args.steps)
        out_labels = labels.numpy() if family.conditional else np.full(args.num, -1, dtype=np.int64)
    else:
        try:
            ids = [int(v) for v in args.prompt_ids.split(",")] if args.prompt_ids else list(range(args.num))
        except ValueError:
            print(f"error: --prompt-ids {args.prompt_ids!r}: not comma-separated integers", file=sys.stderr)
            return 2
        if any(not 0 <= i < family.num_prompts for i in ids):
            print(f"error: --prompt-ids: ids must lie in [0, {family.num_prompts}) (the run's prompt table)",
                  file=sys.stderr)
            return 2
        labels = torch.tensor([ids[i % len(ids)] for i in range(args.num)]) % family.num_prompts
        samples = sample_latents(recipe, family, denoiser, generator, labels, args.seed, args.steps)
        out_labels = labels.numpy()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:   # a file object: numpy would append .npz to a path without it
        np.savez(f, samples=samples.numpy().astype(np.float32), labels=out_labels.astype(np.int64))
    print(f"wrote {args.num} samples to {args.out}")
    return 0


def sample_latents(recipe, family, denoiser, generator, labels, seed: int, num_steps: int | None = None):
    """[N, *data_shape] latents of the student's K-step sampler, noise drawn as the stock pipelines draw it (one
    CPU generator seeded with `seed`: the initial latents, then each step's fresh noise)."""
    g = recipe.distill.generator
    num_steps = num_steps or g.num_steps
    rng = torch.Generator().manual_seed(seed)
    # StableDiffusion3Pipeline does not pass its generator to scheduler.step, so the stochastic sampler's re-noising
    # comes from torch's global RNG: reproduced here by a second generator with the same seed (the exported
    # pipeline then matches after torch.manual_seed(seed); trainer/export.py prints this)
    step_rng = torch.Generator().manual_seed(seed) if recipe.family.name == "sd3" else rng
    shape = (len(labels), *family.data_shape)
    noise_fn = lambda i: torch.randn(shape, generator=rng if i == 0 else step_rng)  # noqa: E731  (in step order)
    return student_sample(denoiser, generator, family.condition(labels), denoiser.schedule.student_timesteps(num_steps),
                          noise_fn, g.conditioning_timestep if num_steps == 1 else None)


if __name__ == "__main__":
    sys.exit(main())
