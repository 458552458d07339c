"""Faults 1, 3, 4, 12 (docs/operations.md "Checkpoints"): damaged or hostile checkpoints, and ZeRO-3 resharding."""
import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

from parallel.offline import checkpoint_weights
from parallel.safe_dcp import UnsafeCheckpoint
from tests.distributed.test_fsdp2 import launch, teacher  # noqa: F401  (teacher: the shared fixture)
from tests.faults.conftest import (ZERO3, assert_same_weights, copy_run, distill_only, one_error_line, run_trainer,
                                   unfinish)
from trainer.config import load_recipe
from trainer.families import build_family


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_in_manifest(checkpoint, name):
    """Keep the manifest consistent with a replaced file (an attacker would): only the safe reader stands between."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


def test_zero3_checkpoint_never_runs_a_pickle_payload(zero3_finished, finished, tmp_path):
    """(1) A payload where DeepSpeed's engine files used to be is never read; one in the DCP metadata is refused with
    one line, on resume and by the offline reader that export uses (raw and EMA); the payload never runs."""
    marker = tmp_path / "PWNED"
    run_dir = copy_run(zero3_finished, tmp_path / "run")
    unfinish(run_dir, "distill")
    newest = run_dir / "distill" / "checkpoints" / "step_0000040"
    engine_file = newest / "generator" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    engine_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Payload(marker), engine_file)   # what DeepSpeed's torch.load(weights_only=False) would run
    result = run_trainer(run_dir, *ZERO3, *distill_only(finished))
    assert "resumed at step 40" in result.stdout and not marker.exists()

    unfinish(run_dir, "distill")
    (newest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_in_manifest(newest, ".metadata")
    result = run_trainer(run_dir, *ZERO3, *distill_only(finished), expect=2)
    assert ".metadata" in one_error_line(result) and not marker.exists()
    recipe = load_recipe(str(run_dir / "config.yaml"))
    with torch.device("meta"):
        network = build_family(recipe).build_denoiser()
    for kind in ("raw", "ema"):
        with pytest.raises(UnsafeCheckpoint, match="posix.system"):
            checkpoint_weights(str(newest), network, "generator", kind)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate state", "empty extra"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(finished, tmp_path, damage):
    """(3) The newest checkpoint's state file truncated, or its extra.json emptied: the rerun names it, skips it,
    resumes from the previous one and ends with the uninterrupted run's weights."""
    run_dir = copy_run(finished, tmp_path / "run")
    unfinish(run_dir, "distill")
    newest = run_dir / "distill" / "checkpoints" / "step_0000040"
    if damage == "truncate state":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[: len(data) // 2])
    else:
        (newest / "extra.json").write_text("")
    result = run_trainer(run_dir)
    assert "skipping" in result.stderr and "step_0000040" in result.stderr, result.stderr[-2000:]
    assert "[distill:adm] resumed at step 30" in result.stdout
    assert_same_weights(finished, run_dir)


def test_latest_naming_a_missing_folder_resumes_from_the_newest_complete(finished, tmp_path):
    """(4) `latest` names a folder that is gone: the newest complete checkpoint is used, not step 0."""
    run_dir = copy_run(finished, tmp_path / "run")
    unfinish(run_dir, "distill")
    shutil.rmtree(run_dir / "distill" / "checkpoints" / "step_0000040")
    assert (run_dir / "distill" / "checkpoints" / "latest").read_text() == "step_0000040"
    result = run_trainer(run_dir)
    assert "[distill:adm] resumed at step 30" in result.stdout, result.stdout[-2000:]
    assert_same_weights(finished, run_dir)


def test_zero3_resumes_on_another_world_size(tmp_path, teacher):
    """(12) ZeRO-3: steps 0-1 on 2 ranks, checkpoint, resume on 1; and 1 -> 2. Step 2's losses are computed from
    the restored weights, Adam moments and data position before any update on the new world size, so they equal
    step 2 of the uninterrupted run on the FIRST world size within 1e-5. Not the other world size's run: its steps
    0-1 summed in another order, and ADM's heads gradient (the difference of two nearly equal terms) turned that
    1e-7 into lr-sized Adam steps (0.5% on the step-2 generator loss of 1 vs 2 uninterrupted ranks)."""
    overrides = " ".join(ZERO3)
    straight = {}
    for ranks in (1, 2):
        launch(ranks, "steps", teacher, str(tmp_path / f"straight{ranks}"), "3", str(tmp_path / f"s{ranks}.json"),
               overrides=overrides)
        straight[ranks] = json.loads((tmp_path / f"s{ranks}.json").read_text())
    for first, second in ((2, 1), (1, 2)):
        a = straight[first]
        run = tmp_path / f"{first}to{second}"
        launch(first, "steps", teacher, str(run), "2", str(tmp_path / "first.json"), overrides=overrides)
        launch(second, "steps", teacher, str(run), "3", str(tmp_path / "second.json"), overrides=overrides)
        b = json.loads((tmp_path / "second.json").read_text())
        assert sorted(b) == ["2"] and a["2"].keys() == b["2"].keys()
        for key, value in a["2"].items():
            assert b["2"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (first, second, key)
