"""`python -m slurm.submit` on a real local Slurm: a recipe runs to completion; the same kind of job preempted with
`scancel --batch --signal=USR1` checkpoints, requeues itself, resumes where it stopped and completes, with both
attempts in one appended log. And the job script keeps hostile recipe strings as strings."""
import os
import re
import shlex
import subprocess
import sys
import time


from tests.helpers import ROOT, random_teacher, tiny_recipe

SMOKE = os.path.join(ROOT, "recipes", "tiny", "toy_smoke.yaml")
ENV = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
TERMINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def submit(*args, dry_run=False):
    cmd = [sys.executable, "-m", "slurm.submit", SMOKE, *args, *(["--dry-run"] if dry_run else [])]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(ENV, **os.environ), timeout=120)


def local_job(tmp_path, run_dir, *extra):
    """Overrides for a 2-process CPU job of the smoke recipe over a random teacher (no teacher stage)."""
    teacher = random_teacher(tmp_path, tiny_recipe(tmp_path, "family.hidden=32"))
    return [f"run.dir={run_dir}", f"teacher.pretrained={teacher}", "family.hidden=32", "stages=[distill]",
            "launch.device=cpu", "launch.gpus_per_node=2", "launch.cpus_per_task=2", "launch.time=00:10:00",
            "launch.env.GLOO_SOCKET_IFNAME=lo", "launch.max_restarts=0", *extra]


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_job(job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    return f"TIMEOUT after {timeout} s (last {job_field(job_id, 'JobState')})"


def test_dry_run_quotes_hostile_strings(tmp_path):
    sentinel = tmp_path / "x"
    sentinel.mkdir()
    hostile = f"{tmp_path}/run; rm -rf {sentinel}"
    result = submit(f"run.dir={hostile}", "launch.job_name=smoke", dry_run=True)
    assert result.returncode == 0, result.stderr
    script = result.stdout.split("\n", 1)[1]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    launch_line = re.search(r"^srun .*?&$", script.replace("\\\n", " "), re.M).group(0)
    argv = shlex.split(launch_line[:-1])
    assert f"run.dir={hostile}" in argv                       # one argument, semicolon and all
    assert not (tmp_path / "run").exists() and sentinel.is_dir()
    bad = submit("launch.job_name=a;b", dry_run=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "launch.job_name" in bad.stderr


def test_submit_runs_to_completion(slurm, tmp_path):
    sentinel = tmp_path / "x"
    sentinel.mkdir()
    run_dir = f"{tmp_path}/run; rm -rf {sentinel}"              # a hostile string, quoted all the way down
    result = submit(*local_job(tmp_path, run_dir, "distill.train.steps=20"))
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    state = wait_job(job_id, 300)
    log = open(os.path.join(run_dir, f"slurm-{job_id}.out")).read()
    assert state == "COMPLETED", log[-3000:]
    assert sentinel.is_dir()
    assert os.path.isfile(os.path.join(run_dir, "distill", "student.safetensors"))
    assert "[dmdx] trainer exited with 0" in log


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    result = submit(*local_job(tmp_path, run_dir, "distill.train.steps=400", "distill.train.log_every=10",
                               "distill.train.checkpoint_every=1000"))
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    log_path = run_dir / f"slurm-{job_id}.out"
    deadline = time.time() + 180
    while time.time() < deadline and not list(run_dir.glob("distill/tb/*tfevents*")):
        time.sleep(0.5)
    time.sleep(3)                                             # a few logging windows into the stage
    assert job_field(job_id, "JobState") == "RUNNING", log_path.read_text()[-3000:]
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    state = wait_job(job_id, 420)
    log = log_path.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert job_field(job_id, "Restarts") == "1"
    assert "attempt 0" in log and "attempt 1" in log          # both attempts, appended to one file
    preempted = re.search(r"preempted at step (\d+) \((\d+) samples seen\)", log)
    assert preempted, log[-4000:]
    step, seen = preempted.groups()
    assert 0 < int(step) < 400
    assert f"resumed at step {step} ({seen} samples seen)" in log
    assert "requeueing job" in log
    assert os.path.isfile(run_dir / "distill" / "student.safetensors")
