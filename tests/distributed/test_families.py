"""Every family's tiny twin (complete random pipeline folders from trainer.tiny_pipeline) runs 3 ADM steps on 2 real
processes under FSDP2 and under ZeRO-3 through the real CLI; then its export loads in the stock diffusers pipeline,
whose output for the same seed and prompts equals `trainer.sample`'s within 1e-4 (fp32). The export reads the student
consolidated from the sharded backend at the end of the stage, and again offline from the backend's own step-3
checkpoint (DCP, or ZeRO-3's partitions): both give the same weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.distributed.test_data_parallel import ENV, free_port
from tests.helpers import ROOT, saved_clip, saved_vision
from trainer.tiny_pipeline import save_tiny_pipeline

PROMPTS = os.path.join(ROOT, "recipes", "prompts", "tiny.txt")
# (tiny model, recipe, extra overrides): SDXL is DMD2's one-step setting (conditioning timestep 399, zero
# embeddings); the others encode the prompt file with the pipeline's text encoders and use the empty prompt
RUNS = {
    "sdxl_tiny": ("sdxl_tiny.yaml", []),
    # float32 prompts: the model card's text prompt encodes to the stored rows; a large LoRA learning rate: the
    # adapters move the student visibly away from the teacher in 3 steps (the adapter export's check needs it)
    "sd3_medium_tiny": ("sd3_medium_tiny.yaml", [f"family.prompts={PROMPTS}", "family.uncond=empty_prompt",
                                                 "family.prompt_dtype=float32", "distill.optimizer.generator.lr=1.0e-2"]),
    "sd35_large_tiny": ("sd35_large_tiny.yaml", [f"family.prompts={PROMPTS}"]),
    "cogvideox_2b_tiny": ("cogvideox_2b_tiny.yaml", [f"family.prompts={PROMPTS}", "family.uncond=empty_prompt"]),
    "cogvideox_5b_tiny": ("cogvideox_5b_tiny.yaml", [f"family.prompts={PROMPTS}"]),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_pipelines")
    saved_vision("dinov2", str(root / "dinov2"))   # the evaluation's feature models: tiny, random
    saved_clip(str(root / "clip"))
    return root, {model: save_tiny_pipeline(model, str(root / model)) for model in RUNS}


def eval_settings(root) -> list[str]:
    """Tiny evaluation: 8 samples over the 2 ranks, DINOv2 at 56 px, the teacher's reference in 4 steps."""
    return [f"eval.dinov2={root / 'dinov2'}", f"eval.clip={root / 'clip'}", "eval.num_samples=8",
            "eval.resolution=56", "eval.batch_size=4"]


def train(run_dir, model, pipeline, backend, evaluate=()):
    recipe, extra = RUNS[model]
    extra = [*extra, *evaluate]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.main",
            os.path.join(ROOT, "recipes", "tiny", recipe), f"run.dir={run_dir}", f"teacher.pretrained={pipeline}",
            f"parallel.backend={backend}", "parallel.zero3_persistence_threshold=0", "distill.train.steps=3", *extra]
    result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[distill] wrote" in result.stdout
    return result


