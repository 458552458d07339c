"""Benchmark: DMD vs DMD2 vs ADM on the toys, over seeds. Prints a table (method x toy x seed).

    python benchmarks/toy_methods.py [--out runs/bench] [--seeds 0 1 2] [--toys digits grid25u] [--jobs 2]
                                     [--methods dmd dmd2 adm] [key=value ...]

One teacher per toy (trained once, seed 0), then one distillation per (method, seed) through the real CLI, each
evaluated against held-out data: FD in the evaluation classifier's feature space, classes or modes covered,
precision / recall, and student sampling throughput. Extra key=value overrides apply to every run.
Never run in CI (minutes per run). Finished runs are reused on rerun (each run dir resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {("digits", "adm"): "recipes/toy/default.yaml", ("digits", "dmd"): "recipes/toy/dmd.yaml",
           ("digits", "dmd2"): "recipes/toy/dmd2.yaml", ("grid25u", "adm"): "recipes/toy/grid25u_adm.yaml",
           ("grid25u", "dmd"): "recipes/toy/grid25u_dmd.yaml", ("grid25u", "dmd2"): "recipes/toy/grid25u_dmd2.yaml"}


def cli(recipe: str, run_dir: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "trainer.main", recipe, f"run.dir={run_dir}", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{recipe} {run_dir} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--toys", nargs="+", default=["digits", "grid25u"])
    parser.add_argument("--methods", nargs="+", default=["dmd", "dmd2", "adm"])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU core each)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = os.path.abspath(args.out)

    teachers = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {toy: pool.submit(cli, RECIPES[(toy, "adm")], f"{out}/{toy}_teacher",
                                    ["stages=[teacher]", *args.overrides]) for toy in args.toys}
        for toy, fut in futures.items():
            fut.result()
            teachers[toy] = f"{out}/{toy}_teacher/teacher/teacher.safetensors"
        jobs = {}
        for toy in args.toys:
            for method in args.methods:
                for seed in args.seeds:
                    run_dir = f"{out}/{toy}_{method}_seed{seed}"
                    jobs[(toy, method, seed)] = (run_dir, pool.submit(
                        cli, RECIPES[(toy, method)], run_dir,
                        [f"run.seed={seed}", f"teacher.pretrained={teachers[toy]}", "stages=[distill,evaluate]",
                         *args.overrides]))
        rows = []
        for (toy, method, seed), (run_dir, fut) in jobs.items():
            seconds = fut.result()
            m = json.load(open(f"{run_dir}/evaluate/metrics.json"))
            rows.append((toy, method, seed, m, seconds))

    coverage = lambda m: m.get("classes_covered", m.get("modes_covered"))  # noqa: E731
    header = (f"{'toy':8} {'method':6} {'seed':>4} {'FD':>8} {'FD/teach':>8} {'covered':>7} {'prec':>5} "
              f"{'recall':>6} {'student samples/s':>17} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for toy, method, seed, m, seconds in rows:
        s = m["student"]
        print(f"{toy:8} {method:6} {seed:>4} {s['fd']:8.3f} {m['fd_ratio_student_over_teacher']:8.2f} "
              f"{coverage(s):>7} {s['precision']:5.3f} {s['recall']:6.3f} {m['student_samples_per_second']:17.0f} "
              f"{seconds:7.0f}")
    print()
    print("teacher (multi-step sampler, same guidance):")
    for toy in args.toys:
        m = next(r[3] for r in rows if r[0] == toy)
        t = m["teacher"]
        print(f"  {toy:8} FD {t['fd']:.3f}  covered {coverage(t)}  precision {t['precision']:.3f}  recall "
              f"{t['recall']:.3f}  samples/s {m['teacher_samples_per_second']:.0f}  ({m['teacher_sampler_steps']} steps)")
    print()
    print("mean over seeds:")
    for toy in args.toys:
        for method in args.methods:
            sel = [r[3]["student"] for r in rows if r[0] == toy and r[1] == method]
            print(f"  {toy:8} {method:6} FD {statistics.mean(x['fd'] for x in sel):8.3f}  covered "
                  f"{statistics.mean(coverage(x) for x in sel):5.1f}  precision "
                  f"{statistics.mean(x['precision'] for x in sel):.3f}  recall {statistics.mean(x['recall'] for x in sel):.3f}")


if __name__ == "__main__":
    main()
