"""`python -m trainer.main RECIPE [key=value ...] [--dry-run]`: run the recipe's stages in order; rerun resumes.

Works single-process and under torchrun (plain data parallel). Recipe problems print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import trainer  # noqa: F401  (runtime env defaults before torch is imported)
from trainer.config import RecipeError, dump_recipe, load_recipe

USAGE_EXIT = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.main", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/toy/default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, print it and its memory plan (meta device, fake tensors); "
                             "no weights, no training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: plan for this many ranks (default: the launch's, else 1)")
    parser.add_argument("--no-trace", action="store_true",
                        help="--dry-run: model states only, skip tracing a step for activations")
    return parser.parse_intermixed_args(argv)   # overrides may follow the flags


def same_run(written: str, text: str) -> bool:
    """Two resolved recipes describe the same run when they agree on everything but `launch` (nodes, time limit,
    partition: resuming on another allocation is the point)."""
    import yaml
    a, b = yaml.safe_load(written), yaml.safe_load(text)
    a.pop("launch", None)
    b.pop("launch", None)
    return a == b


def prepare_run_dir(recipe, log) -> str:
    """Write the resolved recipe into the run dir; a run dir holding a DIFFERENT recipe is refused (resuming it
    with other settings would silently mix two runs)."""
    run_dir = recipe.run.dir
    text = dump_recipe(recipe)
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        if not same_run(open(path).read(), text):
            raise RecipeError(path, "run.dir", "this run directory holds a different recipe",
                              "pick a new run.dir, or rerun with the exact same recipe and overrides to resume")
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return run_dir


def batch_problem(recipe, world_size: int) -> str | None:
    """One line naming the first batch setting that does not split over the data-parallel ranks (`world_size` / sp:
    the ranks of a sequence-parallel group share their samples), or None."""
    data_ranks = world_size // recipe.parallel.sp
    for section in ("teacher", "pretrain", "distill"):
        train = getattr(recipe, section).train
        if train.batch_size % data_ranks:
            return (f"{section}.train.batch_size: {train.batch_size} is not divisible by the {data_ranks} "
                    f"data-parallel ranks (world size {world_size} / parallel.sp {recipe.parallel.sp}) "
                    f"(hint: change the batch size or the process count)")
        local = train.batch_size // data_ranks
        if train.micro_batch_size and local % train.micro_batch_size:
            return (f"{section}.train.micro_batch_size: {train.micro_batch_size} does not divide the local batch "
                    f"{local} (batch_size {train.batch_size} / {data_ranks} data-parallel ranks)")
    return None


def dry_run_plan(args, recipe) -> int:
    from parallel.dims import ParallelDims, ParallelDimsError
    from parallel.plan import plan_memory
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    p = recipe.parallel
    try:
        ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.sp)
    except ParallelDimsError as e:
        print(f"error: {args.recipe}: {e} (hint: pass --world-size to match the parallel section)", file=sys.stderr)
        return USAGE_EXIT
    problem = batch_problem(recipe, world_size)
    if problem:
        print(f"error: {args.recipe}: {problem}", file=sys.stderr)
        return USAGE_EXIT
    plan = plan_memory(recipe, world_size, trace=not args.no_trace)
    print(plan.format())
    if plan.gpu_memory_gib is not None and plan.total > plan.gpu_memory_gib * (1 << 30):
        print(f"warning: the plan needs {plan.total / (1 << 30):.2f} GiB per GPU, more than "
              f"parallel.gpu_memory_gib = {plan.gpu_memory_gib:g}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return dry_run_plan(args, recipe)
    from parallel.distributed import init_distributed, shutdown
    from trainer.stages import (prepare_prompts, run_collect_stage, run_distill_stage, run_evaluate_stage,
                                run_teacher_stage)

    dist_info = init_distributed(timeout_seconds=recipe.parallel.collective_timeout_seconds,
                                 need_group=recipe.parallel.backend != "data_parallel")
    log = (lambda msg: print(msg, flush=True)) if dist_info.is_main else (lambda msg: None)
    from parallel.dims import ParallelDims, ParallelDimsError
    try:
        p = recipe.parallel
        ParallelDims.resolve(dist_info.world_size, p.dp_replicate, p.dp_shard, p.sp)
    except ParallelDimsError as e:
        print(f"error: {args.recipe}: {e} (hint: match the parallel section to the process count)", file=sys.stderr)
        return USAGE_EXIT
    from trainer.attention import attention_problem
    problem = batch_problem(recipe, dist_info.world_size) or attention_problem(
        recipe.parallel.attention, dist_info.device.type, recipe.family.name)
    if problem:
        print(f"error: {args.recipe}: {problem}", file=sys.stderr)
        return USAGE_EXIT
    try:
        if dist_info.is_main:
            run_dir = prepare_run_dir(recipe, log)
        else:
            run_dir = recipe.run.dir
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    from trainer.guards import GuardError
    from trainer.trainer import Preempted
    started = time.perf_counter()
    metrics = None
    try:
        prepare_prompts(recipe, run_dir, dist_info, log)
        for stage in recipe.stages:
            if stage == "teacher":
                run_teacher_stage(recipe, run_dir, dist_info, log)
            elif stage == "collect":
                run_collect_stage(recipe, run_dir, dist_info, log)
            elif stage in ("pretrain", "distill"):
                run_distill_stage(recipe, run_dir, dist_info, log, stage)
            elif stage == "evaluate":
                metrics = run_evaluate_stage(recipe, run_dir, dist_info, log)
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        log(str(e))
        shutdown()
        return 0
    if dist_info.is_main:
        log(f"done in {time.perf_counter() - started:.1f} s. run dir: {os.path.abspath(run_dir)}")
        log(f"  config:      {run_dir}/config.yaml")
        log(f"  tensorboard: tensorboard --logdir {run_dir}")
        if metrics is not None:
            s, t = metrics["student"], metrics["teacher"]
            log(f"  metrics:     {run_dir}/evaluate/metrics.json")
            log(f"  samples:     {run_dir}/evaluate/student_samples.png, {run_dir}/evaluate/teacher_samples.png")
            log(f"  student FD {s['fd']:.4g} (precision {s['precision']:.3f}, recall {s['recall']:.3f}) vs teacher "
                f"FD {t['fd']:.4g} (precision {t['precision']:.3f}, recall {t['recall']:.3f}); "
                f"ratio {metrics['fd_ratio_student_over_teacher']:.2f}")
            log("  " + json.dumps({k: v for k, v in s.items() if k not in ("fd", "precision", "recall")}))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
