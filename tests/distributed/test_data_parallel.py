"""Data parallel and FSDP2 under torchrun (2 real processes, gloo): the same run on 2 ranks equals 1 rank.

Every draw is keyed by the global sample index and the gradient all-reduce averages equal local batches, so the two
runs differ only by float summation order."""
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import ROOT, SMOKE

ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OVERRIDES = ["distill.method.name=dmd2", "distill.method.ttur=2", "distill.train.steps=20", "teacher.train.steps=30",
             "stages=[teacher,distill]"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    one = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, "-m", "trainer.main", SMOKE, f"run.dir={one}", *OVERRIDES], check=True,
                   env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    return one


@pytest.mark.parametrize("backend", ["data_parallel", "fsdp2", "zero3"])
def test_two_ranks_equal_one_rank(tmp_path, one_rank, backend):
    """Teacher stage and DMD2 distillation (generator, fake score, heads, real branch) on 2 ranks, plain data
    parallel or FSDP2-sharded, against one plain process."""
    one = one_rank
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             "-m", "trainer.main", SMOKE, f"run.dir={two}", *OVERRIDES,
                             f"parallel.backend={backend}"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, name in (("teacher", "teacher.safetensors"), ("distill", "student.safetensors"),
                        ("distill", "generator.safetensors")):
        a, b = load_file(str(one / stage / name)), load_file(str(two / stage / name))
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        reference = load_file(str(one / "teacher" / "teacher.safetensors")) if stage == "distill" else None
        print(f"{stage}/{name}: max |2 ranks - 1 rank| = {worst:.2e}")
        assert worst < 1e-5, f"{stage}/{name}: max abs diff {worst}"
        if name == "generator.safetensors":   # the comparison is not vacuous: training moved the weights
            moved = max((a[k] - reference[k]).abs().max().item() for k in a)
            assert moved > 100 * max(worst, 1e-8), moved


def test_batch_not_divisible_by_world_size_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             "-m", "trainer.main", SMOKE, f"run.dir={tmp_path}/run", "distill.train.batch_size=33"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "is not divisible by the 2 data-parallel ranks (world size 2" in result.stderr
    assert "Traceback" not in result.stderr.split("error:")[0][-200:]
