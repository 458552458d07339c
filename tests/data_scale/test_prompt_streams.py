"""Prompts and real data at scale (docs/data.md "Prompt embeddings"): the prompt stream encoded by 2 ranks is what 1
rank writes, bit for bit, and a killed encoding resumes; a tiny SDXL DMD2 run reads its prompts and its real latents
from streams and resumes mid-epoch on another world size with every sample seen once; each real latent is
conditioned on its own caption; a rank's memory does not grow with the number of prompts."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data.streaming_import import import_streaming
from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, SINGLE, sdxl_tiny_embedding_shapes, write_embedded_stream
from trainer.config import load_recipe
from trainer.stages.training import build_stage_trainer
from trainer.tiny_pipeline import save_tiny_pipeline

WORKER = os.path.join(ROOT, "tests", "data_scale", "prompt_stream_worker.py")
SDXL = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
DMD2 = ["distill.method.name=dmd2", "distill.method.ttur=1",
        "distill.optimizer={generator: {lr: 1.0e-5}, fake_score: {lr: 1.0e-5}, heads: {lr: 1.0e-4}}"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline("sdxl_tiny", str(tmp_path_factory.mktemp("sdxl_pipeline") / "pipe"))


def run(cmd, timeout=300):
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(nproc, *args, timeout=300):
    if nproc == 1:
        return run([sys.executable, *args], timeout)
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend",
                "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args], timeout)


def read_stream(root):
    dataset = import_streaming().base.local.LocalDataset(str(root))
    return [dataset[i] for i in range(len(dataset))]


def same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_prompt_encoding_on_two_ranks_equals_one_rank_and_resumes_after_a_kill(pipeline, tmp_path):
    prompts = tmp_path / "captions.txt"
    # the tiny twin's tokenizer keeps 8 bytes: the captions differ in their first ones
    prompts.write_text("".join(f"{i} {['red', 'green', 'blue'][i % 3]} thing\n" for i in range(600)))
    prepare = ["-m", "trainer.prepare", "prompts", str(prompts), "--recipe", SDXL, "--dtype", "float32",
               "--part-size", "8", "--batch", "4", f"teacher.pretrained={pipeline}"]
    launch(1, *prepare, "--out", str(tmp_path / "one"))
    launch(2, *prepare, "--out", str(tmp_path / "two"))
    one = read_stream(tmp_path / "one")
    assert len(one) == 600 and [s["id"] for s in one] == list(range(600)) and one[5]["text"] == "5 blue thing"
    assert one[0]["emb_encoder_hidden_states"].dtype == np.float32
    assert not np.array_equal(one[0]["emb_encoder_hidden_states"], one[1]["emb_encoder_hidden_states"])
    same_samples(one, read_stream(tmp_path / "two"))
    assert (tmp_path / "one" / "empty_prompt.safetensors").read_bytes() == \
        (tmp_path / "two" / "empty_prompt.safetensors").read_bytes()
    # killed (SIGKILL) once a few of the 75 parts are written, then rerun: it writes only the missing parts
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *prepare, "--out", str(killed)], env=ENV, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "part_000003" / "index.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(p.name for p in killed.glob("part_*"))
    assert 4 <= len(written) < 75 and not (killed / "index.json").exists(), written
    before = {name: os.stat(killed / name / "index.json").st_mtime_ns for name in written}
    rerun = launch(1, *prepare, "--out", str(killed))
    assert "wrote 600 samples" in rerun.stdout
    assert {name: os.stat(killed / name / "index.json").st_mtime_ns for name in written} == before
    same_samples(one, read_stream(killed))


def test_sdxl_dmd2_reads_prompt_and_real_streams_and_resumes_on_another_world_size(pipeline, tmp_path):
    """2 ranks x 2 steps x global batch 4, then 1 rank resumes from the step-2 checkpoint for steps 2-3: over the
    epoch (16 prompts, 16 real latents) every prompt and every real latent is read exactly once."""
    shapes = sdxl_tiny_embedding_shapes()
    prompts = write_embedded_stream(str(tmp_path / "prompts"), "prompts", 16, shapes)
    real = write_embedded_stream(str(tmp_path / "real"), "real_latents", 16, shapes, (4, 16, 16), seed=1)
    common = [f"run.dir={tmp_path / 'run'}", f"teacher.pretrained={pipeline}", f"family.prompts={prompts}",
              f"data.real_remote={real}", "distill.train.batch_size=4", "distill.train.checkpoint_every=2", *DMD2]
    out = tmp_path / "out"
    out.mkdir()
    first_run = launch(2, WORKER, str(out), "first", *common, "distill.train.steps=2")
    launch(1, WORKER, str(out), "resumed", *common, "distill.train.steps=4")
    # not a terminal: one plain progress line per logging step (log_every 1), not a redrawn bar
    lines = [line for line in first_run.stdout.splitlines() if line.startswith("[distill:dmd2] step ")]
    assert [line.split(" loss ")[0] for line in lines] == ["[distill:dmd2] step 1/2 (50.0%)",
                                                          "[distill:dmd2] step 2/2 (100.0%)"], first_run.stdout
    assert "critic=" in lines[0] and "ETA 0:00:" in lines[0]
    first = [json.loads((out / f"first_rank{r}.json").read_text()) for r in (0, 1)]
    resumed = json.loads((out / "resumed_rank0.json").read_text())
    assert resumed["step"] == 4
    for stream in ("prompts", "real"):
        seen = [i for record in (*first, resumed) for batch in record[stream] for i in batch]
        assert sorted(seen) == list(range(16)), (stream, seen)
        assert all(len(batch) == 2 for record in first for batch in record[stream])   # 2 per rank, 4 per step
        assert len(resumed[stream]) == 2 and all(len(batch) == 4 for batch in resumed[stream])


def test_each_real_latent_is_conditioned_on_its_own_caption(pipeline, tmp_path):
    """DMD2's real branch: the condition of real sample k is the embeddings stored with it (distinct captions give
    distinct conditions), the generator's are the prompt stream's rows of the prompts it read."""
    shapes = sdxl_tiny_embedding_shapes()
    prompts = write_embedded_stream(str(tmp_path / "prompts"), "prompts", 8, shapes, dtype="float32")
    real = write_embedded_stream(str(tmp_path / "real"), "real_latents", 8, shapes, (4, 16, 16), seed=1,
                                 dtype="float32")
    recipe = load_recipe(SDXL, ["stages=[distill]", f"run.dir={tmp_path / 'run'}", f"teacher.pretrained={pipeline}",
                                f"family.prompts={prompts}", f"data.real_remote={real}", "distill.train.batch_size=4",
                                *DMD2])
    trainer = build_stage_trainer(recipe, recipe.run.dir, SINGLE)
    read = {}
    for name, adapter in (("prompts", trainer.prompt_source), ("real", trainer.data_source)):
        def recorded(next_batch=adapter.stream.next_batch, name=name):
            read[name] = next_batch()
            return read[name]
        adapter.stream.next_batch = recorded
    ctx = trainer.make_context(0)
    stored = {name: {s["id"]: s for s in read_stream(root)} for name, root in (("prompts", prompts), ("real", real))}
    for name, cond in (("real", ctx.real_cond), ("prompts", ctx.cond)):
        ids = read[name].ids.tolist()
        tokens = cond["encoder_hidden_states"]
        assert len(set(ids)) == 4 and tokens.shape[0] == 4
        for k, i in enumerate(ids):
            assert torch.equal(tokens[k], torch.tensor(stored[name][i]["emb_encoder_hidden_states"])), (name, k)
        assert all(not torch.equal(tokens[0], tokens[k]) for k in range(1, 4))
        pooled = cond["added_cond_kwargs"]["text_embeds"]
        assert all(torch.equal(pooled[k], torch.tensor(stored[name][i]["emb_text_embeds"]))
                   for k, i in enumerate(ids))


def test_rank_memory_does_not_grow_with_the_number_of_prompts(pipeline, tmp_path):
    """Rows of [308, 64] fp16 (39 KB, the size of a [77, 256] row): 20,000 prompts are 788 MB. A tiny SDXL ADM run
    on 2 ranks reading 200 or 20,000 of them peaks at the same RSS within 50 MB, and reads one local batch of rows
    per step."""
    shapes = {name: ((308, 64) if name == "encoder_hidden_states" else shape)
              for name, shape in sdxl_tiny_embedding_shapes().items()}
    assert np.prod(shapes["encoder_hidden_states"]) * 2 * 20_000 >= 500e6
    out = tmp_path / "out"
    out.mkdir()
    peaks = {}
    for count in (200, 20_000):
        prompts = write_embedded_stream(str(tmp_path / f"prompts_{count}"), "prompts", count, shapes)
        launch(2, WORKER, str(out), f"p{count}", f"run.dir={tmp_path / f'run_{count}'}",
               f"teacher.pretrained={pipeline}", f"family.prompts={prompts}", "family.prompt_length=308",
               "distill.train.batch_size=4", "distill.train.steps=3", "distill.train.checkpoint_every=100")
        records = [json.loads((out / f"p{count}_rank{r}.json").read_text()) for r in (0, 1)]
        assert all([len(batch) for batch in record["prompts"]] == [2, 2, 2] for record in records)
        peaks[count] = max(record["peak_rss_mb"] for record in records)
    print(f"peak RSS per rank: {peaks[200]:.0f} MB with 200 prompts, {peaks[20_000]:.0f} MB with 20,000")
    assert abs(peaks[20_000] - peaks[200]) < 50, peaks


def test_bad_inputs_get_one_line_and_change_nothing(pipeline, tmp_path, capsys):
    """trainer.prepare: a file that is no prompt file, a missing parquet column, an --out holding another file's
    prompts (left as it was); training: a real stream without caption embeddings for a latent family."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data.parts import PartsWriter
    from data.schemas import columns
    from trainer.main import main as train_main
    from trainer.prepare import main as prepare_main

    def refused(call, *fragments):
        assert call() == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and all(f in lines[0] for f in fragments), lines
    base = ["--recipe", SDXL, f"teacher.pretrained={pipeline}"]
    (tmp_path / "prompts.csv").write_text("a cat\n")
    refused(lambda: prepare_main(["prompts", str(tmp_path / "prompts.csv"), "--out", str(tmp_path / "a"), *base]),
            "prompts.csv", "not a prompt file", "hint")
    pq.write_table(pa.table({"caption": ["a cat", "a dog"]}), tmp_path / "captions.parquet")
    refused(lambda: prepare_main(["prompts", str(tmp_path / "captions.parquet"), "--out", str(tmp_path / "a"),
                                  *base]), "captions.parquet", "column 'text' not found", "--column")
    assert prepare_main(["prompts", str(tmp_path / "captions.parquet"), "--column", "caption", "--out",
                         str(tmp_path / "a"), *base]) == 0
    assert [s["text"] for s in read_stream(tmp_path / "a")] == ["a cat", "a dog"]
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    (tmp_path / "other.txt").write_text("a bird\n")
    refused(lambda: prepare_main(["prompts", str(tmp_path / "other.txt"), "--out", str(tmp_path / "a"), *base]),
            "another file", "choose another --out")
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before
    # a real_latents stream written without embeddings (data.convert's) cannot condition a latent family
    writer = PartsWriter(str(tmp_path / "real"), columns("real_latents"))
    writer.write(0, ({"id": i, "latent": np.zeros((4, 16, 16), np.float16), "caption": "c", "label": -1}
                     for i in range(8)))
    writer.merge(1)
    refused(lambda: train_main([SDXL, f"run.dir={tmp_path / 'run'}", f"teacher.pretrained={pipeline}",
                                f"data.real_remote={tmp_path / 'real'}", *DMD2]),
            "real", "no emb_encoder_hidden_states column", "trainer.prepare images")
    # the empty prompt's branch asked for, and a stream without the empty prompt's embeddings: not zeros, a line
    prompts = write_embedded_stream(str(tmp_path / "no_empty"), "prompts", 8, sdxl_tiny_embedding_shapes())
    refused(lambda: train_main([SDXL, f"run.dir={tmp_path / 'run2'}", f"teacher.pretrained={pipeline}",
                                f"family.prompts={prompts}", "family.uncond=empty_prompt"]),
            "no_empty", "no empty_prompt.safetensors", "trainer.prepare prompts")
