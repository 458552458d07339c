"""`python -m trainer.sample RUN_DIR --num N --out FILE.npz [--steps K] [--seed S]`

Draws N samples from a finished run's student (EMA weights) with its own K-step sampler and writes
`samples` [N, D] float32 in data space (64 for digits, 2 for the grids) and `labels` [N] int64: the requested
class for conditional toys (i mod classes, balanced), -1 for unconditional ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import trainer  # noqa: F401  (runtime env defaults)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--steps", type=int, default=None, help="student steps K (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = os.path.join(args.run_dir, "config.yaml")
    student = None
    if os.path.isfile(config):
        from trainer.config import load_recipe
        from trainer.stages import final_stage, stage_student_path
        student = stage_student_path(args.run_dir, final_stage(load_recipe(config)) or "distill")
    if student is None or not os.path.isfile(student):
        print(f"error: {args.run_dir}: no finished training stage (missing {config if student is None else student}) "
              f"(hint: run python -m trainer.main RECIPE first)", file=sys.stderr)
        return 2
    if args.num <= 0 or (args.steps is not None and args.steps <= 0):
        print("error: --num and --steps must be positive", file=sys.stderr)
        return 2
    import numpy as np
    from trainer.evaluation import eval_labels
    from trainer.stages import draw_student_samples, load_student
    recipe, family, denoiser, generator = load_student(args.run_dir)
    labels = eval_labels(args.num, family.dataset)
    samples = draw_student_samples(recipe, family, denoiser, generator, labels, args.seed, args.steps)
    out_labels = labels.numpy() if family.conditional else np.full(args.num, -1, dtype=np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, samples=samples.numpy().astype(np.float32), labels=out_labels.astype(np.int64))
    print(f"wrote {args.num} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
