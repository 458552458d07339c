"""MDS streams: conversion, ODE-pair collection (2 ranks == 1 rank), resume across world sizes, bad data."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.parts import PartsWriter
from data.schemas import columns
from data.streaming_import import import_streaming
from data.streams import StreamError, TrainingStream, verify_local_stream
from parallel.randomness import counter_normal
from tests.helpers import ROOT, SMOKE, random_teacher, tiny_recipe

ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
WORKER = os.path.join(ROOT, "tests", "streams", "stream_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_real_latents(root, n, parts=2, size_limit="4kb", compression="zstd"):
    """n samples of [4, 4, 4] fp16 latents, id i filled with i, written as `parts` parts and merged."""
    writer = PartsWriter(str(root), columns("real_latents"), compression=compression, size_limit=size_limit)
    per = n // parts
    for p in range(parts):
        writer.write(p, ({"id": i, "latent": np.full((4, 4, 4), i, np.float16), "caption": f"c{i}", "label": i % 10}
                         for i in range(p * per, (p + 1) * per)))
    writer.merge(parts)
    return str(root)


@pytest.fixture(autouse=True)
def clean_shared_memory():
    import_streaming().base.util.clean_stale_shared_memory()
    yield
    import_streaming().base.util.clean_stale_shared_memory()


@pytest.mark.parametrize("compression", ["zstd", None])
def test_stream_reads_every_sample_once_per_epoch_and_reshuffles(tmp_path, compression):
    """Through a local cache, from a compressed stream and from an uncompressed one (copied, not decompressed)."""
    root = write_real_latents(tmp_path / "remote", 32, compression=compression)
    stream = TrainingStream("real_latents", root, str(tmp_path / "cache"), batch_size=8, seed=3)
    first = [int(i) for _ in range(4) for i in stream.next_batch().ids]
    second = [int(i) for _ in range(4) for i in stream.next_batch().ids]
    assert sorted(first) == list(range(32)) and sorted(second) == list(range(32))
    assert first != second                     # a new shuffle each epoch
    batch = stream.next_batch()
    assert batch.latents.shape == (8, 4, 4, 4) and batch.latents.dtype == torch.float16
    assert torch.equal(batch.latents[:, 0, 0, 0].long(), batch.ids)
    assert os.listdir(tmp_path / "cache")       # the local cache is separate from the remote


def test_convert_png_folder_to_images_and_latents(tmp_path):
    from diffusers import AutoencoderKL
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if i % 2 == 0:
            (folder / f"img{i}.txt").write_text(f"caption {i}")
    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(vae_dir)
    for extra, kind in (([], "images"), (["--vae", str(vae_dir), "--resolution", "16"], "real_latents")):
        out = tmp_path / kind
        subprocess.run([sys.executable, "-m", "data.convert", "images", str(folder), "--out", str(out), "--chunk", "2",
                        *extra], check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
        assert verify_local_stream(str(out), kind) == 5
        ds = import_streaming().StreamingDataset(local=str(out), remote=None, shuffle=False, batch_size=1)
        samples = [ds[i] for i in range(5)]
        assert [s["id"] for s in samples] == list(range(5))
        assert [s["caption"] for s in samples] == ["caption 0", "", "caption 2", "", "caption 4"]
        if kind == "images":
            assert np.array_equal(np.asarray(samples[1]["image"]), np.asarray(Image.open(folder / "img1.png")))
        else:
            assert samples[0]["latent"].shape == (4, 8, 8) and samples[0]["latent"].dtype == np.float16
        del ds
        import_streaming().base.util.clean_stale_shared_memory()


def test_convert_jsonl_and_parquet_prompts_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"prompt {i}", "label": i}) for i in range(7)) + "\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [f"prompt {i}" for i in range(7)]}), parquet)
    for source, path, extra in (("prompts", jsonl, []), ("parquet", parquet, ["--kind", "prompts"])):
        out = tmp_path / source
        subprocess.run([sys.executable, "-m", "data.convert", source, str(path), "--out", str(out), "--chunk", "3",
                        *extra], check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
        assert verify_local_stream(str(out), "prompts") == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    result = subprocess.run([sys.executable, "-m", "data.convert", "prompts", str(bad), "--out", str(tmp_path / "x")],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "data.convert", "parquet", str(parquet), "--kind", "images",
                             "--out", str(tmp_path / "y")], env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "column 'image' not found" in result.stderr


def test_collect_resumes_after_a_crash_writing_only_missing_parts(tmp_path):
    recipe = tiny_recipe(tmp_path)
    teacher = random_teacher(tmp_path, recipe)
    out = tmp_path / "pairs"
    args = [sys.executable, "-m", "trainer.collect", SMOKE, f"run.dir={tmp_path}/run", f"teacher.pretrained={teacher}",
            "family.hidden=32", f"collect.out={out}", "collect.num_pairs=24", "collect.micro_batch=8",
            "collect.sampler_steps=4"]
    subprocess.run(args, check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    before = {p: os.path.getmtime(out / p / "index.json") for p in ("part_000000", "part_000002")}
    shutil.rmtree(out / "part_000001")
    os.remove(out / "index.json")
    subprocess.run(args, check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    assert {p: os.path.getmtime(out / p / "index.json") for p in before} == before   # untouched
    assert verify_local_stream(str(out), "ode_pairs") == 24


def read_all(root):
    ds = import_streaming().StreamingDataset(local=str(root), remote=None, shuffle=False, batch_size=1)
    rows = sorted((ds[i] for i in range(ds.num_samples)), key=lambda s: s["id"])
    del ds
    import_streaming().base.util.clean_stale_shared_memory()
    return rows


def test_collect_two_ranks_equals_one_rank(tmp_path):
    recipe = tiny_recipe(tmp_path)
    teacher = random_teacher(tmp_path, recipe)
    common = [SMOKE, f"run.dir={tmp_path}/run", f"teacher.pretrained={teacher}", "family.hidden=32",
              "collect.num_pairs=64", "collect.micro_batch=8", "collect.sampler_steps=4",
              "distill.method.guidance_scale=2.0"]
    subprocess.run([sys.executable, "-m", "trainer.collect", *common, f"collect.out={tmp_path}/one"], check=True,
                   env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    torchrun(2, "-m", "trainer.collect", *common, f"collect.out={tmp_path}/two")
    one, two = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert len(one) == len(two) == 64
    for a, b in zip(one, two):
        assert a["id"] == b["id"] and a["label"] == b["label"] and a["noise_seed"] == b["noise_seed"]
        assert np.array_equal(a["noise"], b["noise"]) and np.array_equal(a["output"], b["output"])
    # the stored key regenerates the stored noise of that sample index
    regenerated = counter_normal(one[5]["noise_seed"], torch.tensor([one[5]["id"]]), (64,))[0]
    assert np.array_equal(regenerated.numpy(), one[5]["noise"])
    assert one[0]["sampler"]["guidance_scale"] == 2.0 and one[0]["sampler"]["steps"] == 4


def test_resume_mid_epoch_from_two_ranks_onto_one(tmp_path):
    """2 ranks x 3 batches x 4 samples, then 1 rank (batch 8, the same global batch) finishes the epoch: every one
    of the 64 samples is seen exactly once in the epoch."""
    root = write_real_latents(tmp_path / "remote", 64)
    out = tmp_path / "out"
    out.mkdir()
    torchrun(2, WORKER, "consume", root, str(tmp_path / "cache2"), str(out), "3", "4")
    first = json.load(open(out / "ids_rank0.json")) + json.load(open(out / "ids_rank1.json"))
    assert len(first) == 24 and len(set(first)) == 24
    subprocess.run([sys.executable, WORKER, "resume", root, str(tmp_path / "cache1"), str(out),
                    str(out / "state.json"), "8"], check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    rest = json.load(open(out / "resumed_rank0.json"))
    assert sorted(first + rest) == list(range(64))


def test_ranks_of_one_sequence_parallel_group_get_the_same_samples(tmp_path):
    root = write_real_latents(tmp_path / "remote", 32)
    out = tmp_path / "out"
    out.mkdir()
    torchrun(2, WORKER, "replicate", root, str(tmp_path / "cache"), str(out), "2", "4")
    rank0, rank1 = json.load(open(out / "ids_rank0.json")), json.load(open(out / "ids_rank1.json"))
    assert rank0 == rank1 and len(set(rank0)) == 8


@pytest.mark.parametrize("case", ["missing shard", "corrupt shard", "schema mismatch", "empty", "no index"])
def test_bad_data_errors_name_the_shard(tmp_path, case):
    root = tmp_path / "remote"
    write_real_latents(root, 16, parts=2)
    index = json.load(open(root / "index.json"))
    shard = (index["shards"][1].get("zip_data") or index["shards"][1]["raw_data"])["basename"]
    named = re.escape(f"shard {index['shards'][1]['raw_data']['basename']} (samples 8-15)")   # raw name + range
    kind = "real_latents"
    if case == "missing shard":
        os.remove(root / shard)
        expected = f"{named} is missing"
    elif case == "corrupt shard":
        data = bytearray((root / shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (root / shard).write_bytes(bytes(data))
        expected = f"{named} is corrupt"
    elif case == "schema mismatch":
        kind = "ode_pairs"
        expected = "column 'noise' missing"
    elif case == "empty":
        root = tmp_path / "empty"
        PartsWriter(str(root), columns(kind)).write(0, [])
        PartsWriter(str(root), columns(kind)).merge(1)
        expected = "empty"
    else:
        os.remove(root / "index.json")
        expected = "no index.json"
    with pytest.raises(StreamError, match=expected):
        TrainingStream(kind, str(root), str(tmp_path / "cache"), batch_size=4, seed=0)


def test_a_stream_smaller_than_one_batch_raises_instead_of_hanging(tmp_path):
    root = write_real_latents(tmp_path / "remote", 4, parts=1)
    stream = TrainingStream("real_latents", root, str(tmp_path / "cache"), batch_size=8, seed=0)
    with pytest.raises(StreamError, match="no batch in a whole epoch"):
        stream.next_batch()


def test_trainer_checkpoints_the_stream_position_and_resumes_exactly(tmp_path):
    """DMD2's real branch from a `real_latents` stream of the toy digits: 20 steps straight equal 10 steps,
    checkpoint, a fresh process-like trainer resuming at 10 and running to 20 (the stream position is restored)."""
    from tests.helpers import distill_trainer
    root = tmp_path / "digits_mds"
    subprocess.run([sys.executable, "-m", "data.convert", "toy", "digits", "--out", str(root), "--chunk", "500"],
                   check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    assert verify_local_stream(str(root), "real_latents") == 1400

    def trainer(run, cache, steps):
        return distill_trainer(tmp_path / run, "distill.method.name=dmd2", "distill.method.ttur=2",
                               f"distill.train.steps={steps}", "distill.train.checkpoint_every=10",
                               f"data.real_remote={root}", f"data.real_local={tmp_path / cache}")

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = trainer("a", "cache_a", 20)
    straight.run()
    first = trainer("b", "cache_b", 10)
    first.run()
    assert first.extra_state()["data"]["sample_in_epoch"] == 10 * 8
    resumed = trainer("b", "cache_b2", 20)
    resumed.run()
    for a, b in zip(straight.nets.generator.parameters(), resumed.nets.generator.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.nets.heads.parameters(), resumed.nets.heads.parameters()):
        assert torch.equal(a, b)


def test_a_shared_memory_prefix_taken_in_between_is_retried(tmp_path, monkeypatch):
    """mosaicml/streaming#884: another job creates the prefix streaming just found free (check, then create); the
    stream asks again instead of failing (it failed two toy benchmark jobs started at once)."""
    prefix = import_streaming().base.shared.prefix
    real, raised = prefix.SharedMemory, []

    def racing(name, create=True, size=0, *args, **kwargs):
        if create and name.endswith("_locals") and not raised:
            raised.append(name)
            raise FileExistsError(17, "File exists", name)   # what shm_open says when the other job won
        return real(name, create, size, *args, **kwargs)

    monkeypatch.setattr(prefix, "SharedMemory", racing)
    root = write_real_latents(tmp_path / "remote", 16)
    stream = TrainingStream("real_latents", root, str(tmp_path / "cache"), batch_size=8, seed=3)
    assert raised and sorted(int(i) for _ in range(2) for i in stream.next_batch().ids) == list(range(16))
