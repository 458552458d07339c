"""The SDXL tiny twin's DMDX stages (collect -> ADP with the VAE + SAM pixel discriminator -> ADM from ADP's
generator) with 2 real processes under FSDP2 and under ZeRO-3, through the real CLI: every role sharded, the pairs
collected on both ranks, the frozen pixel backbone partitioned like the teacher."""
import os
import subprocess
import sys

import pytest

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, saved_vision
from trainer.tiny_pipeline import save_tiny_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmdx_sdxl")
    return save_tiny_pipeline("sdxl_tiny", str(tmp / "sdxl")), saved_vision("sam", str(tmp / "sam")), tmp


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sdxl_tiny_dmdx_two_ranks(models, backend):
    pipeline, sam, tmp = models
    run_dir = tmp / f"run_{backend}"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.main",
            os.path.join(ROOT, "recipes/tiny/sdxl_dmdx_tiny.yaml"), f"run.dir={run_dir}",
            f"teacher.pretrained={pipeline}", f"family.pixel_backbone_pretrained={sam}", f"parallel.backend={backend}",
            "parallel.zero3_persistence_threshold=0"]
    result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for path in ("ode_pairs/index.json", "pretrain/student.safetensors", "distill/student.safetensors"):
        assert (run_dir / path).is_file(), path
    assert "[pretrain] wrote" in result.stdout and "[distill] wrote" in result.stdout
    check_flow_export(run_dir, tmp / f"export_{backend}")


def check_flow_export(run_dir, out):
    """The one-step RF-velocity student in the stock SDXL pipeline (UniPC, flow sigmas): the pipeline's one step is
    x0 = x_T - sigma v(x_T, t) with sigma = 1 - 1e-6 and t = 999, UniPC's integer timestep (the trainer samples at
    t = 1000; no stock scheduler of SDXL's pipeline reaches it, trainer/export.py). Checked exactly against that."""
    import torch
    from trainer.export import main as export_main
    from tests.distributed.test_families import stock_output
    from trainer.stages.students import load_student
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    recipe, family, _, generator = load_student(str(run_dir))
    labels = torch.tensor([1, 4])
    got = stock_output(str(out), family, labels, 5)
    noise = torch.randn(2, *family.data_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        velocity = generator(noise, torch.full((2,), 999.0), **family.condition(labels))
    expected = noise - (1 - 1e-6) * velocity
    assert (got - expected).abs().max().item() < 1e-4
