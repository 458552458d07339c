"""GPU check of the memory planner (issue #3): a tiny-twin ADM step under FSDP2 with bf16 mixed precision on one GPU,
its measured peak (torch.cuda.max_memory_allocated) beside the planner's prediction for the same recipe.

    python benchmarks/gpu_memory_check.py [--batch 8] [--resolution 256] [key=value ...]

On a machine without CUDA it runs the same on the CPU and measures with torch's MemTracker (the dry run before
spending device time). Prints one table; takes well under a minute on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
PLAN = """
import json, sys
from parallel.runtime_env import apply_runtime_defaults
apply_runtime_defaults()
from trainer.memory_plan import plan_memory
from trainer.config import load_recipe
plan = plan_memory(load_recipe(sys.argv[1], sys.argv[3:]), 1)
print(plan.format())
json.dump({"total": plan.total, "model_states": plan.model_states}, open(sys.argv[2], "w"))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.resolution = 2, 64
    overrides = ["teacher.pretrained=stabilityai/sdxl-planning-only", "parallel.backend=fsdp2",
                 "parallel.mixed_precision=bf16", f"distill.train.batch_size={args.batch}",
                 f"family.resolution={args.resolution}", *args.overrides]

    t0 = time.perf_counter()
    plan_out = "/tmp/dmdx_gpu_plan.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # the planner traces on the CPU (fake tensors)
    result = subprocess.run([sys.executable, "-c", PLAN, RECIPE, plan_out, *overrides], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        print(result.stderr[-3000:])
        return 1
    print(result.stdout)
    plan = json.load(open(plan_out))
    plan_seconds = time.perf_counter() - t0

    from parallel.distributed import init_distributed
    from trainer.memory_plan import _StepTracker, build_trainer
    from trainer.config import load_recipe
    from trainer.families import build_family
    recipe = load_recipe(RECIPE, overrides)
    info = init_distributed(need_group=True)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = build_trainer(recipe, info, build_family(recipe, planning=True))
    tracker = None
    if not cuda:
        tracker = _StepTracker()
        tracker.track_external(*t.nets.present().values(), *t.backend.optimizers.values(), *t.backend.ema_shards)
        tracker.__enter__()
    t1 = time.perf_counter()
    for step in range(2):
        t.train_step(step, defaultdict(list))
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        device = torch.cuda.get_device_name()
    else:
        tracker.__exit__(None, None, None)
        measured = tracker.get_tracker_snapshot("peak")[info.device]["Total"]
        device = "cpu (MemTracker)"
    step_seconds = (time.perf_counter() - t1) / 2
    print(f"device: {device}; tiny SDXL twin, ADM, FSDP2 bf16, 1 rank, batch {args.batch}, {args.resolution} px")
    print(f"{'':<28}{'MiB':>10}")
    print(f"{'planner prediction':<28}{plan['total'] / 2**20:>10.1f}   (model states {plan['model_states'] / 2**20:.1f})")
    print(f"{'measured peak':<28}{measured / 2**20:>10.1f}   ({measured / plan['total'] - 1:+.1%} vs plan)")
    print(f"step {step_seconds:.3f} s (2 steps incl. first-call warm-up); planner {plan_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
