"""End to end on the smoke recipe through the real CLI: stages, outputs, sampling, SIGKILL and resume."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_data_parallel import free_port
from tests.helpers import ROOT, SMOKE

ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
# long enough to kill each stage mid-run; every run of this module uses them
KILL_STEPS = ["distill.train.steps=60", "pretrain.train.steps=40", "collect.micro_batch=16"]


def command(run_dir, *extra):
    return [sys.executable, "-m", "trainer.main", SMOKE, f"run.dir={run_dir}", *KILL_STEPS, *extra]


def run(run_dir, env=ENV, timeout=240):
    result = subprocess.run(command(run_dir), capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run(run_dir)
    return run_dir, result


def final_weights(run_dir):
    return {f"{stage}/{name}": load_file(os.path.join(run_dir, stage, name))
            for stage in ("pretrain", "distill") for name in ("student.safetensors", "generator.safetensors")}


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), f"{name}:{key} differs"


def test_smoke_outputs(reference):
    run_dir, result = reference
    for path in ("config.yaml", "teacher/teacher.safetensors", "teacher/pixel_backbone.safetensors",
                 "ode_pairs/index.json", "pretrain/student.safetensors", "pretrain/teacher_ref.json",
                 "distill/student.safetensors",
                 "distill/teacher_ref.json", "evaluate/metrics.json", "evaluate/student_samples.png"):
        assert (run_dir / path).is_file(), path
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for who in ("student", "teacher"):
        assert {"fd", "precision", "recall", "class_accuracy"} <= metrics[who].keys()
        assert np.isfinite(metrics[who]["fd"])
    assert "student FD" in result.stdout and str(run_dir) in result.stdout
    tb_files = [f for _, _, files in os.walk(run_dir / "distill" / "tb") for f in files if "tfevents" in f]
    assert tb_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "distill" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/fake_score", "loss/generator", "loss/discriminator", "grad_norm/generator",
                "grad_norm/heads", "lr/generator", "throughput/samples_per_second", "throughput/step_seconds",
                "metrics/logits_real", "metrics/logits_fake", "metrics/disc_accuracy", "samples/mean",
                "samples/saturated_fraction", "guards/skipped_updates", "progress/device_hours",
                "memory/peak_rss_gib", "time/generator_seconds"):
        assert tag in tags, tag
    assert {"histograms/discriminator/logits_real", "histograms/discriminator/logits_fake"} <= set(
        acc.Tags()["histograms"])
    assert "samples/grid" in acc.Tags()["images"]          # fixed-seed grids every distill.train.sample_every
    hours = [e.value for e in acc.Scalars("progress/device_hours")]
    assert hours == sorted(hours) and hours[-1] > 0


def test_rerun_of_finished_run_skips_every_stage(reference):
    run_dir, _ = reference
    before = (run_dir / "distill" / "student.safetensors").stat().st_mtime_ns
    result = run(run_dir)
    assert result.stdout.count("done already") == 5     # teacher, collect, pretrain, distill, evaluate
    assert (run_dir / "distill" / "student.safetensors").stat().st_mtime_ns == before


def test_sample_cli(reference, tmp_path):
    run_dir, _ = reference
    out = tmp_path / "s.npz"
    args = [sys.executable, "-m", "trainer.sample", str(run_dir), "--num", "12", "--out", str(out), "--seed", "3"]
    subprocess.run(args, check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=120)
    data = np.load(out)
    assert data["samples"].shape == (12, 64) and data["samples"].dtype == np.float32
    assert data["labels"].dtype == np.int64 and list(data["labels"][:3]) == [0, 1, 2]
    # same seed, same samples; another seed, other samples; --steps changes the sampler
    again = tmp_path / "t.npz"
    subprocess.run(args[:-4] + ["--out", str(again), "--seed", "3"], check=True, env=ENV, cwd=ROOT, timeout=120,
                   capture_output=True)
    assert np.array_equal(np.load(again)["samples"], data["samples"])
    bad = subprocess.run([sys.executable, "-m", "trainer.sample", str(tmp_path), "--num", "2", "--out", str(out)],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.02)
    raise TimeoutError


def run_and_kill_when(run_dir, predicate, env=ENV, extra=()) -> str:
    """Run the smoke command, SIGKILL it once `predicate()` holds; returns what it printed on stdout."""
    proc = subprocess.Popen(command(run_dir, *extra), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    wait_for(predicate, proc)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def checkpoint_at_least(run_dir, stage: str, step: int):
    latest = run_dir / stage / "checkpoints" / "latest"
    return lambda: latest.is_file() and latest.read_text() >= f"step_{step:07d}"


def test_sigkill_midway_then_rerun_equals_uninterrupted(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    run_and_kill_when(run_dir, checkpoint_at_least(run_dir, "distill", 20))
    assert not (run_dir / "distill" / "student.safetensors").exists()
    result = run(run_dir)
    resumed_at = re.search(r"\[distill:adm\] resumed at step (\d+)", result.stdout)
    assert resumed_at and 20 <= int(resumed_at.group(1)) < 60, result.stderr[-2000:]
    assert_same_weights(ref_dir, run_dir)


def test_sigkill_during_checkpoint_write_resumes_from_last_complete(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    env = dict(ENV, DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE="60:distill/checkpoints/step_0000020")
    partial = run_dir / "distill" / "checkpoints" / "tmp-step_0000020"
    run_and_kill_when(run_dir, lambda: (partial / "extra.json").is_file(), env)
    assert (run_dir / "distill" / "checkpoints" / "latest").read_text() == "step_0000010"
    result = run(run_dir)
    assert "[distill:adm] resumed at step 10" in result.stdout
    assert not partial.exists()        # the interrupted write was cleaned up
    assert_same_weights(ref_dir, run_dir)


def test_sigkill_in_teacher_collect_and_pretrain_resumes_that_stage(reference, tmp_path):
    """DMDX stage chaining: a kill in the teacher stage, then (on each rerun) a kill in the collect stage and in the
    pretrain stage; each rerun resumes the stage it interrupted, keeps the finished ones, and the end result equals
    an uninterrupted run. (Kills in the distill stage: the tests above.)"""
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    run_and_kill_when(run_dir, checkpoint_at_least(run_dir, "teacher", 20))
    assert not (run_dir / "teacher" / "teacher.safetensors").exists()

    pairs = run_dir / "ode_pairs"
    out = run_and_kill_when(run_dir, lambda: (pairs / "part_000001" / "index.json").is_file())
    resumed_teacher = re.search(r"\[teacher\] resumed at step (\d+)", out)
    assert resumed_teacher and 20 <= int(resumed_teacher.group(1)) < 60, out[-2000:]
    assert not (pairs / "index.json").exists()          # killed before the merge: the stage is unfinished

    out = run_and_kill_when(run_dir, checkpoint_at_least(run_dir, "pretrain", 10))
    resumed = re.search(r"\[collect\] resuming: (\d+) of 16 micro-batches already written", out)
    assert resumed and 2 <= int(resumed.group(1)) < 16, out[-2000:]
    assert "[teacher] done already" in out
    assert not (run_dir / "pretrain" / "student.safetensors").exists()

    result = run(run_dir)
    assert "[collect] done already" in result.stdout
    resumed_at = re.search(r"\[pretrain:adp\] resumed at step (\d+)", result.stdout)
    assert resumed_at and 10 <= int(resumed_at.group(1)) < 40, result.stdout[-2000:]
    assert_same_weights(ref_dir, run_dir)


def test_provenance_of_every_attempt_and_checkpoint(reference):
    """provenance.jsonl: one line per attempt with the source hash, the commit (this is a checkout), versions, argv
    and world size; each checkpoint's extra state carries the same record."""
    from trainer.provenance import source_hash
    run_dir, _ = reference
    lines = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert lines
    first = lines[0]
    assert first["source_sha256"] == source_hash()
    assert len(first["commit"]) == 40 and isinstance(first["dirty"], bool)
    assert first["world_size"] == 1 and first["hostnames"] and str(run_dir) in " ".join(first["argv"])
    assert first["versions"]["torch"] == torch.__version__ and first["versions"]["diffusers"]
    assert first["recipe"]["run"]["dir"] == str(run_dir)
    checkpoints = sorted((run_dir / "distill" / "checkpoints").glob("step_*"))
    extra = json.loads((checkpoints[-1] / "extra.json").read_text())
    assert extra["provenance"]["source_sha256"] == first["source_sha256"]
    assert extra["provenance"]["start_time"] in {line["start_time"] for line in lines}


