"""Submit a recipe to Slurm: `python -m slurm.submit RECIPE [--nodes N] [--gpus-per-node G] [--time T] [--dry-run]
[key=value ...]`.

Fills slurm/template.sbatch from the recipe's `launch:` section (the flags override it), writes the job script into
the run directory (`<run.dir>/slurm/job.sbatch`) and runs `sbatch` on it. Every value that reaches the shell goes
through shlex.quote; paths that sbatch itself reads (output file, working directory) go on sbatch's command line as
separate arguments, never through a shell. `--dry-run` prints the sbatch command and the script, and submits nothing.

The job runs `srun torchrun` (one task per node, c10d rendezvous on the allocation's first node) on
`python -m trainer.main RECIPE key=value ...`; rerunning the same command resumes, so a requeued job continues from
its last checkpoint. Output goes to `<run.dir>/slurm-<jobid>.out`, opened in append mode, so one file holds every
attempt of the job.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "slurm", "template.sbatch")
USAGE_EXIT = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, passed on to trainer.main")
    parser.add_argument("--nodes", type=int, help="launch.nodes")
    parser.add_argument("--gpus-per-node", type=int, help="launch.gpus_per_node (processes per node)")
    parser.add_argument("--time", help="launch.time, [D-]HH:MM:SS")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command and script; submit nothing")
    return parser.parse_intermixed_args(argv)


PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def fill(template: str, values: dict[str, str]) -> str:
    """One pass over the template: each placeholder is replaced by its value, and a value is never scanned again
    (a value holding "{{OVERRIDES}}" stays those literal characters, inside its quotes)."""
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise KeyError(f"{TEMPLATE}: placeholder {{{{{unknown[0]}}}}} has no value")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def job_script(recipe, recipe_path: str, overrides: list[str]) -> str:
    """The sbatch script for a resolved recipe (values quoted; see the module docstring)."""
    launch = recipe.launch
    extra = []
    if launch.device == "gpu":
        extra.append(f"#SBATCH --gres=gpu:{launch.gpus_per_node}")
    if launch.partition:
        extra.append(f"#SBATCH --partition={launch.partition}")
    if launch.account:
        extra.append(f"#SBATCH --account={launch.account}")
    # names are checked by the recipe schema (launch.env: letters, digits, _), values quoted
    env = "\n".join(f"export {name}={shlex.quote(value)}" for name, value in launch.env.items()) or \
        "# (launch.env is empty)"
    run_dir = os.path.abspath(recipe.run.dir)
    return fill(open(TEMPLATE).read(), {
        "JOB_NAME": launch.job_name, "NODES": str(launch.nodes), "CPUS_PER_TASK": str(launch.cpus_per_task),
        "TIME": launch.time, "SIGNAL_SECONDS": str(launch.signal_seconds), "EXTRA_SBATCH": "\n".join(extra),
        "ENV": env, "PREEMPT_FILE": shlex.quote(os.path.join(run_dir, ".preempt_request")),
        "PYTHON": shlex.quote(sys.executable), "GPUS_PER_NODE": str(launch.gpus_per_node),
        "RDZV_PORT": str(launch.rdzv_port), "MAX_RESTARTS": str(launch.max_restarts),
        "RECIPE": shlex.quote(os.path.abspath(recipe_path)),
        # run.dir resolved to an absolute path (the job's working directory is the repository)
        "OVERRIDES": " ".join(shlex.quote(o) for o in [f"run.dir={run_dir}",
                                                       *(o for o in overrides if not o.startswith("run.dir="))]),
    })


def sbatch_command(recipe, script_path: str) -> list[str]:
    run_dir = os.path.abspath(recipe.run.dir)
    return ["sbatch", "--parsable", f"--output={os.path.join(run_dir, 'slurm-%j.out')}", f"--chdir={ROOT}",
            *recipe.launch.sbatch_args, script_path]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, ROOT)
    from parallel.runtime_env import apply_runtime_defaults  # after sys.path: this file may be started by path
    from trainer.config import RecipeError, load_recipe  # (the same reason)
    apply_runtime_defaults()
    flags = [f"launch.{key}={value}" for key, value in (("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node),
                                                         ("time", args.time)) if value is not None]
    try:
        recipe = load_recipe(args.recipe, [*args.overrides, *flags])
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    script = job_script(recipe, args.recipe, args.overrides)
    run_dir = os.path.abspath(recipe.run.dir)
    script_path = os.path.join(run_dir, "slurm", "job.sbatch")
    command = sbatch_command(recipe, script_path)
    if args.dry_run:
        print(f"# {shlex.join(command)}")
        print(script, end="")
        return 0
    os.makedirs(os.path.dirname(script_path), exist_ok=True)
    with open(script_path + ".tmp", "w") as f:
        f.write(script)
    os.replace(script_path + ".tmp", script_path)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        print("error: sbatch not found (hint: run on a Slurm login node, or see slurm/README.md for a local Slurm)",
              file=sys.stderr)
        return 1
    if result.returncode:
        print(f"error: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {script_path}")
    print(f"  log:         {os.path.join(run_dir, f'slurm-{job_id}.out')}")
    print(f"  tensorboard: tensorboard --logdir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
