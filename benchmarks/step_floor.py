"""Step speed against its floor, measured in the same process (issue "step speed", docs/parallelism.md "Step
speed"): the trainer's full ADM step beside the same network passes on the stock modules.

    python benchmarks/step_floor.py [--families sdxl sd3 cogvideox] [--batch 4] [--steps 3] [--compile-backend B]

Per family, on one device:
- **trainer**: `StageTrainer.train_step` with FSDP2 wrapping forced on (1 rank: every block is its own FSDP2 unit,
  as on 8-32 GPUs), eager; then the same with `parallel.compile` (compile time printed apart, from the first step);
- **stock passes**: the step's passes written out on the same module classes built plain (no wrapper, no hooks,
  no backend): the generator forward (its graph kept), the fake score's denoising loss + backward + AdamW, the
  generator's loss through the frozen fake score's input and the teacher's tapped backbone + heads, backward, AdamW
  and the EMA, then the teacher's CFG forward, the fake step and the heads' hinge loss + backward + AdamW. Noise
  from torch.randn; the schedule maths is the project's denoiser (pure elementwise maths, the same in both).
- Precision: CUDA: fp32 master weights under bf16 (FSDP2's bf16 policy for the trainer, bf16 autocast for the stock
  passes, frozen roles held in bf16 on both sides); CPU: fp32 both.
- **ZeRO-3**: the same ADM step under `parallel.backend: zero3` (eager: compile is refused with ZeRO-3), by default
  and with the teacher kept whole (`parallel.keep_gathered: [teacher]`: persistent parameters); on the tiny twins
  with persistence threshold 0, since all their parameters are below the default one.
- **DMD2 (TTUR 5)**: one generator update of DMD2 (5 steps: 5 critic updates, 1 generator update) beside one ADM
  step (TTUR 1: one critic, one heads and one generator update), both FSDP2 eager, to state the TTUR economics per
  generator update. DMD2's GAN reads real latents: a random `real_latents` stream is written to a temp folder (its
  values change no cost).
- Printed: ms per sample (host clocks on CPU; CUDA: wall with a synchronise at the end of the timed steps), the
  ratio to the stock passes, aten ops per step counted two ways (a TorchDispatchMode over one eager step: every op
  that reaches the dispatcher, ours, FSDP2's and the stock code's; and torch.profiler's aten events, nested ones
  included, which also sees compiled steps), peak memory and GPU busy time (the profiler's device time) on CUDA,
  and versions.

Without CUDA it runs the tiny twins (recipes/tiny/*): the dry run before device time, and the CPU proxy of the
issue's target (dispatched ops of the trainer / stock passes <= 1.10, eager).
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from data.parts import PartsWriter  # noqa: E402
from data.schemas import EMBEDDING_PREFIX, columns, embedding_columns  # noqa: E402
from parallel.distributed import init_distributed  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.denoiser import cat_conditions  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.losses import denoising_loss, hinge_discriminator_loss, hinge_generator_loss  # noqa: E402
from trainer.memory_plan import build_trainer  # noqa: E402

TINY = {"sdxl": "sdxl_tiny", "sd3": "sd3_medium_tiny", "cogvideox": "cogvideox_2b_tiny"}
FULL = {"sdxl": ("sdxl_tiny", ["family.model=sdxl", "family.resolution=1024"]),
        "sd3": ("sd3_medium_tiny", ["family.model=sd3_medium", "family.resolution=1024"]),
        "cogvideox": ("cogvideox_2b_tiny", ["family.model=cogvideox_2b", "family.frames=13", "family.height=480",
                                            "family.width=720"])}


class OpCounter(TorchDispatchMode):
    """Every op that reaches the Python dispatcher (after autograd and decompositions): eager steps only, since
    dynamo runs compiled regions eagerly while a dispatch mode is active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def profiled_aten_ops(fn, step: int, cuda: bool) -> tuple[int, float]:
    """(aten op events on the host, device seconds) of one call under torch.profiler, which sees compiled regions
    as they run: a compiled region's generated kernels are not aten ops, its library calls (matmuls) are."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn(step)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return ops, sum(e.self_device_time_total for e in events) * 1e-6


def stock_step(t, ctx, optimizers: dict, ema: list, autocast) -> None:
    """One ADM step's passes on plain modules (see the module docstring); t: a data_parallel trainer on 1 rank,
    whose roles are the plain modules. ctx: its step context (conditioning only)."""
    nets, den = t.nets, t.denoiser
    cfg, shape = t.method.cfg, t.family.data_shape
    b, device = len(ctx.rand.sample_indices), t.dist.device
    schedule = den.schedule

    def times(lo, hi):
        return schedule.timesteps_from_uniform(torch.rand(b, device=device), lo, hi)

    def step(role):
        params = [p for p in nets.role(role).parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True)
        optimizers[role].step()
        optimizers[role].zero_grad(set_to_none=True)

    def updating(role_updated):
        """Only the updated role's weights require grad (the generator's too: its sample keeps its graph)."""
        for role in ("generator", "fake_score", "heads"):
            nets.role(role).requires_grad_(role in (role_updated, "generator"))

    updating("fake_score")
    with autocast:
        noise = torch.randn(b, *shape, device=device)
        t_gen = torch.full((b,), float(t.conditioning_timestep or t.student_timesteps[0]), device=device)
        x0g = den.predict(nets.generator, noise, t_gen, ctx.cond).x0          # graph kept for the generator phase
        # fake score: denoising loss on the detached sample
        x, eps, ts = x0g.detach(), torch.randn(b, *shape, device=device), times(0.0, 1.0)
        loss = denoising_loss(nets.fake_score(den.add_noise(x, eps, ts), ts, **ctx.cond), den.target(x, eps, ts))
    loss.backward()
    step("fake_score")
    with autocast:
        # generator: through the frozen fake score's input and the teacher's tapped backbone
        updating("generator")
        ts = times(cfg.t_min_frac, cfg.t_max_frac)
        u = ts - 1000.0 * cfg.dt_frac
        x_t = den.add_noise(x0g.float(), torch.randn(b, *shape, device=device), ts)
        x_fake = den.ode_step(den.predict(nets.fake_score, x_t, ts, ctx.cond), x_t, ts, u)
        loss = hinge_generator_loss(nets.heads(den.tapped_features(nets.teacher, x_fake, u, ctx.cond)))
    loss.backward()
    step("generator")
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.float() for p in nets.generator.parameters()], 0.001)
    with autocast:
        updating("heads")
        with torch.no_grad():
            x_t = den.add_noise(x0g.detach().float(), torch.randn(b, *shape, device=device), ts)
            real = den.predict(nets.teacher, x_t, ts, ctx.cond, ctx.uncond, cfg.guidance_scale)
            x_real = den.ode_step(real, x_t, ts, u)
            x_fake = den.ode_step(den.predict(nets.fake_score, x_t, ts, ctx.cond), x_t, ts, u)
            features = den.tapped_features(nets.teacher, torch.cat([x_real, x_fake]), torch.cat([u, u]),
                                           cat_conditions(ctx.cond, ctx.cond))
        real_logits, fake_logits = nets.heads(features).chunk(2)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
    loss.backward()
    step("heads")


def random_real_latents(folder: str, family, count: int) -> str:
    """A `real_latents` stream of `count` random latents with random caption embeddings (data/schemas.py), the input
    DMD2's GAN reads; random values cost what real ones do."""
    rng = np.random.default_rng(0)
    shapes = family.embedding_shapes()
    writer = PartsWriter(folder, columns("real_latents", embedding_columns(shapes)), compression=None)
    writer.write(0, ({"id": i, "latent": rng.standard_normal(family.data_shape).astype(np.float16),
                      "caption": f"caption {i}", "label": -1,
                      **{EMBEDDING_PREFIX + name: rng.standard_normal(shape).astype(np.float16)
                         for name, shape in shapes.items()}} for i in range(count)))
    writer.merge(1)
    return folder


