"""Worker for tests/distributed/test_nan_skip.py: under FSDP2 and ZeRO-3 on 2 ranks, a NaN loss at step 1 (injected
on every rank) leaves every trainable role's full weights exactly as step 0 left them; step 2 moves them again.

Usage (torchrun): nan_skip_worker.py TOY_TEACHER OUT_JSON
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
from trainer.config import load_recipe  # noqa: E402
from trainer.stages.training import build_stage_trainer  # noqa: E402

teacher, out = sys.argv[1:3]
info = init_distributed(need_group=True)
result = {}
for backend in ("fsdp2", "zero3"):
    run_dir = os.path.join(os.path.dirname(out), f"run_{backend}")
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "toy_smoke.yaml"), [
        f"run.dir={run_dir}", "stages=[distill]", f"teacher.pretrained={teacher}", "family.hidden=32",
        "distill.train.batch_size=8", f"parallel.backend={backend}", "parallel.zero3_persistence_threshold=0",
        "guards.inject_nan_at_steps=[1]"])
    t = build_stage_trainer(recipe, run_dir, info)
    roles = list(t.backend.optimizers)

    def weights():
        return {r: t.backend.full_state(r) for r in roles}   # collective

    t.train_step(0, defaultdict(list))
    before = weights()
    t.train_step(1, defaultdict(list))
    skipped = weights()
    t.train_step(2, defaultdict(list))
    after = weights()
    result[backend] = {
        "skipped_moved": {r: max((skipped[r][k] - v).abs().max().item() for k, v in before[r].items()) for r in roles},
        "next_moved": {r: max((after[r][k] - v).abs().max().item() for k, v in skipped[r].items()) for r in roles},
        "finite": all(torch.isfinite(v).all().item() for r in roles for v in after[r].values()),
        "flags": torch.stack(t.guards.window_flags).tolist()}
if info.is_main:
    json.dump(result, open(out, "w"))
