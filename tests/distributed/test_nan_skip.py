"""A NaN loss skips the update on the device under FSDP2 and ZeRO-3 too (2 real processes, gloo): the fused AdamW
takes the guards' found_inf flag, so weights, moments and step counts stay; the next clean step updates again."""
import json
import os
import subprocess
import sys

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, random_teacher, tiny_recipe


def test_nan_loss_skips_the_update_under_fsdp2_and_zero3(tmp_path):
    teacher = random_teacher(tmp_path, tiny_recipe(tmp_path, "family.hidden=32"))
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             os.path.join(ROOT, "tests", "distributed", "nan_skip_worker.py"), teacher, str(out)],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for backend, r in json.loads(out.read_text()).items():
        assert r["flags"] == [0.0, 1.0, 0.0], backend
        assert set(r["skipped_moved"]) == {"generator", "fake_score", "heads"}, backend
        assert all(v == 0.0 for v in r["skipped_moved"].values()), (backend, r["skipped_moved"])
        assert all(v > 0.0 for v in r["next_moved"].values()), (backend, r["next_moved"])
        assert r["finite"], backend
