"""The embedded default, exactly as `make default` runs it (only the run dir differs): at most 10 minutes on 2 CPU
cores, and a one-step student whose FD is no worse than 2x the teacher's own multi-step FD at the same guidance."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.full_default


def test_full_default(tmp_path):
    run_dir = tmp_path / "default"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.main", "recipes/toy/default.yaml", f"run.dir={run_dir}"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=900)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    print(f"\nfull default: {wall:.0f} s; student {metrics['student']}; teacher {metrics['teacher']}")
    assert wall <= 600
    assert metrics["student"]["fd"] <= 2 * metrics["teacher"]["fd"]
    assert metrics["student"]["classes_covered"] == 10
