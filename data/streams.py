"""Training streams over MDS shards (mosaicml-streaming), checked at open, resumable across world sizes.

- Deterministic shuffling per epoch: streaming's shuffle with `shuffle_seed` = the run's seed; each epoch reshuffles
  from (seed, epoch).
- Data position: the loader's `state_dict()` (epoch, samples consumed in the epoch, over all ranks) goes into the
  checkpoint. With `num_canonical_nodes` fixed by the recipe (not derived from the cluster), streaming's global
  sample order does not depend on the number of ranks, so a run resumed on another GPU count continues the epoch
  where it stopped and sees every remaining sample exactly once.
- Sequence parallelism: `replication = sp` makes consecutive ranks of one SP group receive the same samples.
- Bad data fails at open, naming the shard and column: missing index, missing shard, corrupt shard (hash recorded
  at write time), schema mismatch, empty stream. An epoch that yields nothing raises instead of looping forever.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import xxhash

from data.parts import HASH
from data.schemas import EMBEDDING_PREFIX, StreamSchemaError, check_columns, collate
from data.streaming_import import import_streaming

SHARED_MEMORY_ATTEMPTS = 5   # see TrainingStream: streaming's shared-memory prefix race


class StreamError(ValueError):
    """A stream that cannot be trained on; the message names the stream, the shard and the problem."""


def is_local(path: str) -> bool:
    return "://" not in path


def read_index(root: str) -> dict:
    path = os.path.join(root, "index.json")
    if not os.path.isfile(path):
        raise StreamError(f"{root}: no index.json (hint: is this an MDS stream? write one with python -m data.convert)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StreamError(f"{path}: not valid JSON ({e})") from None


# (path, bytes, mtime_ns) of every shard file this process has hashed: each file is read once per process however
# many streams or stages open it (a rerun in a new process hashes again: the file may have changed in between)
_VERIFIED: set[tuple[str, int, int]] = set()


HASH_READ_BYTES = 4 << 20   # hashed in 4 MB reads: a 64 MB shard read whole would add 64 MB to the rank's peak RSS


def _file_verified(path: str, expected: str) -> bool:
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    digest = xxhash.xxh64()   # HASH, incrementally (streaming's get_hash takes the whole file as one bytes object)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_READ_BYTES), b""):
            digest.update(block)
    ok = digest.hexdigest() == expected
    if ok:
        _VERIFIED.add(key)
    return ok


def is_compressed(index: dict) -> bool:
    return any(shard.get("zip_data") for shard in index.get("shards", []))


def read_root(root: str, local: Optional[str], cache: Optional[str]) -> str:
    """Where the raw shards of the local stream `root` are read from: `local` when given; the stream itself when
    uncompressed (read in place); else `cache` (a writable folder the caller owns, e.g. in the run dir): compressed
    shards are decompressed there, never into the stream, which may be read-only or shared."""
    if local is not None:
        return local
    if not is_compressed(read_index(root)):
        return root
    if cache is None:
        raise StreamError(f"{root}: a compressed stream needs a writable cache folder to decompress into (hint: set "
                          f"data.*_local)")
    return cache


def verify_local_stream(root: str, kind: str, check_hashes: bool = True, read_root: Optional[str] = None) -> int:
    """Check a local stream before training: schema, every shard present and intact, not empty. Returns samples.
    The file checked is the one training will read: the raw shard where it is read from (`read_root`: the stream
    itself, or the cache it is copied or decompressed into) when it exists there, else the stream's own (compressed
    or raw) shard.
    Hashing reads each file once per process (xxh64, several GB/s); check_hashes=False skips it (sizes only)."""
    index = read_index(root)
    try:
        check_columns(kind, index, root)
    except StreamSchemaError as e:
        raise StreamError(str(e)) from None
    read_root = read_root or root
    total = 0
    for shard in index.get("shards", []):
        raw, zipped = shard["raw_data"], shard.get("zip_data")
        where = f"{root}: shard {raw['basename']} (samples {total}-{total + shard['samples'] - 1})"
        path, info = os.path.join(read_root, raw["basename"]), raw
        if not os.path.isfile(path):   # not in the cache yet: the file it will be copied or decompressed from
            path, info = (os.path.join(root, zipped["basename"]), zipped) if zipped else \
                (os.path.join(root, raw["basename"]), raw)
        if not os.path.isfile(path):
            raise StreamError(f"{where} is missing ({info['basename']}, listed in index.json)")
        if os.path.getsize(path) != info["bytes"]:
            raise StreamError(f"{where} is corrupt: {path} is {os.path.getsize(path)} bytes, index.json says "
                              f"{info['bytes']} (hint: rewrite the stream, or delete the damaged file from a cache)")
        expected = info.get("hashes", {}).get(HASH)
        if check_hashes and expected and not _file_verified(path, expected):
            raise StreamError(f"{where} is corrupt: {path} does not match its {HASH} in index.json (hint: rewrite "
                              f"the stream, or delete the damaged file from a cache)")
        total += shard["samples"]
    if total == 0:
        raise StreamError(f"{root}: the stream is empty (0 samples)")
    return total


def require_embeddings(root: str, names, hint: str) -> None:
    """A local stream whose samples must carry `emb_<name>` for each of `names` (a latent family's conditioning
    inputs): one line naming the stream and the first missing column otherwise."""
    for shard in read_index(root).get("shards", []):
        have = set(shard.get("column_names", []))
        missing = [n for n in names if EMBEDDING_PREFIX + n not in have]
        if missing:
            raise StreamError(f"{root}: shard {shard['raw_data']['basename']} has no {EMBEDDING_PREFIX}{missing[0]} "
                              f"column: its samples carry no text embeddings to condition on (hint: {hint})")


class CollateTyped:
    """collate_fn: the typed batch of a stream kind, built where the samples were decoded (in a loader worker when
    `workers` > 0, so decoding and stacking run beside the training step). StreamingDataLoader counts a batch's
    samples with len(first value) of a mapping, hence {"ids": ..., "batch": ...}. Picklable for the workers."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(self.kind, samples)
        return {"ids": batch.ids, "batch": batch}