def timed(fn, steps: int, cuda: bool) -> float:
    """Seconds per call of fn(step) over `steps` calls (after the caller's warm-up)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        fn(step)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(fn, warmup_step, steps: int, cuda: bool, count_dispatch: bool = True) -> dict:
    """First call (lazy init, compilation), timed calls, one profiled call, then (eager only) one call under the
    dispatch counter: dynamo does not run compiled code under a dispatch mode and, its frames then marked to
    skip, would stay eager afterwards."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn(warmup_step)
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    out = {"first_s": first, "step_s": timed(fn, steps, cuda)}
    out["profiled"], busy = profiled_aten_ops(fn, steps + 1, cuda)
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_busy_s"] = busy
    if count_dispatch:
        counter = OpCounter()
        with counter:
            fn(steps + 2)
        out["dispatched"] = counter.ops
    return out


def release(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def family_rows(name: str, args, info, cuda: bool) -> list[tuple[str, dict]]:
    recipe_name, size = (FULL[name] if cuda else (TINY[name], []))
    common = ["teacher.pretrained=org/step-floor-benchmark-only", f"distill.train.batch_size={args.batch}",
              "distill.method.ttur=1", *size, *(["parallel.mixed_precision=bf16"] if cuda else []), *args.overrides]
    path = os.path.join(ROOT, "recipes", "tiny", f"{recipe_name}.yaml")
    rows = []

    def trainer_variant(label: str, extra: list[str], backend: str = "fsdp2", steps_per_call: int = 1):
        """steps_per_call: train steps per timed call (a DMD2 generator update is `ttur` steps)."""
        recipe = load_recipe(path, [*common, f"parallel.backend={backend}", *extra])
        t = build_trainer(recipe, info, build_family(recipe, planning=True))

        def call(s):
            for k in range(steps_per_call):
                t.train_step(s * steps_per_call + k, collections.defaultdict(list))
        rows.append((label, measure(call, 0, args.steps, cuda, count_dispatch="parallel.compile=true" not in extra)))
        release(t)

    # --smoke runs each code path once: the rows that only change recipe keys of a path already run are left out,
    # and so is the compiled row (30 s of compilation on 1 core; tests/distributed/test_compile.py covers compile)
    trainer_variant("trainer, FSDP2, eager", ["parallel.compile=false"])
    if not args.smoke:
        trainer_variant("trainer, FSDP2, eager, keep_gathered (every role)",
                        ["parallel.compile=false", "parallel.keep_gathered=[teacher,fake_score,generator,heads]"])
    trainer_variant("trainer, FSDP2, eager, keep_gathered + one unit per role",
                    ["parallel.compile=false", "parallel.keep_gathered=[teacher,fake_score,generator,heads]",
                     "parallel.fsdp_min_unit_params=1000000000"])
    if not args.smoke:
        trainer_variant(f"trainer, FSDP2, compiled ({args.compile_backend})",
                        ["parallel.compile=true", f"parallel.compile_backend={args.compile_backend}"])
    # the tiny twins' parameters are all below ZeRO-3's default persistence threshold (1e5 elements), so they would
    # all stay whole; threshold 0 partitions them, as a full-size model's large parameters are
    zero3 = ["parallel.compile=false", *([] if cuda else ["parallel.zero3_persistence_threshold=0"])]
    if not args.smoke:
        trainer_variant("trainer, ZeRO-3, eager", zero3, backend="zero3")
    trainer_variant("trainer, ZeRO-3, eager, teacher kept whole", [*zero3, "parallel.keep_gathered=[teacher]"],
                    backend="zero3")
    if not args.no_dmd2:
        family = build_family(load_recipe(path, common), planning=True)
        with tempfile.TemporaryDirectory() as folder:
            real = random_real_latents(folder, family, 4 * args.batch * 5 * (args.steps + 3))
            trainer_variant("trainer, FSDP2, eager, DMD2 (TTUR 5): one generator update = 5 steps",
                            ["parallel.compile=false", "distill.method.name=dmd2", "distill.method.ttur=5",
                             f"data.real_remote={real}"], steps_per_call=5)
    # the stock modules: a 1-rank data_parallel build holds each role plain (no wrapper, no hooks)
    recipe = load_recipe(path, [*common, "parallel.backend=data_parallel", "parallel.compile=false",
                                "parallel.mixed_precision=fp32"])
    plain = build_trainer(recipe, info, build_family(recipe, planning=True))
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        plain.nets.teacher.to(torch.bfloat16)   # frozen roles in bf16, as the trainer holds them
    optimizers = {role: torch.optim.AdamW([p for p in plain.nets.role(role).parameters()], lr=1e-6, fused=True)
                  for role in ("generator", "fake_score", "heads")}
    ema = [p.detach().float().clone() for p in plain.nets.generator.parameters()]
    ctx = plain.make_context(0)
    rows.append(("stock passes (plain modules, no wrapper)",
                 measure(lambda s: stock_step(plain, ctx, optimizers, ema, autocast), 0, args.steps, cuda)))
    release(plain, optimizers, ema, ctx)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sdxl"], choices=sorted(TINY))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--compile-backend", default="inductor", help="the compiled row's backend (inductor, aot_eager)")
    parser.add_argument("--smoke", action="store_true",
                        help="every code path once, tiny and short (no compiled row: see family_rows)")
    parser.add_argument("--no-dmd2", action="store_true", help="skip the DMD2 row")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch = 1, 2
    cuda = torch.cuda.is_available()
    info = init_distributed(need_group=True)
    import diffusers  # versions line only (already imported by the families)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu (' + platform.processor() + ')'}, "
          f"{'full-size, bf16 autocast over fp32 masters' if cuda else 'tiny twins, fp32'}, batch {args.batch}, "
          f"{args.steps} timed steps after one warm-up", flush=True)
    print("| family | variant | first step s | ms / sample | ratio to stock | dispatched ops / step | ratio | "
          "profiled aten ops / step | ratio | peak GiB | GPU busy ms / sample |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summaries = []
    for name in args.families:
        rows = family_rows(name, args, info, cuda)
        stock = rows[-1][1]
        for label, r in rows:
            busy = f"{r['gpu_busy_s'] * 1e3 / args.batch:.1f}" if "gpu_busy_s" in r else "-"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            # the dispatch counter runs compiled regions eagerly (see OpCounter): eager rows only
            dispatched = (f"{r['dispatched']} | {r['dispatched'] / stock['dispatched']:.3f}" if "dispatched" in r
                          else "- | -")
            print(f"| {name} | {label} | {r['first_s']:.1f} | {r['step_s'] * 1e3 / args.batch:.1f} | "
                  f"{r['step_s'] / stock['step_s']:.3f} | {dispatched} | {r['profiled']} | "
                  f"{r['profiled'] / stock['profiled']:.3f} | {peak} | {busy} |", flush=True)
        summaries.append(summary(name, dict(rows)))
    print("\n".join(summaries))
    return 0


def summary(name: str, rows: dict) -> str:
    """The issue's figures in words: trainer / stock passes (eager, compiled), ADM / DMD2 per generator update."""
    stock = rows["stock passes (plain modules, no wrapper)"]
    eager = rows["trainer, FSDP2, eager, keep_gathered + one unit per role"]
    compiled = next((r for label, r in rows.items() if "compiled" in label), None)   # None with --smoke
    lines = [f"{name}: trainer / stock passes, ops per step: eager (keep_gathered, one unit per role) "
             f"{eager['dispatched'] / stock['dispatched']:.3f} dispatched, {eager['profiled'] / stock['profiled']:.3f} "
             + (f"profiled; compiled {compiled['profiled'] / stock['profiled']:.3f} profiled" if compiled else "profiled")
             + f" (target <= 1.10). Time: eager {eager['step_s'] / stock['step_s']:.3f}"
             + (f", compiled {compiled['step_s'] / stock['step_s']:.3f}." if compiled else ".")]
    dmd2 = next((r for label, r in rows.items() if "DMD2" in label), None)
    if dmd2 is not None:
        adm = rows["trainer, FSDP2, eager"]
        lines.append(f"{name}: per generator update, ADM (TTUR 1) / DMD2 (TTUR 5), FSDP2 eager: time "
                     f"{adm['step_s'] / dmd2['step_s']:.3f}, profiled ops {adm['profiled'] / dmd2['profiled']:.3f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
