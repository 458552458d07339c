"""`python -m trainer.evaluate RUN_DIR [--checkpoint latest|step_N] [eval.key=value ...]`

Evaluates a run's student with the recipe's `eval:` section (docs/evaluation.md): the finished student (EMA) by
default, or the EMA weights of a checkpoint of the last training stage, written by any backend (data_parallel,
FSDP2, ZeRO-3) on any number of ranks, read offline (parallel/offline.py). Works single-process and under torchrun:
latent families sample and score on every rank; toys evaluate on rank 0.

Writes <RUN_DIR>/evaluate/<student|step_N>/metrics.json and samples.png, and tensorboard events (at the checkpoint's
step) into <RUN_DIR>/evaluate/tb. `eval.*` overrides change what is measured, e.g. eval.num_samples=10000
eval.reference=ref.safetensors; nothing else of the recipe may change. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from parallel.distributed import init_distributed, shutdown
from parallel.offline import checkpoint_weights
from parallel.runtime_env import apply_runtime_defaults
from trainer.checkpoint import Checkpointer, checkpoint_folder
from trainer.config import RecipeError, load_recipe
from trainer.exit_codes import BAD_INPUT, OK
from trainer.families import build_family
from trainer.image_metrics import ReferenceError
from trainer.stages.artifacts import final_stage, stage_student_path
from trainer.stages import prepare_prompts
from trainer.stages.evaluate import EVALUATE_DIR, evaluate_latent, evaluate_toy
from trainer.stages.roles import build_generator_denoiser, build_generator_module, load_student_weights
from trainer.validate import check_latent_eval


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="eval.key=value overrides")
    parser.add_argument("--checkpoint", default=None, help="'latest' (the newest checkpoint that verifies) or a "
                        "step folder (step_0000120) of the last training stage; default: the finished student")
    return parser.parse_intermixed_args(argv)


def load_weights(recipe, run_dir: str, checkpoint: str | None):
    """(family, generator module with the EMA weights, the training step, the weights' label)."""
    stage = final_stage(recipe) or "distill"
    family = build_family(recipe, run_dir=run_dir)
    generator = build_generator_module(recipe, family)
    if checkpoint is None:
        path = stage_student_path(run_dir, stage)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the {stage} stage has not finished (hint: --checkpoint latest "
                                    f"evaluates its newest checkpoint)")
        load_student_weights(generator, path)
        return family, generator, getattr(recipe, stage).train.steps, "student"
    folder = checkpoint_folder(run_dir, stage, checkpoint)
    load_student_weights(generator, checkpoint_weights(folder, generator, "generator", "ema"))
    step = Checkpointer.load_extra(folder)["step"]
    return family, generator, step, os.path.basename(folder)


def main(argv=None) -> int:
    apply_runtime_defaults()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config):
        print(f"error: {args.run_dir}: not a run directory (missing {config}) (hint: the run.dir of a trained recipe)",
              file=sys.stderr)
        return BAD_INPUT
    wrong = [o for o in args.overrides if not o.startswith("eval.")]
    if wrong:
        print(f"error: {wrong[0]}: only eval.* settings may change here (hint: the rest is the run's recipe)",
              file=sys.stderr)
        return BAD_INPUT
    try:
        recipe = load_recipe(config, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    if recipe.family.name != "toy":
        def fail(key, problem, hint):
            raise RecipeError(config, key, problem, hint)
        try:
            check_latent_eval(recipe, fail, always=True)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return BAD_INPUT
    dist_info = init_distributed(timeout_seconds=recipe.parallel.collective_timeout_seconds)
    log = (lambda msg: print(msg, flush=True)) if dist_info.is_main else (lambda msg: None)
    try:
        prepare_prompts(recipe, args.run_dir, dist_info, log)   # eval.prompts, when a file not yet encoded
        family, generator, step, label = load_weights(recipe, args.run_dir, args.checkpoint)
        out_dir = os.path.join(args.run_dir, EVALUATE_DIR, label)
        denoiser = build_generator_denoiser(recipe)
        generator = generator.eval().requires_grad_(False)
        if recipe.family.name != "toy":
            evaluate_latent(recipe, args.run_dir, dist_info, log, family, denoiser, generator, out_dir, step,
                            f"{label} (EMA)")
        elif dist_info.is_main:
            metrics, _ = evaluate_toy(recipe, args.run_dir, family, denoiser, generator, out_dir, step)
            s = metrics["student"]
            log(f"[evaluate] {label}: FD {s['fd']:.4g}, precision {s['precision']:.3f}, recall {s['recall']:.3f} "
                f"(teacher FD {metrics['teacher']['fd']:.4g}) -> {os.path.join(out_dir, 'metrics.json')}")
    except (FileNotFoundError, ReferenceError, ValueError) as e:
        if dist_info.is_main:
            print(f"error: {e}", file=sys.stderr)
        shutdown()
        return BAD_INPUT
    shutdown()
    return OK


if __name__ == "__main__":
    sys.exit(main())
