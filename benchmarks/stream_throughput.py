"""Benchmark: samples/s of a `real_latents` stream of 4x128x128 fp16 latents (SDXL at 1024 px) on this machine.

    python benchmarks/stream_throughput.py [--samples 1024] [--batch 8] [--compression zstd|none] [--dir /tmp/x]

Writes the stream once (random latents: the worst case for compression), then reads two epochs through
`data.streams.TrainingStream` (local dir as remote, separate local cache: the first epoch copies shards into the
cache, the second reads from it) and prints samples/s for each. Not run in CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import numpy as np  # noqa: E402

from data.parts import PartsWriter  # noqa: E402
from data.schemas import columns  # noqa: E402
from data.streaming_import import import_streaming  # noqa: E402
from data.streams import TrainingStream  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compression", default="zstd", choices=["zstd", "none"])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.samples = 32
    root = args.dir or tempfile.mkdtemp(prefix="dmdx_stream_bench_")
    remote, cache = os.path.join(root, "remote"), os.path.join(root, "cache")
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    import_streaming().base.util.clean_stale_shared_memory()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    writer = PartsWriter(remote, columns("real_latents"), compression=None if args.compression == "none" else "zstd")
    writer.write(0, ({"id": i, "latent": rng.standard_normal((4, 128, 128)).astype(np.float16), "caption": f"c{i}",
                      "label": -1} for i in range(args.samples)))
    writer.merge(1)
    write_seconds = time.perf_counter() - started
    mb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(remote) for f in fs) / 2**20
    print(f"wrote {args.samples} samples ({mb:.0f} MiB, {args.compression}) in {write_seconds:.1f} s "
          f"= {args.samples / write_seconds:.0f} samples/s")
    stream = TrainingStream("real_latents", remote, cache, args.batch, seed=0)
    batches = args.samples // args.batch
    for epoch in range(2):
        started = time.perf_counter()
        for _ in range(batches):
            batch = stream.next_batch()
        seconds = time.perf_counter() - started
        print(f"epoch {epoch} ({'cold cache' if epoch == 0 else 'warm cache'}): {batches * args.batch / seconds:.0f} "
              f"samples/s (batch {list(batch.latents.shape)} {batch.latents.dtype})")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
