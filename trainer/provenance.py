"""Which code, recipe and machines produced a run and each of its checkpoints (docs/operations.md "Provenance").

Every attempt of `trainer.main` appends one JSON line to `<run.dir>/provenance.jsonl`; each checkpoint's extra state
carries the same record (checkpoints leave the run dir). The source hash is always there: cluster copies are often
rsynced without `.git`, so the commit alone cannot say which code ran.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FOLDERS = ("trainer", "parallel", "data", "slurm")
PACKAGES = ("torch", "diffusers", "transformers", "deepspeed", "mosaicml-streaming", "peft", "safetensors")
FILE = "provenance.jsonl"


def source_hash(root: str = ROOT) -> str:
    """sha256 over the project's Python sources and checked-in configs (paths and bytes, in sorted order)."""
    h = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for base, dirs, files in sorted(os.walk(os.path.join(root, folder))):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".json", ".sbatch", ".sh")):
                    path = os.path.join(base, name)
                    h.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def git_state(root: str = ROOT) -> dict:
    """{commit, dirty} when `root` is a git checkout with git installed, else {}."""
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def versions() -> dict[str, str | None]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def hostnames(world_size: int) -> list[str]:
    """Every rank's host name (an all-gather of Python objects: once per attempt, never in the step)."""
    name = socket.gethostname()
    if not dist.is_initialized() or world_size == 1:
        return [name]
    names = [None] * world_size
    dist.all_gather_object(names, name)
    return sorted(set(names))


def attempt_record(world_size: int, argv: list[str] | None = None) -> dict:
    """This attempt's provenance. Collective under a process group (host names): call on every rank."""
    record = {"start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": list(sys.argv if argv is None else argv), "world_size": world_size,
              "hostnames": hostnames(world_size), "source_sha256": source_hash(), **git_state(),
              "versions": versions()}
    return record


def append(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def last_provenance(run_dir: str) -> dict | None:
    """The last attempt's record of a run dir, or None."""
    path = os.path.join(run_dir, FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None
