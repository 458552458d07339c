"""The SDXL tiny twin's DMDX stages (collect -> ADP with the VAE + SAM pixel discriminator -> ADM from ADP's
generator) with 2 real processes under FSDP2 and under ZeRO-3, through the real CLI: every role sharded, the pairs
collected on both ranks, the frozen pixel backbone partitioned like the teacher."""
import os
import subprocess
import sys

import pytest

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, saved_vision, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmdx_sdxl")
    return tiny_sdxl_pipeline(str(tmp / "sdxl")), saved_vision("sam", str(tmp / "sam")), tmp


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sdxl_tiny_dmdx_two_ranks(models, backend):
    pipeline, sam, tmp = models
    run_dir = tmp / f"run_{backend}"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.main",
            os.path.join(ROOT, "recipes/tiny/sdxl_tiny.yaml"), f"run.dir={run_dir}", f"teacher.pretrained={pipeline}",
            f"family.pixel_backbone_pretrained={sam}", f"parallel.backend={backend}",
            "parallel.zero3_persistence_threshold=0", "stages=[collect,pretrain,distill]", "collect.num_pairs=8",
            "collect.micro_batch=4", "collect.sampler_steps=2", "pretrain.train.steps=3", "pretrain.train.batch_size=4",
            "pretrain.train.checkpoint_every=3", "pretrain.train.log_every=1", "distill.train.steps=3",
            "distill.generator.prediction=flow", "distill.generator.conditioning_timestep=null"]
    result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for path in ("ode_pairs/index.json", "pretrain/student.safetensors", "distill/student.safetensors"):
        assert (run_dir / path).is_file(), path
    assert "[pretrain] wrote" in result.stdout and "[distill] wrote" in result.stdout
