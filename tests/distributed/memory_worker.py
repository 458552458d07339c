"""Worker for tests/distributed/test_memory_plan.py: the measured side of the planner check. Runs two real method
steps of freshly initialised roles under torchrun and reports rank 0's peak of live tensor bytes (torch's
MemTracker on real tensors, the same accounting the planner applies to fake ones); then, on freshly built roles
again (seeded: the same weights), one more step whose step-0 gradients it saves (recording them inside the tracked
steps would count their copies).

Usage: memory_worker.py RECIPE OUT_JSON GRADS_PT [key=value ...]
"""
import json
import os
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402

from parallel.distributed import init_distributed  # noqa: E402
from tests.helpers import recorded_steps  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.memory_plan import _StepTracker, build_trainer  # noqa: E402



def zero3_held_tensors(backend) -> list:
    """What ZeRO-3 holds outside the modules' and the torch optimizers' tensors, allocated before the tracked steps:
    every parameter's partition (`ds_tensor`: the modules' parameters are empty placeholders), each engine's fp32
    master partitions and its contiguous reduce bucket (allocated when its optimizer is built)."""
    held = [p.ds_tensor for module in backend.raw.values() for p in module.parameters()]
    for engine in backend.engines.values():
        optimizer = getattr(engine, "optimizer", None)
        held += list(getattr(optimizer, "fp32_partitioned_groups_flat", []))
        held += [b.buffer for b in getattr(optimizer, "ipg_buckets", {}).values() if getattr(b, "buffer", None) is not None]
    return [t for t in held if t.numel()]


recipe_path, out, grads_out, *overrides = sys.argv[1:]
recipe = load_recipe(recipe_path, overrides)
info = init_distributed(need_group=True)
t = build_trainer(recipe, info, build_family(recipe, planning=True))
backend = t.backend
tracker = _StepTracker()
tracker.track_external(*t.nets.present().values(), *backend.optimizers.values(), *getattr(backend, "ema_shards", []),
                       *(zero3_held_tensors(backend) if recipe.parallel.backend == "zero3" else []))
with tracker:
    for step in range(2):
        t.train_step(step, defaultdict(list))
peak = tracker.get_tracker_snapshot("peak")[info.device]
if info.is_main:
    json.dump({str(getattr(k, "value", k)): v for k, v in peak.items()}, open(out, "w"))
del t, backend, tracker
grads, _ = recorded_steps(build_trainer(recipe, info, build_family(recipe, planning=True)), 1)
if info.is_main:
    torch.save(grads, grads_out)
