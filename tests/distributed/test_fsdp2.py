"""FSDP2 on 2 real processes (gloo): sharded bytes, sharded EMA without collectives, checkpoints that reshard."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, random_teacher, tiny_recipe

WORKER = os.path.join(ROOT, "tests", "distributed", "fsdp_worker.py")


def launch(nproc, *args, overrides=""):
    if nproc == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", WORKER, *args]
    result = subprocess.run(cmd, env=dict(ENV, DMDX_TEST_OVERRIDES=overrides), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return random_teacher(tmp, tiny_recipe(tmp, "family.hidden=32"))


def test_sharded_bytes_and_sharded_ema(tmp_path, teacher):
    out = tmp_path / "checks.json"
    launch(2, "checks", teacher, str(tmp_path / "run"), str(out))
    r = json.loads(out.read_text())
    for role, local in r["local_param_bytes"].items():
        half = r["full_param_bytes"][role] / 2
        assert abs(local - half) <= 0.05 * half, (role, local, half)
    assert r["ema_collectives"] == 0                 # updated on local shards
    assert r["ema_max_abs_diff"] < 1e-6              # == an unsharded EMA of the full generator after 5 steps
    assert r["ema_moved"] > 1e-4                     # and it is not trivially equal to the generator


ZERO3 = "parallel.backend=zero3 parallel.zero3_persistence_threshold=0"


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoint_reshards_and_next_steps_match(tmp_path, teacher, first, second):
    """Steps 0-1 on `first` ranks, checkpoint, resume on `second` ranks: the next step's losses (step 2, computed
    from the restored weights) equal the uninterrupted run's. Later steps are not compared: their updates run on
    another world size, and Adam's first steps amplify float summation-order differences in tiny gradients.
    (ZeRO-3's own: tests/faults/test_checkpoints.py.)"""
    straight = tmp_path / "straight.json"
    launch(first, "steps", teacher, str(tmp_path / "a"), "4", str(straight))
    launch(first, "steps", teacher, str(tmp_path / "b"), "2", str(tmp_path / "b1.json"))
    launch(second, "steps", teacher, str(tmp_path / "b"), "4", str(tmp_path / "b2.json"))
    a, b = json.loads(straight.read_text()), json.loads((tmp_path / "b2.json").read_text())
    assert sorted(b) == ["2", "3"]
    assert a["2"].keys() == b["2"].keys()
    for key, value in a["2"].items():
        assert b["2"][key] == pytest.approx(value, rel=1e-5), key


def test_hsdp_two_replicas_of_two_shards(tmp_path, teacher):
    """4 processes, dp_replicate = 2 x dp_shard = 2: 3 DMD2 steps, a checkpoint, and the same losses as 1 process."""
    launch(4, "steps", teacher, str(tmp_path / "hsdp"), "3", str(tmp_path / "hsdp.json"), "dmd2", "2")
    launch(1, "steps", teacher, str(tmp_path / "one"), "3", str(tmp_path / "one.json"), "dmd2")
    hsdp, one = json.loads((tmp_path / "hsdp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert (tmp_path / "hsdp" / "distill" / "checkpoints" / "latest").read_text() == "step_0000003"
    for key, value in one["0"].items():
        assert hsdp["0"][key] == pytest.approx(value, rel=1e-5), key


def test_activation_checkpointing_and_bf16_run_on_two_ranks(tmp_path, teacher):
    """Activation checkpointing recomputes the same numbers (losses equal to the run without it); bf16 mixed
    precision with roles frozen between phases trains (docs/testing.md pitfall 4 handled by the warm-up)."""
    plain, ac, bf16 = (tmp_path / f"{n}.json" for n in ("plain", "ac", "bf16"))
    launch(2, "steps", teacher, str(tmp_path / "plain"), "2", str(plain))
    launch(2, "steps", teacher, str(tmp_path / "ac"), "2", str(ac),
           overrides="parallel.activation_checkpointing=[generator,teacher,fake_score]")
    launch(2, "steps", teacher, str(tmp_path / "bf16"), "2", str(bf16), overrides="parallel.mixed_precision=bf16")
    a, b, c = (json.loads(p.read_text()) for p in (plain, ac, bf16))
    for step in ("0", "1"):
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6), (step, key)
            assert c[step][key] == pytest.approx(value, rel=0.1, abs=0.05), (step, key)   # bf16: close, not equal


def test_zero3_checkpoint_resumes_on_the_same_world_size(tmp_path, teacher):
    """ZeRO-3 (per-parameter DCP: fp32 masters, Adam moments and step, EMA): steps 0-1, checkpoint, resume on 2
    ranks; steps 2-3 equal the uninterrupted run's (so the optimizer state came back whole). bf16 runs."""
    zero3 = ZERO3
    launch(2, "steps", teacher, str(tmp_path / "a"), "4", str(tmp_path / "a.json"), overrides=zero3)
    launch(2, "steps", teacher, str(tmp_path / "b"), "2", str(tmp_path / "b1.json"), overrides=zero3)
    launch(2, "steps", teacher, str(tmp_path / "b"), "4", str(tmp_path / "b2.json"), overrides=zero3)
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b2.json").read_text())
    assert sorted(b) == ["2", "3"]
    for step in ("2", "3"):
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5), (step, key)
    # bf16 mixed precision (partitions held in bf16, fp32 master, autocast forwards): close to fp32, not equal
    launch(2, "steps", teacher, str(tmp_path / "bf16"), "2", str(tmp_path / "bf16.json"),
           overrides=zero3 + " parallel.mixed_precision=bf16")
    c = json.loads((tmp_path / "bf16.json").read_text())
    for step in ("0", "1"):
        for key, value in a[step].items():
            assert c[step][key] == pytest.approx(value, rel=0.1, abs=0.05), (step, key)
