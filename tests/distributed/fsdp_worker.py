"""Worker for the FSDP2 tests, run under torchrun (or alone). Usage:
  fsdp_worker.py steps  TEACHER RUN_DIR STEP_TO OUT_JSON [method [dp_replicate]]   resume if a checkpoint exists, train to STEP_TO,
                                                                    checkpoint, write the per-step losses
  fsdp_worker.py checks TEACHER RUN_DIR OUT_JSON                    per-rank bytes, EMA: no collectives, == unsharded
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

mode, teacher, run_dir = sys.argv[1:4]
info = init_distributed(need_group=True)


def build(method="adm", steps=100, dp_replicate=1):
    extra = os.environ.get("DMDX_TEST_OVERRIDES", "").split()
    recipe = load_recipe(os.path.join(ROOT, "recipes/tiny/toy_smoke.yaml"), [
        f"run.dir={run_dir}", "family.hidden=32", f"teacher.pretrained={teacher}", "stages=[distill]",
        "parallel.backend=fsdp2", f"distill.method.name={method}", "distill.method.ttur=1",
        "distill.train.batch_size=8", f"distill.train.steps={steps}", "distill.train.ema_decay=0.9",
        f"parallel.dp_replicate={dp_replicate}", *extra])
    return build_stage_trainer(recipe, run_dir, info)


if mode == "steps":
    step_to, out = int(sys.argv[4]), sys.argv[5]
    method = sys.argv[6] if len(sys.argv) > 6 else "adm"
    t = build(method, dp_replicate=int(sys.argv[7]) if len(sys.argv) > 7 else 1)
    t.resume()
    losses = {}
    while t.step < step_to:
        sums = defaultdict(list)
        t.train_step(t.step, sums)
        losses[t.step] = {k: v for k, v in t.reduce_metrics(sums).items() if k.startswith("loss/")}
        t.step += 1
        t.samples_seen += t.loop.batch_size
    t.save()
    if info.is_main:
        json.dump(losses, open(out, "w"))
else:
    from torch.distributed.tensor.debug import CommDebugMode
    out = sys.argv[4]
    t = build("adm")
    result = {"local_param_bytes": {}, "full_param_bytes": {}}
    for role, module in t.nets.present().items():
        result["local_param_bytes"][role] = sum(p.to_local().numel() * p.element_size() for p in module.parameters())
        result["full_param_bytes"][role] = sum(p.numel() * p.element_size() for p in module.parameters())
    ema_reference = {k: v.clone() for k, v in t.backend.full_state("generator").items()}
    decay = t.backend.ema_decay
    collectives = 0
    for step in range(5):
        ctx = t.make_context(step)
        for phase in t.method.phases(step):
            t.phase_backward(phase, [ctx])
            t.backend.clip_and_step(phase.updates)
            if "generator" in phase.updates:
                with CommDebugMode() as comm:
                    t.backend.ema_update()
                collectives += comm.get_total_counts()
                current = t.backend.full_state("generator")
                ema_reference = {k: torch.lerp(v, current[k].float(), 1 - decay) for k, v in ema_reference.items()}
    ema = t.backend.full_state("ema")
    result["ema_collectives"] = collectives
    result["ema_max_abs_diff"] = max((ema[k] - ema_reference[k]).abs().max().item() for k in ema)
    result["ema_moved"] = max((ema[k] - t.backend.full_state("generator")[k]).abs().max().item() for k in ema)
    if info.is_main:
        json.dump(result, open(out, "w"))
