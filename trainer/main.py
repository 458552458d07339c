"""`python -m trainer.main RECIPE [key=value ...] [--dry-run]`: run the recipe's stages in order; rerun resumes.

Works single-process and under torchrun. Everything the recipe, the world size and the run directory can get wrong
is checked before anything is built or written (trainer/validate.py): one line on stderr, exit 2. One trainer per
run dir (trainer/run_lock.py). Exit codes: trainer/exit_codes.py.
docs/operations.md describes a run; docs/recipes.md the recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from data.convert import ConvertError
from data.streams import StreamError
from parallel.distributed import init_distributed, rank0_value, shutdown
from parallel.runtime_env import apply_runtime_defaults
from parallel.safe_dcp import UnsafeCheckpoint
from trainer import provenance
from trainer.config import RecipeError, dump_recipe, load_recipe
from trainer.exit_codes import BAD_INPUT, ENVIRONMENT, OK, TRAINING_FAULT, EnvironmentFault, environment_cause
from trainer.guards import GuardError
from trainer.memory_plan import plan_memory
from trainer.run_lock import RunDirLock
from trainer.stages import run_stages
from trainer.stages.run_dir import prepare_run_dir
from trainer.trainer import Stopped
from trainer.validate import check_launch


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/toy/default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, print it and its memory plan (meta device, fake tensors); "
                             "no weights, no training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: plan for this many ranks (default: WORLD_SIZE, else the recipe's launch "
                             "section's nodes x gpus_per_node when it has one, else 1)")
    parser.add_argument("--no-trace", action="store_true",
                        help="--dry-run: model states only, skip tracing a step for activations")
    return parser.parse_intermixed_args(argv)   # overrides may follow the flags


def planned_world_size(args, recipe) -> tuple[int, str]:
    """The ranks a dry run plans for, and where the number came from."""
    if args.world_size:
        return args.world_size, "--world-size"
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    if "launch" in recipe.model_fields_set:   # written in the recipe (or an override), not the defaults
        return recipe.launch.nodes * recipe.launch.gpus_per_node, "launch: nodes x gpus_per_node"
    return 1, "no --world-size, WORLD_SIZE or launch section"


def dry_run_plan(args, recipe) -> int:
    world_size, source = planned_world_size(args, recipe)
    print(f"planning for {world_size} ranks ({source})")
    try:
        check_launch(recipe, world_size, "cuda" if recipe.parallel.attention == "xformers" else "cpu", args.recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    for stage in [st for st in ("pretrain", "distill") if st in recipe.stages]:
        plan = plan_memory(recipe, world_size, trace=not args.no_trace, stage=stage)
        print(plan.format())
        if plan.gpu_memory_gib is not None and plan.total > plan.gpu_memory_gib * (1 << 30):
            print(f"warning: the {stage} stage's plan needs {plan.total / (1 << 30):.2f} GiB per GPU, more than "
                  f"parallel.gpu_memory_gib = {plan.gpu_memory_gib:g}", file=sys.stderr)
    return 0


def print_summary(run_dir: str, metrics: dict | None, seconds: float, log) -> None:
    log(f"done in {seconds:.1f} s. run dir: {os.path.abspath(run_dir)}")
    log(f"  config:      {run_dir}/config.yaml")
    log(f"  tensorboard: tensorboard --logdir {run_dir}")
    if metrics is None:
        return
    log(f"  metrics:     {run_dir}/evaluate/metrics.json")
    if "student" not in metrics:   # a latent family (trainer/latent_evaluation.py)
        log(f"  samples:     {run_dir}/evaluate/samples.png")
        log("  " + ", ".join(f"{k} {metrics[k]:.4g}" for k in ("fd_dinov2", "clip_score") if k in metrics)
            + f" ({metrics['prompt_set']}; FD reference: {metrics.get('fd_reference')})")
        return
    s, t = metrics["student"], metrics["teacher"]
    log(f"  samples:     {run_dir}/evaluate/student_samples.png, {run_dir}/evaluate/teacher_samples.png")
    log(f"  student FD {s['fd']:.4g} (precision {s['precision']:.3f}, recall {s['recall']:.3f}) vs teacher "
        f"FD {t['fd']:.4g} (precision {t['precision']:.3f}, recall {t['recall']:.3f}); "
        f"ratio {metrics['fd_ratio_student_over_teacher']:.2f}")
    log("  " + json.dumps({k: v for k, v in s.items() if k not in ("fd", "precision", "recall")}))


def main(argv=None) -> int:
    apply_runtime_defaults()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return dry_run_plan(args, recipe)
    dist_info = init_distributed(timeout_seconds=recipe.parallel.collective_timeout_seconds,
                                 need_group=recipe.parallel.backend != "data_parallel")
    log = (lambda msg: print(msg, flush=True)) if dist_info.is_main else (lambda msg: None)
    error = (lambda msg: print(f"error: {msg}", file=sys.stderr, flush=True)) if dist_info.is_main else log
    try:   # every rank checks (the same answer everywhere): nothing is built or written before this
        check_launch(recipe, dist_info.world_size, dist_info.device.type, args.recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    lock, problem = None, None
    if dist_info.is_main:   # one holder per run: global rank 0 (trainer/run_lock.py)
        lock = RunDirLock(recipe.run.dir, log)
        try:
            lock.acquire()
        except EnvironmentFault as e:
            lock, problem = None, str(e)
    problem = rank0_value(problem)
    if problem:
        error(problem)
        shutdown()
        return ENVIRONMENT
    try:
        return run(args, argv, recipe, dist_info, log, error)
    finally:
        if lock is not None:
            lock.release()


def run(args, argv, recipe, dist_info, log, error) -> int:
    """The run itself, under the run-dir lock; every failure a user can act on is one line and a fixed exit code."""
    run_dir = recipe.run.dir
    record = provenance.attempt_record(dist_info.world_size, [sys.executable, "-m", "trainer.main",
                                                              *(sys.argv[1:] if argv is None else argv)])
    record["recipe"] = recipe.model_dump(mode="json")
    started = time.perf_counter()
    try:
        if dist_info.is_main:
            prepare_run_dir(recipe, args.recipe)
            provenance.append(run_dir, record)
        metrics = run_stages(recipe, run_dir, dist_info, log, record)
    except GuardError as e:
        error(str(e))
        return TRAINING_FAULT
    except Stopped as e:
        log(str(e))
        shutdown()
        return e.exit_code
    except (RecipeError, UnsafeCheckpoint, StreamError, ConvertError) as e:   # bad input found while running
        error(str(e))
        return BAD_INPUT
    except EnvironmentFault as e:
        error(str(e))
        return ENVIRONMENT
    except Exception as e:
        cause = environment_cause(e)
        if cause is None:
            raise
        error(f"{cause.filename or run_dir}: {cause.strerror} (errno {cause.errno}) (hint: free space or fix "
              f"permissions, then rerun the same command: it resumes from the last checkpoint)")
        return ENVIRONMENT
    if dist_info.is_main:
        print_summary(run_dir, metrics, time.perf_counter() - started, log)
    shutdown()
    return OK


if __name__ == "__main__":
    sys.exit(main())
