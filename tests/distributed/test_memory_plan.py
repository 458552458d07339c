"""The memory planner against a measured step: the tiny SDXL twin, ADM, 2 ranks.

Predicted: `plan_memory` (roles on the meta device, one step traced under fake tensors on a fake 2-rank process
group). Measured: two real processes (gloo) running two real steps, rank 0's peak of live tensor bytes."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT

RECIPE = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
OVERRIDES = ["teacher.pretrained=stabilityai/sdxl-planning-only", "parallel.zero3_persistence_threshold=0"]
LIMIT = 0.10   # both backends

PREDICT = """
import json, sys
from parallel.runtime_env import apply_runtime_defaults
apply_runtime_defaults()
from trainer.memory_plan import plan_memory
from trainer.config import load_recipe
out = {}
for backend in ("fsdp2", "zero3"):
    recipe = load_recipe(sys.argv[1], sys.argv[3:] + [f"parallel.backend={backend}"])
    plan = plan_memory(recipe, 2)
    print(plan.format())
    out[backend] = plan.total
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    result = subprocess.run([sys.executable, "-c", PREDICT, RECIPE, str(out), *OVERRIDES], env=ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_plan_matches_a_measured_two_rank_step(tmp_path, predicted, backend):
    out = tmp_path / "measured.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                             "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             os.path.join(ROOT, "tests", "distributed", "memory_worker.py"), RECIPE, str(out),
                             *OVERRIDES, f"parallel.backend={backend}"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())["Total"]
    error = predicted[backend] / measured - 1
    print(f"{backend}: predicted {predicted[backend] / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
          f"({error:+.1%})")
    assert abs(error) <= LIMIT
