"""The memory plan of every full-size recipe at its declared GPU count, as the recipe headers state it.

    python benchmarks/recipe_memory.py [--write] [--no-trace] [RECIPE ...]

Runs `python -m trainer.main RECIPE --dry-run --world-size NODES*GPUS_PER_NODE` (one fresh process per recipe: the
trace uses a fake process group) and prints a table. `--write` rewrites each recipe's `# memory per GPU` header line
from the plan; `--no-trace` plans model states only (seconds) and keeps the header's traced activation figure.
The traced step is slow on a CPU (shapes only, op by op: 5-9 minutes per full-size recipe on one core), which is why
tests/unit/test_recipe_headers.py regenerates the model-state part in CI and the traced part when
DMDX_TRACE_RECIPES=1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RECIPES = ["recipes/sdxl/dmdx_1step.yaml", "recipes/sd3_medium/adm_4step.yaml", "recipes/sd35_large/adm_4step.yaml",
           "recipes/cogvideox_2b/adm_8step.yaml", "recipes/cogvideox_5b/adm_8step.yaml"]
HEADER = re.compile(r"^# memory per GPU \(planner, --dry-run --world-size (\d+)(?:, distill stage)?\): model states "
                    r"([\d.]+) GiB \+ activations ([\d.]+) GiB \(traced\) = ([\d.]+) GiB of (\d+) GiB$", re.M)


def header_line(world: int, states: float, activations: float, gpu_gib: float, stage_note: bool) -> str:
    stage = ", distill stage" if stage_note else ""
    return (f"# memory per GPU (planner, --dry-run --world-size {world}{stage}): model states {states:.2f} GiB + "
            f"activations {activations:.2f} GiB (traced) = {states + activations:.2f} GiB of {gpu_gib:g} GiB")


def declared(path: str):
    """(recipe, world size, header match or None)."""
    from trainer.config import load_recipe
    recipe = load_recipe(os.path.join(ROOT, path))
    with open(os.path.join(ROOT, path)) as f:
        match = HEADER.search(f.read())
    return recipe, recipe.launch.nodes * recipe.launch.gpus_per_node, match


def plan(path: str, world: int, trace: bool) -> tuple[float, float]:
    """(model states GiB, activations GiB) per GPU: the CLI's dry run when tracing (a fresh process: the trace uses
    a fake process group), else the planner in this process (meta-device roles only, seconds)."""
    if not trace:
        from trainer.memory_plan import GIB, plan_memory
        from trainer.config import load_recipe
        roles = plan_memory(load_recipe(os.path.join(ROOT, path)), world, trace=False).roles
        return sum(round(r.total / GIB, 3) for r in roles), 0.0   # as the dry run prints them, role by role
    args = [sys.executable, "-m", "trainer.main", os.path.join(ROOT, path), "--dry-run", "--world-size", str(world)]
    if not trace:
        args.append("--no-trace")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("teacher", "generator", "fake_score", "heads") and len(parts) == 8:
            rows[parts[0]] = float(parts[-1])
    activations = re.search(r"^activations and transients.*?([\d.]+)$", out, re.M)
    return sum(rows.values()), float(activations.group(1)) if activations else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    parser.add_argument("--write", action="store_true", help="rewrite the recipes' memory header lines")
    parser.add_argument("--no-trace", action="store_true", help="model states only; keep the traced activations")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:   # the first recipe's model states: no trace, nothing written
        args.recipes, args.no_trace, args.write = args.recipes[:1], True, False
    print(f"{'recipe':38s} {'GPUs':>5s} {'states GiB':>11s} {'activ. GiB':>11s} {'total GiB':>10s} {'of GiB':>7s}")
    for path in args.recipes:
        recipe, world, match = declared(path)
        states, activations = plan(path, world, trace=not args.no_trace)
        if args.no_trace:
            activations = float(match.group(3)) if match else 0.0
        gpu = recipe.parallel.gpu_memory_gib
        print(f"{path:38s} {world:5d} {states:11.2f} {activations:11.2f} {states + activations:10.2f} {gpu:7g}",
              flush=True)
        if args.write:
            full = os.path.join(ROOT, path)
            with open(full) as f:
                text = f.read()
            line = header_line(world, states, activations, gpu, "pretrain" in recipe.stages)
            text = re.sub(r"^# memory per GPU .*$", line, text, count=1, flags=re.M)
            with open(full, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
