"""GPU check (issues #6 and the brief's speed target): full ADM steps of full-size SDXL through the project's trainer
on one GPU with random weights in bf16, the step time beside the floor that the same network passes cost alone, and
the peak memory beside the planner's prediction.

    python benchmarks/gpu_step_check.py [--model sdxl] [--resolution 1024] [--batch 1] [--steps 3] [--plan-gib G]

- Trainer step: `StageTrainer.train_step` under FSDP2 on one rank with bf16 mixed precision (what a recipe runs),
  timed from the start of the step to the end of its last kernel.
- Passes: GPU time inside every role's forward (CUDA events recorded by forward pre/post hooks on each role's root
  module) plus inside every backward (events around `backend.backward`). Events do not synchronise the host, so the
  measurement does not slow the step. The rest of the step is the framework: random draws, denoiser views, losses,
  clipping, the optimizers, the EMA.
- Peak: torch.cuda.max_memory_allocated over build + steps, beside `--plan-gib` (the planner's total for the same
  overrides at 1 rank; computing it traces a full-size step on the CPU, minutes, so it is passed in).

Without CUDA it runs the tiny twin on the CPU (host clocks instead of events): the dry run before device time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")


class Clock:
    """Timestamps on the device's stream (CUDA events) or the host (CPU, where every op is synchronous)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) * 1e-3 if self.cuda else end - start


def profile_step(t, step: int, cuda: bool) -> None:
    """One step under torch.profiler: the host ops that cost most and the synchronising calls (each one lets the
    GPU drain while the host waits)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=False) as prof:
        t.train_step(step, defaultdict(list))
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    syncs = [e for e in events if any(k in e.key for k in ("Synchronize", "aten::item", "aten::_local_scalar_dense",
                                                           "cudaMemcpy ", "aten::is_nonzero"))]
    for e in syncs:
        print(f"sync-ish: {e.key:<40} calls {e.count:>5}  host total {e.cpu_time_total / 1e3:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="family.model (default: sdxl on CUDA, sdxl_tiny on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 1024 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--plan-gib", type=float, default=None, help="the planner's total for these settings")
    parser.add_argument("--profile", action="store_true", help="then profile one more step: the host's top ops and "
                        "every host-device synchronisation")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch = 1, 1
    cuda = torch.cuda.is_available()
    model = args.model or ("sdxl" if cuda else "sdxl_tiny")
    resolution = args.resolution or (1024 if cuda else 128)
    overrides = ["teacher.pretrained=stabilityai/sdxl-benchmark-only", "parallel.backend=fsdp2",
                 "parallel.mixed_precision=bf16", f"distill.train.batch_size={args.batch}", f"family.model={model}",
                 f"family.resolution={resolution}", f"distill.train.steps={args.steps + 1}", *args.overrides]

    from parallel.distributed import init_distributed
    from trainer.memory_plan import build_trainer
    from trainer.config import load_recipe
    from trainer.families import build_family
    recipe = load_recipe(RECIPE, overrides)
    info = init_distributed(need_group=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    t = build_trainer(recipe, info, build_family(recipe, planning=True))
    if cuda:
        torch.cuda.synchronize()
    build_seconds = time.perf_counter() - t0
    clock = Clock(cuda)
    intervals: dict[str, list] = defaultdict(list)   # kind -> [(start, end)] of the timed steps
    open_forward: dict[int, object] = {}
    recording = [False]

    def pre(module, args_, kwargs=None):
        if recording[0]:
            open_forward[id(module)] = clock.stamp()

    def post(module, args_, output):
        if recording[0] and id(module) in open_forward:
            intervals["forward"].append((open_forward.pop(id(module)), clock.stamp()))

    for module in t.nets.present().values():
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    inner_backward = t.backend.backward

    def timed_backward(loss, roles):
        start = clock.stamp()
        inner_backward(loss, roles)
        if recording[0]:
            intervals["backward"].append((start, clock.stamp()))

    t.backend.backward = timed_backward
    t.train_step(0, defaultdict(list))              # warm-up: lazy initialisation, allocator, cuDNN autotuning
    recording[0] = True
    steps = []
    for step in range(1, args.steps + 1):
        start = clock.stamp()
        t.train_step(step, defaultdict(list))
        steps.append((start, clock.stamp()))
    if cuda:
        torch.cuda.synchronize()
    step_s = sum(clock.seconds(a, b) for a, b in steps) / args.steps
    forward_s = sum(clock.seconds(a, b) for a, b in intervals["forward"]) / args.steps
    backward_s = sum(clock.seconds(a, b) for a, b in intervals["backward"]) / args.steps
    passes = forward_s + backward_s
    device = torch.cuda.get_device_name() if cuda else "cpu"
    params = {r: sum(p.numel() for p in m.parameters()) for r, m in t.nets.present().items()}
    print(f"device: {device}; {model} ({', '.join(f'{r} {n / 1e9:.3f} B' for r, n in params.items())}), "
          f"ADM, FSDP2 bf16, 1 rank, batch {args.batch}, {resolution} px; build {build_seconds:.1f} s")
    print(f"| per step ({args.steps} timed after a warm-up) | ms | per sample ms |")
    print("| --- | --- | --- |")
    for name, seconds in (("trainer step", step_s), ("network passes (forward + backward)", passes),
                          ("  forward", forward_s), ("  backward", backward_s),
                          ("framework (step - passes: draws, losses, clip, optimizers, EMA)", step_s - passes)):
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds * 1e3 / args.batch:.1f} |")
    print(f"step / passes: {step_s / passes:.3f}")
    if args.profile:
        profile_step(t, args.steps + 1, cuda)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        plan = f"planner {args.plan_gib:.2f} GiB ({peak / args.plan_gib - 1:+.1%})" if args.plan_gib else "no plan"
        print(f"peak allocated {peak:.2f} GiB; {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
