"""Reading torch.distributed.checkpoint (DCP) folders without unpickling arbitrary objects.

DCP stores tensors as raw bytes and small objects through `torch.save` (read back with `weights_only=True`), but its
`.metadata` file is a plain pickle that `FileSystemReader.read_metadata` loads with `pickle.load`: a crafted
`.metadata` runs code on load (measured on torch 2.13). Every DCP read in this project (FSDP2 and ZeRO-3 resume,
export, the offline reader) goes through `SafeReader`, which unpickles the metadata with an allow-list of the
classes DCP itself writes; anything else is refused with one line naming the file.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# what DCP's own Metadata pickles reference (checked against torch 2.13's writer; tests/faults covers a payload)
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                               "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                               "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file references something outside the allow-list (it was not written by DCP), or is unreadable:
    bad input, refused with one line (exit 2)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the allow-listed unpickler (tensor data is read as DCP does)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except UnsafeCheckpoint as e:
                raise UnsafeCheckpoint(f"{path}: refers to {e}, which a DCP checkpoint never holds; not loading it "
                                       f"(hint: the file was replaced; resume from another checkpoint)") from None
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise UnsafeCheckpoint(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load(state: dict, directory: str) -> None:
    """dcp.load into `state` (in place) through SafeReader. The metadata is read once beforehand so that a refusal
    reaches the caller as UnsafeCheckpoint: dcp.load catches read_metadata's errors and re-raises its own."""
    SafeReader(directory).read_metadata()
    dcp.load(state, storage_reader=SafeReader(directory))


def stored_sizes(directory: str) -> dict[str, torch.Size]:
    """{flattened key: global size} of every tensor in a DCP folder (read safely; no tensor data is read)."""
    metadata = SafeReader(directory).read_metadata()
    return {key: entry.size for key, entry in metadata.state_dict_metadata.items() if hasattr(entry, "size")}


def is_dcp(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ".metadata"))
