"""Reading pretrained weights a slice at a time, so that no rank ever materialises every full role.

A `StateSource` opens safetensors lazily (memory-mapped): `full(name)` reads one tensor, `rows(name, start, stop)`
reads rows of dim 0 only (FSDP2's Shard(0) shards), `flat_range(name, start, stop)` a contiguous range of the
flattened tensor (ZeRO-3 partitions). Bytes outside the requested range are never touched, so a rank's resident
memory grows by its shard, not by the file.

Sources: a `.safetensors` file (the toy teacher), a diffusers model folder (`diffusion_pytorch_model.safetensors`, or
the sharded `*.safetensors.index.json` layout), a pipeline folder with a `subfolder`, or a hub id (resolved through
the local Hugging Face cache: runs never download; `HF_HUB_OFFLINE=1` in tests).
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open

WEIGHTS = "diffusion_pytorch_model.safetensors"


def resolve_model_dir(path_or_id: str, subfolder: str | None = None) -> str:
    """A local folder holding a diffusers model (config.json + safetensors); hub ids come from the local cache."""
    if os.path.isdir(path_or_id):
        root = path_or_id
    else:
        from huggingface_hub import snapshot_download
        root = snapshot_download(path_or_id, local_files_only=True,
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    if subfolder and os.path.isdir(os.path.join(root, subfolder)):
        return os.path.join(root, subfolder)
    return root


class StateSource:
    """Lazy, sliceable access to a state dict stored as safetensors. Use as a context manager."""

    def __init__(self, path: str, subfolder: str | None = None):
        if os.path.isfile(path):
            files = {None: path}
            index = None
        else:
            folder = resolve_model_dir(path, subfolder)
            index_path = os.path.join(folder, WEIGHTS + ".index.json")
            if os.path.isfile(index_path):
                with open(index_path) as f:
                    index = json.load(f)["weight_map"]
                files = {name: os.path.join(folder, name) for name in set(index.values())}
            elif os.path.isfile(os.path.join(folder, WEIGHTS)):
                files, index = {None: os.path.join(folder, WEIGHTS)}, None
            else:
                raise FileNotFoundError(f"{folder}: no {WEIGHTS} (or its .index.json); hint: save the model with "
                                        f"save_pretrained(..., safe_serialization=True)")
        self._files, self._index = files, index
        self._stack = ExitStack()
        self._handles: dict = {}

    def __enter__(self) -> "StateSource":
        for key, path in self._files.items():
            self._handles[key] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, name: str):
        return self._handles[self._index[name] if self._index else None]

    def keys(self) -> list[str]:
        return sorted(self._index) if self._index else sorted(self._handles[None].keys())

    def full(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (a 0-d tensor is returned whole)."""
        view = self._handle(name).get_slice(name)
        if len(view.get_shape()) == 0:
            return self.full(name)
        return view[start:stop]

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, reading only the rows that cover them."""
        view = self._handle(name).get_slice(name)
        shape = view.get_shape()
        if len(shape) <= 1:
            return self.full(name).reshape(-1)[start:stop] if not shape else view[start:stop].reshape(-1)
        row = 1
        for dim in shape[1:]:
            row *= dim
        first, last = start // row, -(-stop // row)
        block = view[first:last].reshape(-1)
        return block[start - first * row: stop - first * row]


def load_full_state(module: torch.nn.Module, source: StateSource) -> None:
    """Plain (unsharded) load: every tensor of the module from the source, strictly (missing or extra keys fail)."""
    expected = set(module.state_dict())
    have = set(source.keys())
    if expected != have:
        raise KeyError(f"state mismatch: missing {sorted(expected - have)[:5]}, unexpected {sorted(have - expected)[:5]}")
    module.load_state_dict({name: source.full(name) for name in expected})


def check_keys(module: torch.nn.Module, source: StateSource) -> None:
    expected = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    have = set(source.keys())
    missing = {n for n in expected - have if n in dict(module.named_parameters())}
    if missing or (have - expected):
        raise KeyError(f"state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(have - expected)[:5]}")