def test_rerun_with_another_experiment_is_refused_at_start(reference):
    """Another method, method setting, learning rate or backend in an existing run dir: one line, exit 2, nothing written
    (config.yaml and provenance.jsonl unchanged)."""
    run_dir, _ = reference
    config, provenance = (run_dir / "config.yaml").read_text(), (run_dir / "provenance.jsonl").read_text()
    for change, key in (("distill.method.name=dmd", "distill.method.name"),
                        ("distill.method.guidance_scale=3.0", "distill.method.guidance_scale"),
                        ("distill.optimizer.generator.lr=2.0e-4", "distill.optimizer.generator.lr"),
                        ("parallel.backend=fsdp2", "parallel.backend")):
        result = subprocess.run(command(run_dir, change), capture_output=True, text=True, env=ENV, cwd=ROOT,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and key in lines[0], result.stderr[-2000:]
        assert "different recipe" in lines[0]
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "provenance.jsonl").read_text() == provenance


def test_fsdp2_resume_on_another_world_size_and_micro_batch(reference, tmp_path):
    """Killed mid-distill on 1 process (FSDP2, no accumulation), rerun on 2 ranks with micro-batches of 8: it
    continues from the last checkpoint's step (DCP reshards) and records both attempts."""
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    distill_only = [f"teacher.pretrained={ref_dir / 'teacher' / 'teacher.safetensors'}", "stages=[distill]",
                    "parallel.backend=fsdp2"]
    run_and_kill_when(run_dir, checkpoint_at_least(run_dir, "distill", 20), extra=distill_only)
    latest = int((run_dir / "distill" / "checkpoints" / "latest").read_text().removeprefix("step_"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.main", SMOKE, f"run.dir={run_dir}",
                *KILL_STEPS, *distill_only, "distill.train.micro_batch_size=8"]
    result = subprocess.run(torchrun, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[distill:adm] resumed at step {latest} " in result.stdout, result.stdout[-2000:]
    assert (run_dir / "distill" / "student.safetensors").is_file()
    attempts = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert [a["world_size"] for a in attempts] == [1, 2]
    assert [a["recipe"]["distill"]["train"]["micro_batch_size"] for a in attempts] == [None, 8]
