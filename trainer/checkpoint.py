"""Atomic, verified checkpoints of a stage. What goes inside is the backend's business (`backend.save_state(dir)`:
every trainable role, optimizer, LR schedule, EMA, RNG state); counters and the data position go to `extra.json`.

Layout: <stage_dir>/checkpoints/step_0000120/{..backend files, extra.json, manifest.json} and
<stage_dir>/checkpoints/latest (text: the newest folder's name; a hint only).

Writing (collective): every rank writes into `tmp-step_...`; after a barrier the files are hashed (sha256, the
ranks sharing the files), rank 0 writes extra.json, then manifest.json (every file's size and hash) LAST, fsyncs,
renames the folder (atomic on POSIX) and moves `latest`. The last `keep_last` complete checkpoints are kept.

Resuming: the newest checkpoint whose manifest verifies (every file present, same size, same hash) is used; each
one skipped is named with the reason (truncated file, missing manifest, bad hash...). `latest` may point at a
missing or damaged folder: it is never the only source. Verifying reads the checkpoint once more (the ranks share
the files): at ~2 GB/s per rank that is seconds against the minutes of training between checkpoints.

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)`, DCP through parallel/safe_dcp.py, JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Callable

import torch.distributed as dist

from parallel.distributed import barrier
from trainer.exit_codes import EnvironmentFault, environment_cause

# Fault injection for the kill-during-write tests: "SECONDS:SUBSTRING" sleeps SECONDS between writing the temp folder
# and renaming it, for checkpoints whose final path contains SUBSTRING (e.g. "30:distill/checkpoints/step_0000020").
FAULT_SLEEP_ENV = "DMDX_FAULT_SLEEP_IN_CHECKPOINT_WRITE"
EXTRA, MANIFEST, POINTER = "extra.json", "manifest.json", "latest"
STEP_PREFIX, TMP_PREFIX = "step_", "tmp-"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under `folder`, relative, sorted (the same list on every rank)."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(out)


def _shared_hashes(folder: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file, the files dealt round-robin over the ranks (each reads 1/world of the bytes)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {n: file_sha256(os.path.join(folder, n)) for n in names[rank::world]}
    if world == 1:
        return mine
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)   # small dicts of hex strings between this run's own ranks
    return {k: v for part in gathered for k, v in part.items()}


def problems(folder: str, hashes: bool = True) -> list[str]:
    """Why `folder` is not a complete checkpoint (empty: it verifies). Collective when hashes=True and a process
    group is up (the ranks share the hashing); every rank returns the same list."""
    found: list[str] = []
    manifest_path = os.path.join(folder, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)["files"]
    except FileNotFoundError:
        found.append(f"no {MANIFEST} (the write did not finish)")
        manifest = {}
    except (ValueError, KeyError, TypeError) as e:
        found.append(f"{MANIFEST} unreadable ({type(e).__name__})")
        manifest = {}
    for name, entry in sorted(manifest.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            found.append(f"{name} missing")
        elif os.path.getsize(path) != entry["bytes"]:
            found.append(f"{name} is {os.path.getsize(path)} bytes, the manifest says {entry['bytes']}")
    if hashes and manifest:
        # every rank runs this (collective) even when sizes already failed, so that all ranks stay in step
        names = sorted(n for n in manifest if os.path.isfile(os.path.join(folder, n))
                       and os.path.getsize(os.path.join(folder, n)) == manifest[n]["bytes"])
        digests = _shared_hashes(folder, names)
        found += [f"{n} does not match its sha256" for n in names if digests[n] != manifest[n]["sha256"]]
    if manifest and not found:
        try:
            with open(os.path.join(folder, EXTRA)) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            found.append(f"{EXTRA} unreadable ({type(e).__name__})")
    return found


class Checkpointer:
    def __init__(self, stage_dir: str, keep_last: int, is_main: bool = True, log=None):
        self.root = os.path.join(stage_dir, "checkpoints")
        self.keep_last, self.is_main = keep_last, is_main
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def step_folders(self) -> list[str]:
        """Complete-looking checkpoint folders, newest first (temp folders never count)."""
        if not os.path.isdir(self.root):
            return []
        return sorted((d for d in os.listdir(self.root) if d.startswith(STEP_PREFIX)
                       and os.path.isdir(os.path.join(self.root, d))), reverse=True)

    def newest_verified(self) -> str | None:
        """The newest checkpoint that verifies (collective); each newer one skipped is named once, with why."""
        pointer = os.path.join(self.root, POINTER)
        hinted = open(pointer).read().strip() if os.path.isfile(pointer) else None
        for name in self.step_folders():
            found = problems(os.path.join(self.root, name))
            if not found:
                if hinted and hinted != name and self.is_main:
                    self.log(f"[checkpoint] {pointer} names {hinted}, which is not a complete checkpoint; "
                             f"resuming from {name}, the newest that verifies")
                return os.path.join(self.root, name)
            if self.is_main:
                self.log(f"[checkpoint] skipping {os.path.join(self.root, name)}: {'; '.join(found[:3])}"
                         f"{f' (and {len(found) - 3} more)' if len(found) > 3 else ''}")
        return None

    def has_checkpoint(self) -> bool:
        """Whether any checkpoint folder exists (cheap; no verification)."""
        return bool(self.step_folders())

    def save(self, step: int, write_state: Callable[[str], None], extra: dict) -> str:
        """Collective: every rank calls it; write_state(tmp_dir) writes the backend's files. A write the machine
        refuses (disk full, quota, permissions) removes the temp folder and raises EnvironmentFault: the previous
        checkpoints are untouched."""
        name = f"{STEP_PREFIX}{step:07d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"{TMP_PREFIX}{name}")
        try:
            if self.is_main:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            barrier()
            write_state(tmp)
            barrier()
            if self.is_main:
                _write_json(os.path.join(tmp, EXTRA), extra)
            barrier()
            names = _files(tmp)
            digests = _shared_hashes(tmp, names)
            if self.is_main:
                _write_json(os.path.join(tmp, MANIFEST), {"step": step, "files": {
                    n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": digests[n]} for n in names}})
                fault = os.environ.get(FAULT_SLEEP_ENV)
                if fault:
                    seconds, _, where = fault.partition(":")
                    if where in final:
                        time.sleep(float(seconds))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _fsync_dir(self.root)
                pointer_tmp = os.path.join(self.root, f"{POINTER}.tmp")
                with open(pointer_tmp, "w") as f:
                    f.write(name)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(pointer_tmp, os.path.join(self.root, POINTER))
                self._prune(keep=name)
        except Exception as e:
            cause = environment_cause(e)
            if cause is None:
                raise
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = [d for d in self.step_folders() if d != name]
            raise EnvironmentFault(f"{tmp}: writing the checkpoint of step {step} failed: {cause.strerror} "
                                   f"(errno {cause.errno}); the earlier checkpoints are intact "
                                   f"({kept[0] if kept else 'none yet'}) and a rerun resumes from the newest (hint: "
                                   f"free space or fix permissions under {self.root})") from None
        barrier()
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(self.step_folders())
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        for d in os.listdir(self.root):       # leftovers of an interrupted write
            if d.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    @staticmethod
    def load_extra(path: str) -> dict:
        with open(os.path.join(path, EXTRA)) as f:
            return json.load(f)


def checkpoint_folder(run_dir: str, stage: str, name: str) -> str:
    """`latest` (the newest checkpoint that verifies, above) or a step folder name (step_0000120),
    which must verify too: a temp folder or a damaged checkpoint is refused with one line."""
    checkpointer = Checkpointer(os.path.join(run_dir, stage), keep_last=1)
    root = checkpointer.root
    if name == "latest":
        folder = checkpointer.newest_verified()
        if folder is None:
            raise FileNotFoundError(f"{root}: no checkpoint that verifies (hint: the stage writes one every "
                                    f"train.checkpoint_every steps)")
        return folder
    folder = os.path.join(root, name)
    if not name.startswith(STEP_PREFIX) or os.sep in name or not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint (hint: --checkpoint latest, or one of "
                                f"{sorted(checkpointer.step_folders())})" if os.path.isdir(root)
                                else f"{root}: no checkpoints")
    found = problems(folder)
    if found:
        raise FileNotFoundError(f"{folder}: not a complete checkpoint: {'; '.join(found[:3])} (hint: --checkpoint "
                                f"latest takes the newest that verifies)")
    return folder
