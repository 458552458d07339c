"""Worker for tests/distributed/test_memory_plan.py: the measured side of the planner check. Runs two real method
steps of freshly initialised roles under torchrun and reports rank 0's peak of live tensor bytes (torch's
MemTracker on real tensors, the same accounting the planner applies to fake ones).

Usage: memory_worker.py RECIPE OUT_JSON [key=value ...]
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
from trainer.memory_plan import _StepTracker, build_trainer  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402

recipe_path, out, *overrides = sys.argv[1:]
recipe = load_recipe(recipe_path, overrides)
info = init_distributed(need_group=True)
t = build_trainer(recipe, info, build_family(recipe, planning=True))
backend = t.backend
tracker = _StepTracker()
tracker.track_external(*t.nets.present().values(), *backend.optimizers.values(), *getattr(backend, "ema_shards", []))
with tracker:
    for step in range(2):
        t.train_step(step, defaultdict(list))
peak = tracker.get_tracker_snapshot("peak")[info.device]
if info.is_main:
    json.dump({str(getattr(k, "value", k)): v for k, v in peak.items()}, open(out, "w"))
