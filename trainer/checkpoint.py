"""Atomic checkpoints of a stage: every trainable role, optimizer, LR schedule, EMA, RNG state and counter.

Layout: <stage_dir>/checkpoints/step_000120/state.pt and <stage_dir>/checkpoints/latest (text: the folder name).
A checkpoint is written into `tmp-step_...`, flushed to disk, renamed (atomic on POSIX), and only then does `latest`
move (written to a temp file and os.replace'd). A crash at any point leaves `latest` naming a complete checkpoint.
Loading uses `torch.load(weights_only=True)`: state dicts, ints, floats and strings only, never arbitrary pickles.
Frozen roles are not copied: the stage records the teacher's path and hash in its config.
"""
from __future__ import annotations

import os
import shutil
import time

import torch

# Fault injection for the kill-during-write test: "SECONDS:SUBSTRING" sleeps SECONDS between writing the temp folder
# and renaming it, for checkpoints whose final path contains SUBSTRING (e.g. "30:distill/checkpoints/step_0000020").
FAULT_SLEEP_ENV = "DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, stage_dir: str, keep_last: int):
        self.root = os.path.join(stage_dir, "checkpoints")
        self.keep_last = keep_last

    def latest_path(self) -> str | None:
        pointer = os.path.join(self.root, "latest")
        if not os.path.isfile(pointer):
            return None
        name = open(pointer).read().strip()
        path = os.path.join(self.root, name)
        return path if os.path.isfile(os.path.join(path, "state.pt")) else None

    def save(self, step: int, state: dict) -> str:
        os.makedirs(self.root, exist_ok=True)
        name = f"step_{step:07d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "state.pt"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fault = os.environ.get(FAULT_SLEEP_ENV)
        if fault:
            seconds, _, where = fault.partition(":")
            if where in final:
                time.sleep(float(seconds))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        pointer_tmp = os.path.join(self.root, "latest.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(self.root, "latest"))
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_"))
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        for d in os.listdir(self.root):       # leftovers of an interrupted write
            if d.startswith("tmp-"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    def load(self, path: str) -> dict:
        return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