def stock_output(export_dir, family, labels, seed, base=None, adapters=True):
    """The exported folder through the stock pipeline class, with the family's embeddings of `labels`. base: the
    export holds LoRA adapters only: the base pipeline with the export's scheduler, then `load_lora_weights`."""
    from trainer.export import SAMPLING_FILE, pipeline_class
    if base is None:
        pipeline = pipeline_class(family.cfg.name).from_pretrained(export_dir)
    else:
        import diffusers
        with open(os.path.join(export_dir, "scheduler", "scheduler_config.json")) as f:
            scheduler_class = getattr(diffusers, json.load(f)["_class_name"])
        scheduler = scheduler_class.from_pretrained(export_dir, subfolder="scheduler")
        pipeline = pipeline_class(family.cfg.name).from_pretrained(base, scheduler=scheduler)
        if adapters:
            pipeline.load_lora_weights(export_dir)
    with open(os.path.join(export_dir, SAMPLING_FILE)) as f:
        call = json.load(f)
    emb = family.embeddings(labels)
    kwargs = {"prompt_embeds": emb["encoder_hidden_states"]}
    pooled = emb.get("text_embeds", emb.get("pooled_projections"))
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled
    torch.manual_seed(seed)   # SD3's pipeline re-noises from the global RNG (trainer/sample.py)
    out = pipeline(**kwargs, **call, generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.frames if hasattr(out, "frames") else out.images


def stock_text_output(export_dir, family):
    from trainer.export import SAMPLING_FILE, pipeline_class
    pipeline = pipeline_class(family.cfg.name).from_pretrained(export_dir)
    with open(os.path.join(export_dir, SAMPLING_FILE)) as f:
        call = json.load(f)
    out = pipeline(prompt=["a red fox in the snow"], **call, generator=torch.Generator().manual_seed(0),
                   output_type="latent")
    return out.frames if hasattr(out, "frames") else out.images


# SDXL's ADM steps under ZeRO-3 run in tests/distributed/test_dmdx_sdxl.py (after ADP, from its student); the
# SDXL case here under FSDP2 covers the DMD2-style eps student's export (41 s of CI saved). CogVideoX-5B's ADM steps
# under ZeRO-3 run in tests/distributed/test_sequence_parallel.py (SP = 1 and 2); its export is checked here under
# FSDP2, and ZeRO-3's partitions are exported for the other families (25 s saved)
CASES = [(model, backend) for model in sorted(RUNS) for backend in ("fsdp2", "zero3")
         if (model, backend) not in (("sdxl_tiny", "zero3"), ("cogvideox_5b_tiny", "zero3"))]


@pytest.mark.parametrize("model,backend", CASES)
def test_tiny_twin_trains_on_two_ranks_and_exports_to_the_stock_pipeline(pipelines, model, backend):
    from trainer.export import main as export_main
    from trainer.sample import main as sample_main
    from trainer.stages.students import load_student
    root, folders = pipelines
    run_dir = root / f"run_{model}_{backend}"
    # SDXL: the evaluate stage and in-loop evaluation at step 3, on held-out prompts (its training prompts are the
    # random table, which has no texts); the teacher's FD reference in 4 sampler steps (CogVideoX's too)
    evaluate = ([*eval_settings(root), "stages=[distill,evaluate]", "eval.every=3", f"eval.prompts={PROMPTS}",
                 "teacher.sampler_steps=4"] if model == "sdxl_tiny" else ["teacher.sampler_steps=4"])
    result = train(run_dir, model, folders[model], backend, evaluate)
    if model == "sdxl_tiny":
        check_sdxl_evaluation(run_dir)
        assert result.stdout.count("the teacher's reference") == 1, result.stdout   # rank 0 logs, once per run
    if model == "cogvideox_2b_tiny" and backend == "zero3":
        check_video_evaluation(run_dir, root)
    samples = root / f"samples_{model}_{backend}.npz"
    assert sample_main([str(run_dir), "--num", "3", "--seed", "11", "--prompt-ids", "2,5", "--out", str(samples)]) == 0
    out = root / f"export_{model}_{backend}"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    assert export_main([str(run_dir), "--out", str(out)]) == 2          # never overwrites
    # the same EMA read back offline from the backend's own step-3 checkpoint (DCP / ZeRO-3 partitions)
    from_checkpoint = root / f"export_{model}_{backend}_checkpoint"
    assert export_main([str(run_dir), "--out", str(from_checkpoint), "--checkpoint", "latest"]) == 0
    same_denoiser(out, from_checkpoint)
    if model == "sd3_medium_tiny":   # its recipe trains LoRA adapters: the base weights are the teacher's, bit for bit
        check_lora_student(run_dir, folders[model])
        if backend == "fsdp2":
            check_model_card(run_dir, out, root)
    reference = np.load(samples)
    recipe, family, _, _ = load_student(str(run_dir))
    labels = torch.tensor(reference["labels"])
    assert labels.tolist() == [2, 5, 2]
    got = stock_output(str(out), family, labels, 11)
    assert got.shape == reference["samples"].shape
    # a text prompt with exactly the written arguments: encoded at the trained token count (the tiny twins' 8 T5
    # tokens, not the pipelines' default 256 / 226, which the tiny denoisers would refuse)
    assert stock_text_output(str(out), family).shape[1:] == got.shape[1:]
    if model == "sd3_medium_tiny" and backend == "fsdp2":   # LoRA adapters alone, into the teacher's pipeline
        lora_out = root / f"export_{model}_{backend}_lora"
        assert export_main([str(run_dir), "--out", str(lora_out), "--lora"]) == 0
        adapted = stock_output(str(lora_out), family, labels, 11, base=folders[model])
        teacher = stock_output(str(lora_out), family, labels, 11, base=folders[model], adapters=False)
        off, moved = (adapted - got).abs().max().item(), (teacher - got).abs().max().item()
        print(f"LoRA export vs fused: {off:.1e}; teacher vs fused: {moved:.1e}")
        assert off < 1e-4 and moved > 20 * off   # the adapters load, and they matter
    difference = (got - torch.from_numpy(reference["samples"])).abs().max().item()
    assert difference < 1e-4, difference
    assert got.abs().max() > 0.1    # not a degenerate all-zero sample


def evaluate_checkpoint(run_dir, *overrides) -> dict:
    """`python -m trainer.evaluate RUN --checkpoint latest` on 2 ranks -> the checkpoint's metrics.json."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "trainer.evaluate", str(run_dir), "--checkpoint",
            "latest", *overrides]
    result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(run_dir / "evaluate" / "step_0000003" / "metrics.json") as f:
        return json.load(f)


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def image_size(accumulator, tag) -> tuple[int, int]:
    event = accumulator.Images(tag)[-1]
    return event.height, event.width


def check_sdxl_evaluation(run_dir):
    """The evaluate stage's metrics; the same EMA evaluated from the FSDP2 checkpoint on 2 ranks gives the same
    figures; tensorboard holds decoded images (128 px samples, not 16 px latent previews), the in-loop figures at
    step 3, and the recipe as text."""
    with open(run_dir / "evaluate" / "metrics.json") as f:
        stage = json.load(f)
    assert stage["fd_dinov2"] >= 0 and stage["clip_score"] > 0 and "held out" in stage["prompt_set"]
    assert stage["fd_reference"].startswith("teacher")
    checkpoint = evaluate_checkpoint(run_dir)
    for key in ("fd_dinov2", "clip_score"):
        assert abs(checkpoint[key] - stage[key]) <= 1e-4 * max(1.0, stage[key]), (key, checkpoint, stage)
    tb = events(run_dir / "evaluate" / "tb")
    assert image_size(tb, "eval/samples") == (128, 4 * 128)   # rank 0's 4 samples, decoded at 128 px
    assert {s.step for s in tb.Scalars("eval/fd_dinov2")} == {3}
    distill = events(run_dir / "distill" / "tb")
    assert distill.Scalars("eval/clip_score")[-1].step == 3 and image_size(distill, "eval/samples")[0] == 128
    assert any(tag.startswith("run/recipe") for tag in distill.Tags()["tensors"])


def check_video_evaluation(run_dir, root):
    """CogVideoX from its ZeRO-3 checkpoint: both metrics, and a frame grid (a row of 8 of the 9 frames per video) in
    tensorboard."""
    metrics = evaluate_checkpoint(run_dir, *eval_settings(root))
    assert metrics["frames_per_sample"] == 9 and metrics["clip_score"] > 0 and metrics["fd_dinov2"] >= 0
    assert image_size(events(run_dir / "evaluate" / "tb"), "eval/frames") == (4 * 64, 8 * 64)   # rank 0: 4 videos


def check_model_card(run_dir, export_dir, root):
    """The export's README.md: its code block, run as written, draws the sample trainer.sample draws for the same
    prompt (the run's prompt 0) and seed, decoded by the same VAE; it carries the run's provenance."""
    import re
    from trainer.sample import main as sample_main
    card = (export_dir / "README.md").read_text()
    provenance = json.loads((run_dir / "provenance.jsonl").read_text().splitlines()[-1])
    assert "## Provenance" in card and provenance["source_sha256"] in card and "## Recipe" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(code, namespace)   # noqa: S102  (the card's own code, as a user would run it)
    pipe, sample = namespace["pipe"], namespace["sample"]
    latents_file = root / "card_latents.npz"
    assert sample_main([str(run_dir), "--num", "1", "--seed", "0", "--prompt-ids", "0", "--out", str(latents_file)]) == 0
    latents = torch.from_numpy(np.load(latents_file)["samples"])
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0], dtype=np.int16)
    assert np.abs(np.asarray(sample, dtype=np.int16) - expected).max() <= 1   # equal up to uint8 rounding


def check_lora_student(run_dir, pipeline):
    from safetensors.torch import load_file
    student = load_file(str(run_dir / "distill" / "student.safetensors"))
    teacher = load_file(os.path.join(pipeline, "transformer", "diffusion_pytorch_model.safetensors"))
    adapters = [k for k in student if ".lora_" in k]
    assert adapters and any(student[k].abs().max() > 0 for k in adapters if ".lora_B." in k)   # they trained
    for key, value in student.items():
        if ".lora_" not in key:
            assert torch.equal(value, teacher[key.replace(".base_layer.", ".")]), key


def same_denoiser(a, b):
    from safetensors.torch import load_file
    sub = "unet" if (a / "unet").is_dir() else "transformer"
    x = load_file(str(a / sub / "diffusion_pytorch_model.safetensors"))
    y = load_file(str(b / sub / "diffusion_pytorch_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
