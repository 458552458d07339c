"""Ulysses sequence parallelism on CogVideoX (parallel/sequence.py), with real processes on gloo, fp32.

- 2 processes per backend (FSDP2 over the merged dp_shard x sp axis; ZeRO-3 over the world with the SP group):
  the attention layer with SP = 2 against the stock processor on the whole sequence (output, input and parameter
  gradients); every transformer-block input is [B, ceil(S/P), D]; after one tiny-CogVideoX-5B ADM step with SP = 2
  every role's gradients (full tensors) and the losses of steps 1 and 2 equal SP = 1's within 1e-5.
  S = 27 video tokens, so the last chunk is padded.
- 4 processes: dp_shard = 2 x sp = 2 trains 3 steps through the real CLI and writes its checkpoint; the student
  exports, from the end of the stage and from that checkpoint, with the same weights.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT
from trainer.tiny_pipeline import save_tiny_pipeline

WORKER = os.path.join(ROOT, "tests", "distributed", "sequence_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence_parallel")
    return root, save_tiny_pipeline("cogvideox_5b_tiny", str(root / "pipeline"))


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def close(difference: float, scale: float) -> bool:
    """Within 1e-5 of the reference, relative to its largest entry where that exceeds 1."""
    return difference <= TOLERANCE * max(1.0, scale)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sequence_parallel_equals_one_rank_per_sample(pipeline, backend):
    root, folder = pipeline
    out = root / backend
    out.mkdir()
    extra = ["attention"] if backend == "fsdp2" else []     # the layer check does not depend on the backend
    torchrun(2, WORKER, backend, str(out), folder, *extra)
    result = json.loads((out / f"{backend}.json").read_text())
    if extra:
        attention = result["attention"]
        assert attention["local_rows"] == 14                  # ceil(27 / 2)
        assert close(attention["output"], attention["output_scale"]), attention
        for name, difference in attention["grads"].items():
            assert attention["grad_scale"][name] > 0 and close(difference, attention["grad_scale"][name]), name
    for rank_shapes in result["block_inputs_per_rank"]:       # teacher, fake score and generator, every call
        assert {tuple(s[1:]) for s in rank_shapes["sp1"]} == {(27, 32)}
        assert {tuple(s[1:]) for s in rank_shapes["sp2"]} == {(14, 32)}
    for step in ("0", "1"):
        for name, value in result["sp1"]["losses"][step].items():
            assert abs(result["sp2"]["losses"][step][name] - value) <= TOLERANCE * max(1.0, abs(value)), (step, name)
    reference = torch.load(out / f"{backend}_sp1_grads.pt")
    got = torch.load(out / f"{backend}_sp2_grads.pt")
    assert set(reference) == {"fake_score/fake_score", "discriminator/heads", "generator/generator"}
    for key, grads in reference.items():
        assert got[key].keys() == grads.keys()
        scale = max(g.abs().max().item() for g in grads.values())
        assert scale > 0, key
        worst = max((got[key][name] - g).abs().max().item() for name, g in grads.items())
        assert close(worst, scale), (key, worst, scale)


def test_four_ranks_dp2_by_sp2_train_and_checkpoint(pipeline):
    root, folder = pipeline
    run_dir = root / "run_dp2_sp2"
    result = torchrun(4, "-m", "trainer.main", os.path.join(ROOT, "recipes", "tiny", "cogvideox_5b_tiny.yaml"),
                      f"run.dir={run_dir}", f"teacher.pretrained={folder}", "family.height=48", "family.width=48",
                      "parallel.backend=fsdp2", "parallel.sp=2", "distill.train.steps=3")
    assert "[distill] wrote" in result.stdout
    checkpoints = run_dir / "distill" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000003"
    extra = json.loads((checkpoints / "step_0000003" / "extra.json").read_text())
    assert extra["step"] == 3 and extra["world_size"] == 4
    # the student consolidated from the dp_shard x sp mesh exports, and the checkpoint's EMA is the same
    from tests.distributed.test_families import same_denoiser
    from trainer.export import main as export_main
    assert export_main([str(run_dir), "--out", str(root / "export")]) == 0
    assert export_main([str(run_dir), "--out", str(root / "export_checkpoint"), "--checkpoint", "latest"]) == 0
    same_denoiser(root / "export", root / "export_checkpoint")
