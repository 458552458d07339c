"""Worker for tests/distributed/test_backend_equality.py: one launch runs DMD, DMD2 and ADM on the toy and on the tiny
SDXL twin, and ADP (pretrain stage, on ODE pairs, with the pixel backbone as a sharded frozen role) on the toy, under
one backend and writes, per case, the step-0 gradients of every updated role (before clipping), the losses of steps
0-4 and this rank's parameter bytes per role.

Usage (torchrun or alone): equality_worker.py BACKEND OUT_DIR TOY_TEACHER SDXL_TEACHER_DIR REAL_LATENTS_STREAM PAIRS
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402

from parallel.distributed import init_distributed  # noqa: E402
from tests.helpers import recorded_steps  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.stages.teacher import ensure_pixel_backbone  # noqa: E402
from trainer.stages.training import build_stage_trainer  # noqa: E402

backend, out_dir, toy_teacher, sdxl_teacher, data_source, pairs, prompts = sys.argv[1:8]
info = init_distributed(need_group=backend != "data_parallel")
STEPS = 5
FAMILIES = {
    "toy": ("recipes/tiny/toy_smoke.yaml", [f"teacher.pretrained={toy_teacher}", "family.hidden=32",
                                             "distill.train.batch_size=8", "distill.train.micro_batch_size=4"]),
    "sdxl": ("recipes/tiny/sdxl_tiny.yaml", [f"teacher.pretrained={sdxl_teacher}", f"data.real_remote={data_source}",
                                              f"family.prompts={prompts}", "distill.train.batch_size=4",
                                              "distill.train.micro_batch_size=2"]),
}

CASES = [(family, method) for family in FAMILIES for method in ("dmd", "dmd2", "adm")] + [("toy", "adp")]
if os.environ.get("EQUALITY_CASES"):   # manual checks: a subset, e.g. "sdxl_adm toy_adm"
    CASES = [c for c in CASES if f"{c[0]}_{c[1]}" in os.environ["EQUALITY_CASES"].split()]
PRETRAIN = [f"data.pairs_remote={pairs}", "stages=[pretrain]", "pretrain.train.batch_size=8",
            "pretrain.train.micro_batch_size=4", f"pretrain.train.steps={STEPS}"]

for family, method in CASES:
    recipe_path, family_overrides = FAMILIES[family]
    case = f"{family}_{method}"
    stage = "pretrain" if method == "adp" else "distill"
    run_dir = os.path.join(out_dir, f"run_{case}_{backend}_{info.world_size}")
    common = [f"run.dir={run_dir}", f"parallel.backend={backend}", "parallel.zero3_persistence_threshold=0"]
    stage_overrides = PRETRAIN if stage == "pretrain" else [
        "stages=[distill]", f"distill.method.name={method}", "distill.method.ttur=1", f"distill.train.steps={STEPS}",
        f"data.real_local={run_dir}/real_cache"]
    if (family, method) == ("sdxl", "dmd"):   # DMD trains no heads: the recipe's own heads optimizer is refused
        stage_overrides.append("distill.optimizer={generator: {lr: 1.0e-5}, fake_score: {lr: 1.0e-5}}")
    recipe = load_recipe(os.path.join(ROOT, recipe_path), [*common, *family_overrides, *stage_overrides])
    if stage == "pretrain":
        ensure_pixel_backbone(recipe, run_dir, info, lambda message: None)
    t = build_stage_trainer(recipe, run_dir, info, stage)
    grads, losses = recorded_steps(t, STEPS)
    local_bytes = {role: t.backend.local_param_bytes(role) for role in t.nets.present()}
    if info.is_main:
        torch.save(grads, os.path.join(out_dir, f"{case}_{backend}_{info.world_size}_grads.pt"))
        json.dump({"losses": losses, "local_param_bytes": local_bytes},
                  open(os.path.join(out_dir, f"{case}_{backend}_{info.world_size}.json"), "w"))
