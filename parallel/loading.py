"""Reading pretrained weights a slice at a time, so that no rank ever materialises every full role.

A `StateSource` reads safetensors lazily: `full(name)` reads one tensor, `rows(name, start, stop)`
reads rows of dim 0 only (FSDP2's Shard(0) shards), `flat_range(name, start, stop)` a contiguous range of the
flattened tensor (ZeRO-3 partitions). Bytes outside the requested range are never touched, so a rank's resident
memory grows by its shard, not by the file.

Sources: a `.safetensors` file (the toy teacher), a diffusers model folder (`diffusion_pytorch_model.safetensors`, or
the sharded `*.safetensors.index.json` layout), a pipeline folder with a `subfolder`, or a hub id (resolved through
the local Hugging Face cache: runs never download; `HF_HUB_OFFLINE=1` in tests).
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
from huggingface_hub import snapshot_download

WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"     # transformers' save_pretrained (SAM, DINOv2, text encoders)


def resolve_model_dir(path_or_id: str, subfolder: str | None = None) -> str:
    """A local folder holding a diffusers model (config.json + safetensors); hub ids come from the local cache."""
    if os.path.isdir(path_or_id):
        root = path_or_id
    else:
        root = snapshot_download(path_or_id, local_files_only=True,
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    if subfolder and os.path.isdir(os.path.join(root, subfolder)):
        return os.path.join(root, subfolder)
    return root


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, {name: entry}) of a safetensors file: an 8-byte little-endian header size, then
    a JSON header of {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data section)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class StateSource:
    """Sliceable access to a state dict stored as safetensors. Use as a context manager.

    Reads are positioned file reads of exactly the requested bytes (not mmap: safetensors' `get_slice` maps and
    touches the whole tensor, which made each of 2 ranks' resident memory grow by the full file)."""

    def __init__(self, path: str, subfolder: str | None = None):
        if os.path.isfile(path):
            files = [path]
        else:
            folder = resolve_model_dir(path, subfolder)
            files = []
            for weights in (WEIGHTS, TRANSFORMERS_WEIGHTS):
                index_path = os.path.join(folder, weights + ".index.json")
                if os.path.isfile(index_path):
                    with open(index_path) as f:
                        files = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
                elif os.path.isfile(os.path.join(folder, weights)):
                    files = [os.path.join(folder, weights)]
                if files:
                    break
            if not files:
                raise FileNotFoundError(f"{folder}: no {WEIGHTS} (or its .index.json); hint: save the model with "
                                        f"save_pretrained(..., safe_serialization=True)")
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for file in files:
            data_start, header = read_header(file)
            for name, entry in header.items():
                self._entries[name] = (file, data_start, entry)
        self._handles: dict = {}

    def __enter__(self) -> "StateSource":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> list[int]:
        return list(self._entries[name][2]["shape"])

    def _read(self, name: str, first: int, count: int) -> torch.Tensor:
        """Elements [first, first + count) of the flattened tensor, as a new 1-D tensor."""
        file, data_start, entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if file not in self._handles:
            self._handles[file] = open(file, "rb")
        handle = self._handles[file]
        handle.seek(data_start + entry["data_offsets"][0] + first * itemsize)
        buffer = bytearray(count * itemsize)
        if count and handle.readinto(buffer) != len(buffer):
            raise IOError(f"{file}: short read of '{name}'")
        if not count:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)

    def full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self._read(name, 0, math.prod(shape)).view(shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (a 0-d tensor is returned whole)."""
        shape = self.shape(name)
        if not shape:
            return self.full(name)
        row = math.prod(shape[1:])
        stop = min(stop, shape[0])
        start = min(start, stop)
        return self._read(name, start * row, (stop - start) * row).view(stop - start, *shape[1:])

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor."""
        return self._read(name, start, max(stop - start, 0))


class TensorsSource:
    """An in-memory state dict with StateSource's interface: for small models whose library converts checkpoint keys
    on load (transformers renames DINOv2's legacy attention keys), read whole through `from_pretrained`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __enter__(self) -> "TensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def full(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[name]
        return t if t.dim() == 0 else t[start:stop]

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[start:stop]


class MappedSource:
    """A state dict assembled from other sources: each key maps to (source, the source's own key name)."""

    def __init__(self, mapping: dict[str, tuple], sources: list):
        self._map, self.sources = mapping, sources

    def __enter__(self) -> "MappedSource":
        return self

    def __exit__(self, *exc) -> None:
        for source in self.sources:
            source.__exit__(*exc)

    def keys(self) -> list[str]:
        return sorted(self._map)

    def shape(self, name: str) -> list[int]:
        source, inner = self._map[name]
        return source.shape(inner)

    def full(self, name: str) -> torch.Tensor:
        source, inner = self._map[name]
        return source.full(inner)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        source, inner = self._map[name]
        return source.rows(inner, start, stop)

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        source, inner = self._map[name]
        return source.flat_range(inner, start, stop)


class PrefixedSource(MappedSource):
    """Several sources as one state dict, each under a key prefix, keeping only the keys that start with its
    `keep` prefix: a role assembled from separately saved models (ADP's pixel backbone: `vae.` from the diffusers
    pipeline's vae/, `vision.` from a SAM checkpoint whose prompt encoder and mask decoder are dropped)."""

    def __init__(self, parts: dict[str, tuple["StateSource", str]]):
        super().__init__({prefix + name: (source, name) for prefix, (source, keep) in parts.items()
                          for name in source.keys() if name.startswith(keep)}, [s for s, _ in parts.values()])


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
