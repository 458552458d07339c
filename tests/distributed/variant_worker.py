"""Worker for tests/distributed/test_compile.py: one tiny twin trained 3 ADM steps under FSDP2 as the recipe
says, then again under each named variant (more overrides: `parallel.compile`, gather policies), same seed and
weights; writes per variant the largest relative difference of the losses (3 steps), the relative difference of
the step-0 gradients (per updated role and phase, as one vector, before clipping), dynamo's graph-break count and
the roles still gathered after the last step (every parameter whole: none a DTensor shard under FSDP2,
none released to its partition under ZeRO-3).

Usage (python or torchrun): variant_worker.py OUT_JSON RECIPE VARIANTS_JSON [override ...]
    VARIANTS_JSON: {"name": ["override", ...], ...}
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from parallel.distributed import init_distributed  # noqa: E402
from tests.helpers import recorded_steps  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.memory_plan import build_trainer  # noqa: E402

out, recipe_name, variants, *overrides = sys.argv[1:]
info = init_distributed(need_group=True)


def partitioned(param) -> bool:
    """FSDP2: registered as a DTensor shard; ZeRO-3: its data released to the partition (ds_status NOT_AVAILABLE)."""
    return isinstance(param, DTensor) or getattr(getattr(param, "ds_status", None), "name", "") == "NOT_AVAILABLE"


def run(variant: list[str]) -> tuple[dict, dict, list[str]]:
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", f"{recipe_name}.yaml"), [
        "teacher.pretrained=org/variant-check", "parallel.backend=fsdp2", "parallel.compile=false", *overrides,
        *variant])
    torch.manual_seed(0)   # the same random weights on every rank and in both runs
    trainer = build_trainer(recipe, info, build_family(recipe, planning=True))
    grads, losses = recorded_steps(trainer, 3)
    gathered = sorted(role for role, module in trainer.nets.present().items()
                      if not any(partitioned(p) for p in module.parameters()))
    return grads, losses, gathered


def relative(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all of a role's gradient tensors (one vector): a tensor whose gradient is ~0 (a bias
    under a normalisation: 3e-8) has no meaningful relative error of its own."""
    diff = torch.cat([(a[n] - b[n]).flatten().double() for n in a])
    return (diff.norm() / torch.cat([a[n].flatten().double() for n in a]).norm().clamp_min(1e-30)).item()


eager_grads, eager_losses, eager_gathered = run([])
result = {}
for name, variant in json.loads(variants).items():
    counters.clear()
    compiled_grads, compiled_losses, gathered = run(variant)
    result[name] = {
        "losses": max(abs(compiled_losses[s][k] - v) / max(abs(v), 1e-12)
                      for s, step in eager_losses.items() for k, v in step.items()),
        "loss_count": sum(len(step) for step in eager_losses.values()),
        "grads": {key: relative(eager_grads[key], compiled_grads[key]) for key in eager_grads},
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "gathered_after": gathered,
        "gathered_after_default": eager_gathered,
    }
if info.is_main:
    json.dump(result, open(out, "w"))
