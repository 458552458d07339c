"""No host synchronisation in the training step (docs/parallelism.md "Host syncs"): 3 non-logging ADM steps of the
tiny SDXL twin under FSDP2 and under ZeRO-3 dispatch no op that reads a tensor on the host, and a planted `.item()`
is seen. ZeRO-3 still skips a non-finite gradient with DeepSpeed's norm check moved onto the device."""
import json
import os
import subprocess
import sys

from tests.distributed.test_data_parallel import ENV
from tests.helpers import ROOT


def test_the_step_reads_nothing_on_the_host_under_fsdp2_and_zero3(tmp_path):
    out = tmp_path / "syncs.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "distributed", "host_sync_worker.py"),
                             str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(out.read_text())
    for backend in ("fsdp2", "zero3"):
        assert r[backend]["counts"] == {}, (backend, r[backend]["stacks"])
    # the counter sees a sync planted in the generator's forward: once per generator call (ADM: once per step)
    assert r["fsdp2_planted"]["counts"] == {"aten::_local_scalar_dense": 1}, r["fsdp2_planted"]
    skip = r["zero3_nonfinite_gradient"]
    assert skip["loss_finite"] and not skip["norm_finite"], skip
    assert skip["moved"] == 0.0 and skip["moved_next"] > 0.0, skip
