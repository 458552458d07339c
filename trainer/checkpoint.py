"""Atomic checkpoints of a stage. What goes inside is the backend's business (`backend.save_state(dir)`: every
trainable role, optimizer, LR schedule, EMA, RNG state); counters and the data position go to `extra.json`.

Layout: <stage_dir>/checkpoints/step_0000120/{extra.json, ...backend files} and <stage_dir>/checkpoints/latest
(text: the folder name). Every rank writes into `tmp-step_...`; after a barrier rank 0 writes extra.json last,
fsyncs, renames the folder (atomic on POSIX) and only then moves `latest` (temp file + os.replace). A crash at any
point leaves `latest` naming a complete checkpoint; the last `keep_last` are kept.
Loading never unpickles arbitrary objects: `torch.load(weights_only=True)`, DCP, JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

from parallel.distributed import barrier

# Fault injection for the kill-during-write test: "SECONDS:SUBSTRING" sleeps SECONDS between writing the temp folder
# and renaming it, for checkpoints whose final path contains SUBSTRING (e.g. "30:distill/checkpoints/step_0000020").
FAULT_SLEEP_ENV = "DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE"
EXTRA = "extra.json"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, stage_dir: str, keep_last: int, is_main: bool = True):
        self.root = os.path.join(stage_dir, "checkpoints")
        self.keep_last, self.is_main = keep_last, is_main

    def latest_path(self) -> str | None:
        pointer = os.path.join(self.root, "latest")
        if not os.path.isfile(pointer):
            return None
        path = os.path.join(self.root, open(pointer).read().strip())
        return path if os.path.isfile(os.path.join(path, EXTRA)) else None

    def save(self, step: int, write_state: Callable[[str], None], extra: dict) -> str:
        """Collective: every rank calls it; write_state(tmp_dir) writes the backend's files."""
        name = f"step_{step:07d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"tmp-{name}")
        if self.is_main:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        write_state(tmp)
        barrier()
        if self.is_main:
            with open(os.path.join(tmp, EXTRA), "w") as f:
                json.dump(extra, f)
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
        barrier()
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_"))
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        for d in os.listdir(self.root):       # leftovers of an interrupted write
            if d.startswith("tmp-"):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    @staticmethod
    def load_extra(path: str) -> dict:
        with open(os.path.join(path, EXTRA)) as f:
            return json.load(f)
