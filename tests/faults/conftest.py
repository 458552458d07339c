"""Shared runs for the fault tests: ONE finished smoke run (data parallel) and ONE finished ZeRO-3 distill-only
run, each copied per test and put into the state the fault leaves (a stage unfinished, a file damaged...)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, SMOKE

ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
ZERO3 = ["parallel.backend=zero3", "parallel.zero3_persistence_threshold=0"]


def trainer_command(run_dir, *extra):
    return [sys.executable, "-m", "trainer.main", SMOKE, f"run.dir={run_dir}", *extra]


def run_trainer(run_dir, *extra, env=ENV, timeout=300, expect=0):
    result = subprocess.run(trainer_command(run_dir, *extra), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    return result


def one_error_line(result) -> str:
    """The single line a refused command prints on stderr (warnings from libraries excluded)."""
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def unfinish(run_dir, stage: str) -> None:
    """The state of a run killed during `stage`: its final outputs and every later stage's outputs gone, its
    checkpoints kept."""
    later = {"pretrain": ["pretrain", "distill", "evaluate"], "distill": ["distill", "evaluate"]}[stage]
    for name in later:
        folder = os.path.join(run_dir, name)
        if name == stage:
            for f in ("student.safetensors", "generator.safetensors"):
                if os.path.exists(os.path.join(folder, f)):
                    os.remove(os.path.join(folder, f))
        else:
            shutil.rmtree(folder, ignore_errors=True)


def stage_weights(run_dir, stage="distill"):
    return {name: load_file(os.path.join(run_dir, stage, name)) for name in ("student.safetensors",
                                                                             "generator.safetensors")}


def assert_same_weights(a, b, stage="distill"):
    wa, wb = stage_weights(a, stage), stage_weights(b, stage)
    for name in wa:
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), f"{stage}/{name}:{key} differs"


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A finished smoke run (every stage, data parallel, one process)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_trainer(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def zero3_finished(tmp_path_factory, finished):
    """A finished ZeRO-3 distill-only smoke run (one process) on the shared run's teacher."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    run_trainer(run_dir, *ZERO3, *distill_only(finished))
    return run_dir


def distill_only(finished):
    return [f"teacher.pretrained={finished / 'teacher' / 'teacher.safetensors'}", "stages=[distill]"]
