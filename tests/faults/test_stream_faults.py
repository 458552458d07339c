"""Faults 2 and 10 (docs/data.md "Integrity"): damaged shards stop the run with one line; a read-only stream is
read through a cache and never written to."""
import os
import shutil
import stat

from tests.faults.conftest import copy_run, one_error_line, run_trainer, unfinish
from tests.helpers import SMOKE


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_raw_and_compressed_shards_stop_with_one_line(finished, tmp_path):
    """(2) The decompressed shard training reads (in the run's stream cache) and the compressed shard in the stream:
    each changed in place (same size) stops the pretrain stage with exit 2 and one line naming the stream, the
    shard and its sample range."""
    run_dir = copy_run(finished, tmp_path / "run")
    unfinish(run_dir, "pretrain")
    raw = run_dir / "stream_cache" / "ode_pairs" / "part_000001" / "shard.00000.mds"
    flip_middle_byte(raw)
    line = one_error_line(run_trainer(run_dir, expect=2))
    assert "ode_pairs: shard part_000001/shard.00000.mds (samples 64-127) is corrupt" in line, line
    assert str(raw) in line

    shutil.rmtree(run_dir / "stream_cache")
    flip_middle_byte(run_dir / "ode_pairs" / "part_000002" / "shard.00000.mds.zstd")
    line = one_error_line(run_trainer(run_dir, expect=2))
    assert "shard part_000002/shard.00000.mds (samples 128-191) is corrupt" in line and ".zstd" in line, line


def snapshot(folder):
    return {os.path.relpath(os.path.join(root, name), folder): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, dirs, names in os.walk(folder) for name in names + dirs}


def test_read_only_stream_is_read_through_a_cache(finished, tmp_path):
    """(10) The pretrain stage reads a compressed stream given by data.pairs_remote: nothing in the stream's folder
    is created or touched (it may be read-only or shared); the shards are decompressed into the run dir's cache.
    Where the process is not root, the stream is also made read-only for real."""
    stream = tmp_path / "stream"   # the compressed stream as written: index and .zstd shards only
    shutil.copytree(finished / "ode_pairs", stream, ignore=shutil.ignore_patterns("*.mds"))
    before = snapshot(stream)
    if os.geteuid() != 0:
        for root, dirs, names in os.walk(stream):
            for name in names + dirs:
                os.chmod(os.path.join(root, name), stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        os.chmod(stream, 0o555)
    run_dir = tmp_path / "run"
    run_trainer(run_dir, f"teacher.pretrained={finished / 'teacher' / 'teacher.safetensors'}", "stages=[pretrain]",
                f"data.pairs_remote={stream}")
    assert snapshot(stream) == before
    assert (run_dir / "stream_cache" / "ode_pairs" / "part_000000" / "shard.00000.mds").is_file()
    assert (run_dir / "pretrain" / "student.safetensors").is_file()


def test_streams_named_by_the_recipe_are_checked_where_they_are_read(tmp_path):
    """The start-up check reads what training will read: an uncompressed stream in place (nothing in the run dir's
    cache yet), a compressed one from the stream until its cache holds the decompressed shards."""
    from tests.streams.test_streams import write_real_latents
    from trainer.config import load_recipe
    from trainer.stages.training import check_streams
    for compression in (None, "zstd"):
        stream = write_real_latents(tmp_path / f"stream-{compression}", 16, compression=compression)
        recipe = load_recipe(SMOKE, [f"run.dir={tmp_path / 'run'}", f"data.real_remote={stream}"])
        check_streams(recipe, str(tmp_path / "run"))
