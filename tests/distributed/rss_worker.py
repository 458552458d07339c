"""Worker for tests/distributed/test_loading.py: build the denoiser roles (teacher, generator, fake score) of a large
toy twin from a teacher file and report this rank's peak resident-memory growth while building and loading them.

Usage (torchrun or alone): rss_worker.py BACKEND TEACHER RUN_DIR OUT_JSON
"""
import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()

from parallel.distributed import init_distributed  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from parallel.backends import build_backend  # noqa: E402
from trainer.families import build_family  # noqa: E402

backend, teacher, run_dir, out = sys.argv[1:5]
info = init_distributed(need_group=backend != "data_parallel")
recipe = load_recipe(os.path.join(ROOT, "recipes/tiny/toy_smoke.yaml"), [
    f"run.dir={run_dir}", "family.hidden=1024", "family.depth=6", f"teacher.pretrained={teacher}",
    "stages=[distill]", f"parallel.backend={backend}", "parallel.zero3_persistence_threshold=0"])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


# the backends' imports (FSDP2, DCP, DeepSpeed) are paid before the baseline in every process, reference included:
# what is measured is the memory the roles take
import parallel.fsdp  # noqa: E402,F401
import parallel.zero3  # noqa: E402

parallel.zero3.import_deepspeed()
if backend == "fsdp2":   # FSDP2's first fully_shard imports and initialises more of torch (~130 MiB, once)
    import torch
    from torch.distributed.fsdp import fully_shard
    fully_shard(torch.nn.Linear(4, 4))
before = rss_bytes()
# loading only: the roles, built and read from the teacher file as build_distill_nets does, before optimizers
# (ZeRO-3 engines allocate fp32 master and gradient partitions up front; the others allocate them at the first step)
family = build_family(recipe)
backend_impl = build_backend(recipe.parallel, info, family, 1.0, 0.9)
with family.teacher_source(teacher) as source:
    for role in ("teacher", "generator", "fake_score"):
        backend_impl.build_role(role, family.build_denoiser, source, trainable=role != "teacher")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
roles_bytes = {role: backend_impl.local_param_bytes(role) for role in ("teacher", "generator", "fake_score")}
json.dump({"peak_growth": peak - before, "local_param_bytes": roles_bytes},
          open(f"{out}.rank{info.rank}", "w"))
