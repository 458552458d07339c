"""Fault campaign (outside CI): kill a 2-rank distill-only smoke run at random times, rerun it, and check that
every rerun completes with the weights of an uninterrupted run.

    python -m tests.faults.campaign --trials 10 --backend fsdp2 [--faults kill_one,kill_all,kill_in_write,sigterm]

Faults, each at a random time in the distill stage:
  kill_one       SIGKILL to one worker (torchrun then tears the group down)
  kill_all       SIGKILL to torchrun and every worker (a lost node, `kill -9`)
  kill_in_write  SIGKILL to everything while a checkpoint is being written (held open by the fault-sleep hook)
  sigterm        SIGTERM to torchrun and every worker (Slurm's time limit, `scancel`): checkpoint, then exit
Per fault it prints: trials, fault landed (the process was still there to signal), completed (the rerun exited 0), equal (final EMA and raw weights bit-equal to the
uninterrupted run's), max steps redone (steps reached before the fault, from the progress line, minus the step the
rerun resumed at). Progress goes to stderr, one plain line per trial; about 25-40 s per trial on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil   # a deepspeed dependency: always installed with requirements.txt
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "recipes", "tiny", "toy_smoke.yaml")
ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
FAULTS = ("kill_one", "kill_all", "kill_in_write", "sigterm")
STEPS, EVERY = 120, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir: str, teacher: str, backend: str) -> list[str]:
    extra = ["parallel.zero3_persistence_threshold=0"] if backend == "zero3" else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", "-m", "trainer.main", SMOKE,
            f"run.dir={run_dir}", f"teacher.pretrained={teacher}", "stages=[distill]", f"parallel.backend={backend}",
            f"distill.train.steps={STEPS}", f"distill.train.checkpoint_every={EVERY}", "distill.train.log_every=1000",
            *extra]


def weights(run_dir: str) -> dict:
    return {name: load_file(os.path.join(run_dir, "distill", name))
            for name in ("student.safetensors", "generator.safetensors")}


def equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def last_progress(text: str) -> int:
    """The last step the progress bar showed (tqdm's `N/total` on stderr), 0 if none."""
    found = re.findall(rf"(\d+)/{STEPS} \[", text)
    return int(found[-1]) if found else 0


def wait_for(predicate, proc, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def trial(fault: str, run_dir: str, teacher: str, backend: str, rng: random.Random) -> dict:
    env = dict(ENV)
    write_step, tmp = None, ""
    if fault == "kill_in_write":
        write_step = rng.randrange(EVERY, STEPS, EVERY)
        env["DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE"] = f"30:distill/checkpoints/step_{write_step:07d}"
    log_path = os.path.join(os.path.dirname(run_dir), "attempt0.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(run_dir, teacher, backend), env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        started = wait_for(lambda: os.path.isdir(os.path.join(run_dir, "distill", "tb")), proc)
        if started and fault == "kill_in_write":
            tmp = os.path.join(run_dir, "distill", "checkpoints", f"tmp-step_{write_step:07d}", "manifest.json")
            started = wait_for(lambda: os.path.isfile(tmp), proc)
        elif started:
            time.sleep(rng.uniform(0.0, 4.0))
        workers, agent = [], None
        try:   # a process may be gone (or a zombie) already: the run can end before the fault lands
            agent = psutil.Process(proc.pid)
            workers = [p for p in agent.children(recursive=True) if "trainer.main" in " ".join(p.cmdline())]
        except psutil.Error:
            pass
        if fault == "kill_one":
            targets = [rng.choice(workers)] if workers else []
        else:
            targets = [*workers, agent] if agent is not None else workers
        how = signal.SIGTERM if fault == "sigterm" else signal.SIGKILL
        applied = False
        for p in targets:
            try:
                p.send_signal(how)
                applied = True
            except psutil.Error:
                pass
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait()
    reached = last_progress(open(log_path, errors="replace").read())
    stopped = re.search(r"stopped at step (\d+)", open(log_path, errors="replace").read())
    if stopped:
        reached = max(reached, int(stopped.group(1)))
    if write_step is not None and os.path.isdir(os.path.dirname(tmp)):
        reached = max(reached, write_step)   # killed inside that step's checkpoint write
    rerun = subprocess.run(command(run_dir, teacher, backend), env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    resumed = re.search(r"resumed at step (\d+)", rerun.stdout)
    resumed_at = int(resumed.group(1)) if resumed else 0
    return {"completed": rerun.returncode == 0, "rerun_tail": rerun.stderr[-800:],
            "redone": max(0, reached - resumed_at), "reached": reached, "resumed_at": resumed_at,
            "first_exit": proc.returncode, "applied": applied}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per fault")
    parser.add_argument("--backend", choices=("fsdp2", "zero3"), default="fsdp2")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = parser.parse_args(argv)
    faults = args.faults.split(",")
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        print(f"error: --faults: unknown {unknown} (hint: pick from {', '.join(FAULTS)})", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix=f"dmdx-campaign-{args.backend}-")
    print(f"[campaign] work folder {work}", file=sys.stderr, flush=True)
    teacher_run = os.path.join(work, "teacher")
    subprocess.run([sys.executable, "-m", "trainer.main", SMOKE, f"run.dir={teacher_run}", "stages=[teacher]"],
                   env=ENV, cwd=ROOT, check=True, capture_output=True)
    teacher = os.path.join(teacher_run, "teacher", "teacher.safetensors")
    reference_dir = os.path.join(work, "reference", "run")
    os.makedirs(os.path.dirname(reference_dir))
    started = time.time()
    subprocess.run(command(reference_dir, teacher, args.backend), env=ENV, cwd=ROOT, check=True, capture_output=True)
    print(f"[campaign] uninterrupted reference run: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    reference = weights(reference_dir)
    rows = []
    for fault in faults:
        outcomes = []
        for i in range(args.trials):
            run_dir = os.path.join(work, f"{fault}-{i}", "run")
            os.makedirs(os.path.dirname(run_dir))
            t0 = time.time()
            outcome = trial(fault, run_dir, teacher, args.backend, rng)
            outcome["equal"] = outcome["completed"] and equal(reference, weights(run_dir))
            outcomes.append(outcome)
            print(f"[campaign] {args.backend} {fault} trial {i + 1}/{args.trials}: first attempt exit "
                  f"{outcome['first_exit']}, reached step {outcome['reached']}, resumed at {outcome['resumed_at']}, "
                  f"completed {outcome['completed']}, equal {outcome['equal']} ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            if not outcome["completed"]:
                print(f"[campaign]   rerun stderr: {outcome['rerun_tail']}", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(os.path.dirname(run_dir), ignore_errors=True)
        rows.append((fault, len(outcomes), sum(o["applied"] for o in outcomes), sum(o["completed"] for o in outcomes),
                     sum(o["equal"] for o in outcomes), max(o["redone"] for o in outcomes)))
    print("\n| backend | fault | trials | fault landed | completed | final weights equal | max steps redone |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fault, trials, landed, completed, same, redone in rows:
        print(f"| {args.backend} | {fault} | {trials} | {landed} | {completed} | {same} | {redone} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[3] == r[1] and r[4] == r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
