"""Per-GPU memory plans of the full-size models at 8 and 64 GPUs under FSDP2 and ZeRO-3 (bf16, ADM: teacher,
generator, fake score, heads), from the meta device; no weights.

    python benchmarks/plan_table.py [--batch-per-gpu 2] [--gpus 8 64]

SDXL's step is traced for activations (minutes on a CPU per GPU count). SD3-Medium and CogVideoX-2B get model states
only here (their traces take 5-15 CPU minutes each: `python -m trainer.main RECIPE --dry-run` on their recipes, or
benchmarks/recipe_memory.py, traces them).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()

from trainer.memory_plan import GIB, model_states, plan_memory  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families.configs import build_on_meta  # noqa: E402

SDXL = ["teacher.pretrained=stabilityai/stable-diffusion-xl-base-1.0", "family.model=sdxl", "family.resolution=1024",
        "family.prompt_length=77", "family.head_hidden=128", "parallel.mixed_precision=bf16"]

SMOKE_SDXL = ["teacher.pretrained=stabilityai/sdxl-planning-only"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-per-gpu", type=int, default=2)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    sdxl = SMOKE_SDXL if args.smoke else SDXL   # the tiny twin on 2 ranks: seconds instead of minutes
    if args.smoke:
        args.gpus = [2]
    recipe_path = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
    rows = []
    for gpus in args.gpus:
        batch = [f"distill.train.batch_size={args.batch_per_gpu * gpus}"]
        fsdp = plan_memory(load_recipe(recipe_path, sdxl + batch + ["parallel.backend=fsdp2"]), gpus)
        zero3 = plan_memory(load_recipe(recipe_path, sdxl + batch + ["parallel.backend=zero3"]), gpus,
                            traced_peak=fsdp.traced_peak)
        rows.append(("SDXL UNet", gpus, fsdp.model_states, zero3.model_states, fsdp.activations, fsdp.total,
                     zero3.total))
        print(fsdp.format(), zero3.format(), sep="\n\n", flush=True)
        for name, label in (("sd3_medium", "SD3-Medium"), ("cogvideox_2b", "CogVideoX-2B")):
            roles = {role: build_on_meta(name) for role in ("teacher", "generator", "fake_score")}
            totals = []
            for backend in ("fsdp2", "zero3"):
                recipe = load_recipe(recipe_path, sdxl + batch + [f"parallel.backend={backend}"])
                totals.append(sum(r.total for r in model_states(recipe, gpus, roles)))
            rows.append((label, gpus, totals[0], totals[1], None, None, None))
    print(f"\nADM, bf16, {args.batch_per_gpu} samples per GPU; GiB per GPU")
    print("| model | GPUs | FSDP2 model states | ZeRO-3 model states | activations (traced) | FSDP2 total | "
          "ZeRO-3 total |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, gpus, f_states, z_states, acts, f_total, z_total in rows:
        cell = (lambda v: f"{v / GIB:.1f}" if v is not None else "not traced here")
        print(f"| {label} | {gpus} | {f_states / GIB:.1f} | {z_states / GIB:.1f} | {cell(acts)} | {cell(f_total)} | "
              f"{cell(z_total)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
