"""Framework overhead and per-rank bytes of the trainer on a tiny twin (CPU).

    python benchmarks/step_overhead.py [--recipe recipes/tiny/sdxl_tiny.yaml] [--steps 6] [--ranks 1 2 4]

1. Overhead (one process, plain data parallel): the trainer's ADM step time beside the time spent inside the
   networks' forward passes (timed by forward hooks on each role) and inside backward (`backend.backward`); the
   rest is the framework: randomness, denoiser views, losses, freezing, clipping, optimizer steps, EMA. On a CPU
   every op is synchronous, so wall time attributes exactly.
2. Per-rank bytes (FSDP2 and ZeRO-3 at each rank count, real processes under torchrun): parameter bytes per role
   held by rank 0, its peak of live tensor bytes over the measured steps (torch's MemTracker), and the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()

OVERRIDES = ["teacher.pretrained=stabilityai/sdxl-benchmark-only", "parallel.zero3_persistence_threshold=0"]


def worker(recipe_path: str, out: str, steps: int, overrides: list[str]) -> None:
    from parallel.distributed import init_distributed
    from trainer.memory_plan import _StepTracker, build_trainer
    from trainer.config import load_recipe
    from trainer.families import build_family
    recipe = load_recipe(recipe_path, overrides)
    info = init_distributed(need_group=recipe.parallel.backend != "data_parallel")
    t = build_trainer(recipe, info, build_family(recipe, planning=True))
    forward_seconds = [0.0]
    starts = {}

    def pre(module, args, kwargs=None):
        starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        forward_seconds[0] += time.perf_counter() - starts.pop(id(module))

    for module in t.nets.present().values():
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    backward_seconds, step_seconds = [0.0], [0.0]
    inner_backward, inner_step = t.backend.backward, t.backend.clip_and_step

    def timed_backward(loss, roles):
        t0 = time.perf_counter()
        inner_backward(loss, roles)
        backward_seconds[0] += time.perf_counter() - t0

    def timed_step(roles, skip=None):
        t0 = time.perf_counter()
        out = inner_step(roles, skip)
        step_seconds[0] += time.perf_counter() - t0
        return out

    t.backend.backward, t.backend.clip_and_step = timed_backward, timed_step
    t.train_step(0, defaultdict(list))        # first call: lazy initialisation, allocator warm-up
    forward_seconds[0] = backward_seconds[0] = step_seconds[0] = 0.0
    tracker = _StepTracker()
    tracker.track_external(*t.nets.present().values(), *t.backend.optimizers.values(),
                           *getattr(t.backend, "ema_shards", []))
    t0 = time.perf_counter()
    with tracker:
        for step in range(1, steps + 1):
            t.train_step(step, defaultdict(list))
    total = time.perf_counter() - t0
    if info.is_main:
        json.dump({"step": total / steps, "forward": forward_seconds[0] / steps,
                   "backward": backward_seconds[0] / steps, "optimizer": step_seconds[0] / steps,
                   "param_bytes": {r: t.backend.local_param_bytes(r) for r in t.nets.present()},
                   "peak_bytes": tracker.get_tracker_snapshot("peak")[info.device]["Total"]}, open(out, "w"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, recipe: str, out: str, steps: int, overrides: list[str]) -> dict:
    prefix = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([*prefix, __file__, "--worker", out, "--recipe", recipe, "--steps", str(steps),
                             *overrides], env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.load(open(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.ranks = 1, [1]
    if args.worker:
        worker(args.recipe, args.worker, args.steps, args.overrides)
        return 0
    out = "/tmp/dmdx_step_overhead.json"
    base = OVERRIDES + args.overrides
    r = launch(1, args.recipe, out, args.steps, base + ["parallel.backend=data_parallel"])
    passes = r["forward"] + r["backward"]
    print(f"ADM step, 1 process, plain data parallel ({os.path.basename(args.recipe)}, {args.steps} steps after one "
          f"warm-up):")
    print(f"  step {r['step'] * 1e3:.1f} ms = network forward {r['forward'] * 1e3:.1f} + backward "
          f"{r['backward'] * 1e3:.1f} + clip/optimizer/EMA {r['optimizer'] * 1e3:.1f} + rest "
          f"{(r['step'] - passes - r['optimizer']) * 1e3:.1f} ms")
    print(f"  framework-overhead ratio (step / network passes): {r['step'] / passes:.3f}")
    print("\n| backend | ranks | rank-0 parameter bytes (teacher / generator / fake_score / heads) | rank-0 peak "
          "tensor MiB | step s |")
    print("| --- | --- | --- | --- | --- |")
    for backend in ("fsdp2", "zero3"):
        for ranks in args.ranks:
            r = launch(ranks, args.recipe, out, args.steps,
                       base + [f"parallel.backend={backend}", "distill.train.batch_size=8"])
            b = r["param_bytes"]
            roles = " / ".join(f"{b.get(k, 0):,}" for k in ("teacher", "generator", "fake_score", "heads"))
            print(f"| {backend} | {ranks} | {roles} | {r['peak_bytes'] / 2**20:.1f} | {r['step']:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
