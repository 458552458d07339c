"""Writing a stream as independent parts, so conversion and collection spread over ranks and resume after a crash.

Work is cut into fixed units (a chunk of inputs, a micro-batch of ODE pairs) numbered 0..N-1; unit j goes to rank
j mod world_size and is written as MDS shards into <out>/part_<j>/ through a temp folder renamed on completion. A
rerun skips the parts that exist. When every part is done, rank 0 merges the parts' index.json files into
<out>/index.json with streaming's own `merge_index`. Because a unit's content depends only on j, the merged stream
is the same whatever the number of ranks.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Iterable

from data.streaming_import import import_streaming

HASH = "xxh64"   # recorded per shard; `verify_local_stream` checks it


class PartsWriter:
    def __init__(self, out_dir: str, columns: dict[str, str], compression: str = "zstd", size_limit: str = "64mb"):
        self.out_dir, self.columns = out_dir, columns
        self.compression, self.size_limit = compression, size_limit
        os.makedirs(out_dir, exist_ok=True)

    def part_dir(self, unit: int) -> str:
        return os.path.join(self.out_dir, f"part_{unit:06d}")

    def done(self, unit: int) -> bool:
        return os.path.isfile(os.path.join(self.part_dir(unit), "index.json"))

    def write(self, unit: int, samples: Iterable[dict]) -> None:
        streaming = import_streaming()
        tmp = os.path.join(self.out_dir, f".tmp-part_{unit:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        with streaming.MDSWriter(out=tmp, columns=self.columns, compression=self.compression, hashes=[HASH],
                                 size_limit=self.size_limit) as writer:
            for sample in samples:
                writer.write(sample)
        final = self.part_dir(unit)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def merge(self, num_units: int) -> str:
        missing = [j for j in range(num_units) if not self.done(j)]
        if missing:
            raise RuntimeError(f"{self.out_dir}: parts {missing[:5]} are not written; rerun the same command")
        streaming = import_streaming()
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))   # merge_index logs a warning per call through the root logger
        try:
            streaming.base.util.merge_index([os.path.join(self.part_dir(j), "index.json") for j in range(num_units)],
                                            self.out_dir, keep_local=True)
        finally:
            root.setLevel(level)
        with open(os.path.join(self.out_dir, "index.json")) as f:
            return f"{sum(s['samples'] for s in json.load(f)['shards'])} samples in {self.out_dir}"


def units_of_rank(num_units: int, rank: int, world_size: int) -> list[int]:
    """Round-robin assignment of work units to ranks."""
    return list(range(rank, num_units, world_size))
