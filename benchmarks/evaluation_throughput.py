"""Benchmark: what evaluating a latent family's student costs per sample on one device. Not run in CI (its --smoke
mode is).

    python benchmarks/evaluation_throughput.py [--size tiny|full] [--device cpu|cuda] [--samples N] [--batch B]

Runs trainer/latent_evaluation.py's own `LatentEvaluator` (the code of the evaluate stage, `python -m
trainer.evaluate` and eval.every) on SDXL and prints:
  1. seconds per sample of the whole evaluation: the student's sampling, the VAE decode, DINOv2 features and the
     CLIP score, and of the teacher reference (--teacher-steps CFG steps per sample, computed once per run);
  2. the parts timed apart on one batch, and the peak device memory.
--size tiny: the tiny SDXL twin with tiny random DINOv2 / CLIP (any device, seconds). --size full: SDXL's UNet
(2.6 B) and VAE at 1024 px, DINOv2-L (304 M) at 224 px and CLIP ViT-L/14 (428 M), random weights built from their
configs (nothing downloaded; the CLIP tokenizer is the twins' byte-level one with 77 tokens): the figures that size
eval.num_samples and eval.every for a real run. On CUDA the sampling runs under bf16 autocast and the VAE in fp32, as
in a run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import diffusers  # noqa: E402
import torch  # noqa: E402
import torchmetrics  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, Dinov2Config, Dinov2Model  # noqa: E402

from parallel.distributed import DistInfo  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.families.configs import load_config  # noqa: E402
from trainer.latent_evaluation import LatentEvaluator  # noqa: E402
from trainer.families.pixel_backbones import build_vision, vision_config  # noqa: E402
from trainer.sampling import student_sample  # noqa: E402
from trainer.stages.roles import build_denoiser, build_generator_denoiser  # noqa: E402
from trainer.tiny_pipeline import byte_level_tokenizer, save_tiny_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (recipe, DINOv2 config, CLIP text config, CLIP vision config, CLIP projection, CLIP tokens)
SIZES = {
    "tiny": ("recipes/tiny/sdxl_tiny.yaml", None,
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8), 16, 16),
    "full": ("recipes/sdxl/dmdx_1step.yaml",
             dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  patch_size=14, image_size=518),                                         # facebook/dinov2-large
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
             dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14), 768, 77),                               # openai/clip-vit-large-patch14
}


def save_models(size: str, folder: str) -> tuple[str, str, str]:
    """(pipeline folder, DINOv2 folder, CLIP folder) with random weights."""
    _, dino_config, text, vision, projection, tokens = SIZES[size]
    torch.manual_seed(0)
    if size == "tiny":
        pipeline = save_tiny_pipeline("sdxl_tiny", os.path.join(folder, "pipeline"))
        dino = build_vision("dinov2", vision_config("dinov2", "dinov2_tiny"))
    else:   # the UNet's config only (the generator is built on the device); the VAE with weights
        pipeline = os.path.join(folder, "pipeline")
        diffusers.UNet2DConditionModel.from_config(
            {k: v for k, v in load_config("sdxl").items() if not k.startswith("_")}).save_config(
            os.path.join(pipeline, "unet"))
        AutoencoderKL.from_config({k: v for k, v in load_config("sdxl_vae").items() if not k.startswith("_")}
                                  ).save_pretrained(os.path.join(pipeline, "vae"))
        dino = Dinov2Model(Dinov2Config(**dino_config))
    dino.save_pretrained(os.path.join(folder, "dinov2"))
    tokenizer = byte_level_tokenizer(tokens)
    clip_text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokens,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **text)
    CLIPModel(CLIPConfig(text_config=clip_text.to_dict(), vision_config=CLIPVisionConfig(**vision).to_dict(),
                         projection_dim=projection)).save_pretrained(os.path.join(folder, "clip"))
    tokenizer.save_pretrained(os.path.join(folder, "clip"))
    return pipeline, os.path.join(folder, "dinov2"), os.path.join(folder, "clip")


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny, 8 samples (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.samples, args.batch, args.device = "tiny", 8, 4, "cpu"
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"torchmetrics {torchmetrics.__version__}; device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        pipeline, dino, clip = save_models(args.size, folder)
        recipe = load_recipe(os.path.join(ROOT, SIZES[args.size][0]), [
            f"run.dir={os.path.join(folder, 'run')}", f"teacher.pretrained={pipeline}", f"eval.dinov2={dino}",
            f"eval.clip={clip}", f"eval.num_samples={args.samples}", f"eval.batch_size={args.batch}",
            f"teacher.sampler_steps={args.teacher_steps}", "stages=[distill]"])
        family = build_family(recipe)
        with torch.device(device):
            generator = family.build_denoiser().eval().requires_grad_(False)   # random: the cost is the same
        denoiser, teacher_denoiser = build_generator_denoiser(recipe), build_denoiser(recipe)
        evaluator = LatentEvaluator(recipe, family, recipe.run.dir, DistInfo(0, 1, 0, device), log=print)
        print(f"set-up (random models written and loaded) {time.perf_counter() - t0:.1f} s; {args.size} SDXL "
              f"{sum(p.numel() for p in generator.parameters()) / 1e9:.3f} B parameters, data {family.data_shape}")
        g = recipe.distill.generator
        timesteps = denoiser.schedule.student_timesteps(g.num_steps)
        conditioning = g.conditioning_timestep if g.num_steps == 1 else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, reference_seconds = timed(device, lambda: evaluator.ensure_reference(lambda: (teacher_denoiser, generator)))
        _, warm = timed(device, lambda: evaluator.evaluate(denoiser, generator, timesteps, conditioning, None))
        (metrics, _), seconds = timed(device, lambda: evaluator.evaluate(denoiser, generator, timesteps,
                                                                          conditioning, None))
        print(f"evaluation: {seconds / args.samples:.3f} s/sample over {args.samples} samples (first call "
              f"{warm / args.samples:.3f} s/sample); teacher reference ({args.teacher_steps} CFG steps): "
              f"{reference_seconds / args.samples:.3f} s/sample, once per run")
        print(f"  fd_dinov2 {metrics['fd_dinov2']:.4g}, clip_score {metrics['clip_score']:.4g} (random models: the "
              f"values mean nothing)")
        # the parts, on one batch
        indices = list(range(args.batch))
        cond = family.condition(evaluator.prompts.rows(evaluator.prompt_ids(indices)), device)
        noise = torch.randn(args.batch, *family.data_shape, device=device)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
        with torch.no_grad(), autocast:
            latents, sample_s = timed(device, lambda: student_sample(denoiser, generator, cond, timesteps,
                                                                     lambda i: noise, conditioning))
            frames, decode_s = timed(device, lambda: family.decode(evaluator.vae, latents))
        images = frames.flatten(0, 1)
        _, dino_s = timed(device, lambda: evaluator.fd.features(images))
        texts = evaluator.prompts.texts(indices)
        _, clip_s = timed(device, lambda: evaluator.clip.scores(images, texts))
        n = args.batch
        print(f"  per sample at batch {n}: sampling {sample_s / n * 1e3:.1f} ms, VAE decode {decode_s / n * 1e3:.1f} "
              f"ms, DINOv2 {dino_s / n * 1e3:.1f} ms, CLIP {clip_s / n * 1e3:.1f} ms")
        if device.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