class TrainingStream:
    """Batches of one stream kind for this rank. batch_size: per rank."""

    def __init__(self, kind: str, remote: str, local: Optional[str], batch_size: int, seed: int,
                 num_canonical_nodes: int = 1, replication: Optional[int] = None, shuffle: bool = True,
                 check_hashes: bool = True, workers: int = 0, cache: Optional[str] = None):
        """local: where streaming keeps (decompressed) shards; None: see `read_root` (in place, or `cache`)."""
        streaming = import_streaming()
        self.kind = kind
        local_stream = is_local(remote)
        if local_stream:
            local = read_root(remote, local, cache)
            if os.path.abspath(local) == os.path.abspath(remote):
                # read in place: with remote set and no local, streaming would copy the shards into a temp folder
                # named by the path's hash, which then refuses a second reader (another job, or a rerun after a kill)
                remote = None
            else:
                os.makedirs(local, exist_ok=True)   # a read-only place fails here, with the path, before training
            self.num_samples = verify_local_stream(remote or local, kind, check_hashes, read_root=local)
        # remote object stores: streaming validates each downloaded shard against its recorded hash
        for attempt in range(SHARED_MEMORY_ATTEMPTS):
            try:
                self.dataset = streaming.StreamingDataset(
                    remote=remote, local=local, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                    num_canonical_nodes=num_canonical_nodes, replication=replication,
                    validate_hash=None if local_stream else HASH)
                break
            except FileExistsError:
                # mosaicml/streaming#884, #901: two jobs starting at once on one machine can pick the same
                # shared-memory prefix (streaming checks, then creates); the loser created nothing and, asked again,
                # picks the next free prefix. Costs a fraction of a second, only when it happens.
                if attempt == SHARED_MEMORY_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))
        # workers > 0: persistent decode processes (DataLoader's own), prefetching while the step runs; the loader's
        # state_dict counts yielded samples in this process, so resumption is unchanged
        extra = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
        self.loader = streaming.StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=workers,
                                                    collate_fn=CollateTyped(kind), drop_last=True, **extra)
        self._iterator = None

    def next_batch(self):
        if self._iterator is None:
            self._iterator = iter(self.loader)
        try:
            return next(self._iterator)["batch"]
        except StopIteration:
            self._iterator = iter(self.loader)      # next epoch (streaming reshuffles from (seed, epoch))
            batch = next(self._iterator, None)
            if batch is None:
                raise StreamError(f"{self.kind} stream yielded no batch in a whole epoch (fewer samples than one "
                                  f"batch per rank?)") from None
            return batch["batch"]

    def rest_of_epoch(self):
        """Typed batches until the current epoch ends (evaluation, tests)."""
        for batch in self._iterator if self._iterator is not None else self.loader:
            yield batch["batch"]
        self._iterator = None

    def batch(self, indices):
        """Trainer interface: the next batch (the stream owns the data position, not the sample indices)."""
        return self.next_batch()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iterator = None
