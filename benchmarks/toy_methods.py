"""Benchmark: the DMDX pipeline against its parts and the baselines on the toys, over seeds. Prints a table
(method x toy x seed) and the means.

    python benchmarks/toy_methods.py [--out runs/bench] [--seeds 0 1 2] [--toys digits grid25u] [--jobs 2]
                                     [--methods regression adp adm dmdx dmd dmd2] [--scale 1.0] [key=value ...]

Per toy, one teacher (seed 0) and one set of its ODE pairs are made once and shared. Then per (method, seed):
  regression  ODE-pair regression alone (DMD2's initialisation; the paper's ablation A1)    pretrain stage
  adp         ADP alone (ablation A5)                                                        pretrain stage
  dmdx        ADP then ADM from ADP's generator (Table 4 row B4): reuses the adp run's student
  adm         ADM alone from the teacher's weights (Table 4 row B1), as many generator updates as dmdx in total
  dmd, dmd2   the baselines, as many generator updates as adm
each through the real CLI and evaluated against held-out data: FD in the evaluation classifier's feature space,
classes or modes covered, precision / recall. --scale multiplies every stage's step count (0.5: half-length runs).
Never run in CI (minutes per run). Finished runs are reused on rerun (each run dir resumes).

Variants (the readings sweep, docs/algorithms.md §5.5): `--variant NAME KEY=VALUE ...` (repeatable) adds the rows
adp-NAME / dmdx-NAME / adm-NAME for the listed methods among those three, with the overrides on top. A variant without
`pretrain.` keys reuses the plain adp run's student for its dmdx row. Every row also prints the discriminator
diagnostics of its last stage, averaged over the run's second half (trainer/diagnostics.py): hinge, accuracy, the
adversarial gradient's cosine with the distribution-matching direction and ADM's relative input distance (ADM);
latent hinge and accuracy and pixel accuracy (ADP).
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

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = {"digits": "recipes/toy/", "grid25u": "recipes/toy/grid25u_"}
RECIPE = {"regression": "regression", "adp": "adp", "dmdx": "dmdx", "adm": "adm", "dmd": "dmd", "dmd2": "dmd2"}
PRETRAIN_STEPS, DISTILL_STEPS = 1000, 1000     # the default recipe's (dmdx): ADP 1000 + ADM 1000


def recipe_for(toy: str, method: str) -> str:
    name = "default" if (toy, method) == ("digits", "dmdx") else RECIPE[method]
    return f"recipes/toy/{name}.yaml" if toy == "digits" else f"{PREFIX[toy]}{name}.yaml"


def cli(recipe: str, run_dir: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "trainer.main", recipe, f"run.dir={run_dir}", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{recipe} {run_dir} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


DIAGNOSTICS = {"distill": ("hinge", "accuracy", "gradient_cosine", "input_distance"),
               "pretrain": ("latent_hinge", "latent_accuracy", "pixel_accuracy")}


def diagnostics_summary(run_dir: str, stage: str) -> dict[str, float]:
    """The stage's diagnostics (all-sample means), averaged over the logged values of the run's second half."""
    events = EventAccumulator(f"{run_dir}/{stage}/tb", size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    out = {}
    for name in DIAGNOSTICS[stage]:
        tag = f"metrics/diagnostics/{name}"
        if tag in tags:
            values = [e.value for e in events.Scalars(tag)]
            values = values[len(values) // 2:] or values
            out[name] = sum(values) / len(values)
    return out


def method_overrides(method: str, scale: float, shared: dict, out: str, toy: str, seed: int,
                     adp_name: str = "adp") -> list[str]:
    pretrain = max(1, round(PRETRAIN_STEPS * scale))
    distill = max(1, round(DISTILL_STEPS * scale))
    base = [f"run.seed={seed}", f"teacher.pretrained={shared['teacher']}"]
    if method in ("regression", "adp"):
        return base + [f"data.pairs_remote={shared['pairs']}", "stages=[pretrain,evaluate]",
                       f"pretrain.train.steps={pretrain}"]
    if method == "dmdx":
        return base + [f"distill.init_generator={out}/{toy}_{adp_name}_seed{seed}/pretrain/student.safetensors",
                       "stages=[distill,evaluate]", f"distill.train.steps={distill}"]
    return base + ["stages=[distill,evaluate]", f"distill.train.steps={pretrain + distill}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--toys", nargs="+", default=["digits", "grid25u"])
    parser.add_argument("--methods", nargs="+", default=["regression", "adp", "dmdx", "adm", "dmd", "dmd2"])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU core each)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="a named set of overrides for the adp / dmdx / adm rows (repeatable)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:   # one toy, one seed, one method, a few steps everywhere
        args.seeds, args.toys, args.methods, args.scale = [0], ["digits"], ["dmd"], 0.005
        args.overrides = [*args.overrides, "eval.num_samples=200", "teacher.train.steps=20", "teacher.sampler_steps=4",
                          "collect.num_pairs=256", "collect.micro_batch=128", "collect.sampler_steps=4"]
    out = os.path.abspath(args.out)
    if "dmdx" in args.methods and "adp" not in args.methods:
        parser.error("dmdx starts from the adp runs' students: list adp too")

    shared = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {toy: pool.submit(cli, recipe_for(toy, "dmdx"), f"{out}/{toy}_teacher",
                                    ["stages=[teacher,collect]", *args.overrides]) for toy in args.toys}
        for toy, fut in futures.items():
            fut.result()
            shared[toy] = {"teacher": f"{out}/{toy}_teacher/teacher/teacher.safetensors",
                           "pairs": f"{out}/{toy}_teacher/ode_pairs"}
        jobs = {}
        variants = [("", [])] + [(v[0], v[1:]) for v in args.variant]
        # adp before dmdx: dmdx starts from the adp run's student
        order = sorted(args.methods, key=lambda m: (m == "dmdx", m != "adp"))
        pending = {}
        for name, extra in variants:
            for method in order:
                if name and method not in ("adp", "dmdx", "adm"):
                    continue
                if name and method == "adp" and not any(o.startswith("pretrain.") for o in extra):
                    continue   # the variant changes ADM only: its dmdx row starts from the plain adp run
                label = f"{method}-{name}" if name else method
                adp_label = f"adp-{name}" if name and any(o.startswith("pretrain.") for o in extra) else "adp"
                for toy in args.toys:
                    for seed in args.seeds:
                        run_dir = f"{out}/{toy}_{label}_seed{seed}"
                        overrides = method_overrides(method, args.scale, shared[toy], out, toy, seed, adp_label) \
                            + args.overrides + extra
                        if method == "dmdx":
                            pending[(toy, adp_label, seed)][1].result()
                        fut = pool.submit(cli, recipe_for(toy, method), run_dir, overrides)
                        jobs[(toy, label, seed)] = pending[(toy, label, seed)] = (run_dir, fut)
        labels = list(dict.fromkeys(label for _, label, _ in jobs))
        rows = []
        for (toy, method, seed), (run_dir, fut) in sorted(jobs.items(), key=lambda kv: (
                kv[0][0], labels.index(kv[0][1]), kv[0][2])):
            seconds = fut.result()
            m = json.load(open(f"{run_dir}/evaluate/metrics.json"))
            stage = "pretrain" if method.split("-")[0] in ("adp", "regression") else "distill"
            m["diagnostics"] = diagnostics_summary(run_dir, stage)
            rows.append((toy, method, seed, m, seconds))

    coverage = lambda m: m.get("classes_covered", m.get("modes_covered"))  # noqa: E731
    header = (f"{'toy':8} {'method':18} {'seed':>4} {'FD':>8} {'FD/teach':>8} {'covered':>7} {'prec':>5} "
              f"{'recall':>6} {'wall s':>7}  diagnostics (second half)")
    print(f"steps: pretrain {round(PRETRAIN_STEPS * args.scale)}, distill after pretrain "
          f"{round(DISTILL_STEPS * args.scale)}, distill alone {round((PRETRAIN_STEPS + DISTILL_STEPS) * args.scale)}")
    print(header)
    print("-" * len(header))
    for toy, method, seed, m, seconds in rows:
        s = m["student"]
        print(f"{toy:8} {method:18} {seed:>4} {s['fd']:8.3f} {m['fd_ratio_student_over_teacher']:8.2f} "
              f"{coverage(s):>7} {s['precision']:5.3f} {s['recall']:6.3f} {seconds:7.0f}  "
              + " ".join(f"{k} {v:.3f}" for k, v in m["diagnostics"].items()))
    print()
    print("teacher (multi-step sampler, same guidance):")
    for toy in args.toys:
        m = next(r[3] for r in rows if r[0] == toy)
        t = m["teacher"]
        print(f"  {toy:8} FD {t['fd']:.3f}  covered {coverage(t)}  precision {t['precision']:.3f}  recall "
              f"{t['recall']:.3f}  ({m['teacher_sampler_steps']} steps)")
    print()
    print("mean ± std over seeds:")
    for toy in args.toys:
        for method in labels:
            sel = [r[3]["student"] for r in rows if r[0] == toy and r[1] == method]

            def stat(key):
                values = [x[key] for x in sel]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):7.3f} ± {spread:5.3f}"
            print(f"  {toy:8} {method:18} FD {stat('fd')}  covered {statistics.mean(coverage(x) for x in sel):5.1f}"
                  f"  precision {stat('precision')}  recall {stat('recall')}")


if __name__ == "__main__":
    main()
