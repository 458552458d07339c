"""Faults 5, 6, 11 (docs/operations.md): one trainer per run dir, SIGTERM loses no work, a stage is complete only
when all its outputs are."""
import json
import re
import signal
import socket
import subprocess
import time

from tests.faults.conftest import (ENV, ROOT, assert_same_weights, copy_run, one_error_line, run_trainer,
                                   trainer_command)


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited with {proc.returncode} before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_second_trainer_on_a_run_dir_is_refused_and_the_first_finishes(finished, tmp_path):
    """(5) While a trainer runs (held for 10 s inside a checkpoint write), a second one on the same run dir exits 3
    with one line naming the holder; the first finishes with the weights of an undisturbed run."""
    run_dir = tmp_path / "run"
    env = dict(ENV, DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE="10:distill/checkpoints/step_0000020")
    first = subprocess.Popen(trainer_command(run_dir), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "distill" / "checkpoints" / "tmp-step_0000020" / "extra.json").is_file(), first)
    second = run_trainer(run_dir, expect=3)
    line = one_error_line(second)
    assert "another trainer holds this run dir" in line and f"pid {first.pid}" in line, line
    assert f"host {socket.gethostname()}" in line
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert_same_weights(finished, run_dir)


def test_stale_lease_is_taken_over_and_a_live_one_refused(finished, tmp_path):
    """A holder file left by a trainer on another node that stopped heartbeating long ago is taken over with a line
    saying so; one with a fresh heartbeat is refused (exit 3, one line naming host and pid)."""
    run_dir = copy_run(finished, tmp_path / "run")
    holder = run_dir / ".lock.holder"
    now = time.time()
    holder.write_text(json.dumps({"host": "node-that-died", "pid": 4242, "since": now - 7200,
                                  "heartbeat": now - 3600, "job": "slurm:1"}))
    result = run_trainer(run_dir)
    assert re.search(r"taking over .* node-that-died, pid 4242.*lease expired", result.stdout), result.stdout[-2000:]
    assert not holder.exists()   # released at exit
    holder.write_text(json.dumps({"host": "node-7", "pid": 99, "since": now, "heartbeat": time.time(),
                                  "job": "slurm:2"}))
    line = one_error_line(run_trainer(run_dir, expect=3))
    assert "another trainer holds this run dir (host node-7, pid 99" in line, line


def test_sigterm_checkpoints_at_the_next_step_and_exits(tmp_path):
    """(6) SIGTERM mid-distill with log_every and checkpoint_every beyond the stage's length: the trainer writes a
    checkpoint at the next step boundary and exits 143; the rerun resumes at exactly that step (no step redone)
    and ends with the weights of an uninterrupted run."""
    overrides = ["distill.train.steps=150", "distill.train.log_every=1000", "distill.train.checkpoint_every=1000"]
    reference = tmp_path / "reference"
    run_trainer(reference, *overrides)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(trainer_command(run_dir, *overrides), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "distill" / "tb").is_dir(), proc)
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = re.search(r"\[distill:adm\] stopped at step (\d+) \(\d+ samples seen\) on SIGTERM", out)
    assert stopped, out[-2000:]
    step = int(stopped.group(1))
    assert 0 < step < 150 and (run_dir / "distill" / "checkpoints" / f"step_{step:07d}").is_dir()
    assert time.time() - sent < 60
    result = run_trainer(run_dir, *overrides)
    assert f"[distill:adm] resumed at step {step} " in result.stdout
    assert_same_weights(reference, run_dir)


def test_evaluate_interrupted_after_its_metrics_reruns(finished, tmp_path):
    """(11) The state a kill right after evaluate/metrics.json leaves (no PNGs, no tensorboard, no completion
    marker): the rerun evaluates again and writes every output."""
    run_dir = copy_run(finished, tmp_path / "run")
    evaluate = run_dir / "evaluate"
    for name in ("student_samples.png", "teacher_samples.png", "complete.json"):
        (evaluate / name).unlink(missing_ok=True)
    for event in (evaluate / "tb").glob("*"):
        event.unlink()
    result = run_trainer(run_dir)
    assert "[evaluate] done already" not in result.stdout
    assert (evaluate / "student_samples.png").is_file() and (evaluate / "teacher_samples.png").is_file()
    assert list((evaluate / "tb").glob("*tfevents*")) and (evaluate / "complete.json").is_file()
