"""Each full-size recipe's header states the planner's memory per GPU at its declared GPU count; this regenerates it
and fails when they drift apart. The model-state part (every role's parameter count on the meta device, the
backend's bytes per parameter) is regenerated here in seconds; the traced activation part costs 5-9 CPU minutes per
recipe and is regenerated with DMDX_TRACE_RECIPES=1 (benchmarks/recipe_memory.py --write rewrites the lines)."""
import os
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from recipe_memory import RECIPES, declared, header_line, plan  # noqa: E402

TRACE = os.environ.get("DMDX_TRACE_RECIPES") == "1"


@pytest.mark.parametrize("path", RECIPES)
def test_header_memory_line_matches_the_planner(path):
    recipe, world, match = declared(path)
    assert match, f"{path}: no '# memory per GPU' header line in the planner's format"
    header_world, states, activations, total, gpu = (int(match.group(1)), float(match.group(2)),
                                                     float(match.group(3)), float(match.group(4)),
                                                     float(match.group(5)))
    assert header_world == world, f"{path}: header plans {header_world} GPUs, launch declares {world}"
    assert gpu == recipe.parallel.gpu_memory_gib
    assert abs(states + activations - total) <= 0.011
    assert total <= gpu, f"{path}: the plan ({total} GiB) does not fit the declared {gpu} GiB GPUs"
    planned_states, planned_activations = plan(path, world, trace=TRACE)
    expected = header_line(world, planned_states, planned_activations if TRACE else activations, gpu,
                           "pretrain" in recipe.stages)
    assert match.group(0) == expected, f"{path}: header drifted from the planner:\n{match.group(0)}\n{expected}"
