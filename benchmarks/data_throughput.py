"""Benchmark: the data path of a latent family at scale, per rank. Not run in CI (its --smoke mode is).

    python benchmarks/data_throughput.py [--size tiny|full] [--device cpu|cuda] [--prompts N] [--rows N] [--pairs N]

Prints three figures:
  1. prompts/s encoded: the family's text encoders through `trainer.prepare`'s own encoder (TextEncoder: the
     pipeline's `encode_prompt`, bf16 on CUDA), batches of --batch prompts.
  2. samples/s read from a prompt-embedding stream of SDXL-sized rows ([77, 2048] + [1280] fp16, 315 KB each),
     written once and read through `TrainingStream` at --read-batch per rank, beside what one SDXL training step
     consumes (about 4 samples/s per H200: the stock passes of one ADM generator update cost 238 ms per sample).
  3. ODE pairs/s collected: `trainer.stages.collect.PairCollector` (the collect stage's own code: the teacher on the
     device, bf16 autocast on CUDA) with --sampler-steps CFG steps, --pair-batch pairs per call.

--size tiny: the tiny SDXL twin (trainer/tiny_pipeline.py), any device. --size full: SDXL's full-size text encoders
(CLIP-L and CLIP-bigG) and UNet (2.6 B) with random weights built on the device (GPU check: a few minutes on one
H200, nothing downloaded; the tokenizer is the twins' byte-level one with SDXL's 77 tokens).
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
import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from data.parts import PartsWriter  # noqa: E402
from data.schemas import columns, embedding_columns  # noqa: E402
from data.streams import TrainingStream  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.families.prompts import TextEncoder  # noqa: E402
from trainer.stages.collect import PairCollector  # noqa: E402
from trainer.stages.roles import build_denoiser  # noqa: E402
from trainer.tiny_pipeline import build_pipeline, byte_level_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDXL_ROW = {"encoder_hidden_states": (77, 2048), "text_embeds": (1280,)}
STEP_CONSUMPTION = 4.0   # samples/s one H200 trains SDXL at (brief: 238 ms per sample of stock passes)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_text_pipeline(device, dtype):
    """SDXL's two text encoders at full size, random weights, built on the device (no UNet, no VAE)."""
    tok = byte_level_tokenizer(77)
    common = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="gelu")
    with torch.device(device):
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, **common))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280, **common))
    return diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=clip_l.to(dtype), text_encoder_2=clip_g.to(dtype),
                                               tokenizer=tok, tokenizer_2=tok, unet=None,
                                               scheduler=diffusers.EulerDiscreteScheduler())


def recipe_for(size: str, args):
    path = os.path.join(ROOT, "recipes", "sdxl", "dmdx_1step.yaml") if size == "full" else \
        os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
    resolution = [f"family.resolution={args.resolution}"] if args.resolution else []
    return load_recipe(path, ["teacher.pretrained=none/none", f"run.dir={args.dir}/run", *resolution,
                              f"collect.sampler_steps={args.sampler_steps}", f"collect.micro_batch={args.pair_batch}"])


def bench_encoding(recipe, family, args, device) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipeline = full_text_pipeline(device, dtype) if args.size == "full" else build_pipeline("sdxl_tiny").to(device)
    encoder = TextEncoder(recipe, family, device, args.batch, pipeline=pipeline)
    texts = [f"prompt {i}: a photograph of object {i % 97} in style {i % 13}, detailed" for i in range(args.prompts)]
    encoder(texts[:args.batch])   # warm-up
    sync(device)
    start = time.perf_counter()
    out = encoder(texts)
    sync(device)
    rate = len(texts) / (time.perf_counter() - start)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    print(f"encode: {rate:.1f} prompts/s per rank ({args.size} SDXL text encoders, {device.type}, batch {args.batch}; "
          f"out {shapes})", flush=True)
    return rate


def bench_stream(args) -> float:
    root = os.path.join(args.dir, "prompts")
    rng = np.random.default_rng(0)
    writer = PartsWriter(root, columns("prompts", embedding_columns(SDXL_ROW)), compression=None)
    rows = {f"emb_{k}": rng.standard_normal(v).astype(np.float16) for k, v in SDXL_ROW.items()}
    writer.write(0, ({"id": i, "text": f"prompt {i}", "label": -1, **rows} for i in range(args.rows)))
    writer.merge(1)
    stream = TrainingStream("prompts", root, None, args.read_batch, seed=0)
    stream.next_batch()   # opens and checks the stream (hashes) outside the timing
    batches = args.rows // args.read_batch - 1
    start = time.perf_counter()
    for _ in range(batches):
        batch = stream.next_batch()
    rate = batches * args.read_batch / (time.perf_counter() - start)
    mb = sum(v.nbytes for v in batch.embeddings.values()) / args.read_batch / 1e6
    print(f"stream: {rate:.0f} samples/s read per rank ({mb:.2f} MB per sample, batch {args.read_batch}), "
          f"{rate / STEP_CONSUMPTION:.0f}x what one SDXL step consumes (~{STEP_CONSUMPTION:.0f} samples/s per H200)",
          flush=True)
    return rate


def bench_pairs(recipe, family, args, device) -> float:
    torch.manual_seed(0)
    with torch.device(device):
        teacher = family.build_denoiser().eval().requires_grad_(False)
    collector = PairCollector(recipe, family, build_denoiser(recipe), teacher, device)
    collector.samples(range(min(args.pair_batch, 2)))   # warm-up
    sync(device)
    start = time.perf_counter()
    for first in range(0, args.pairs, args.pair_batch):
        collector.samples(range(first, min(first + args.pair_batch, args.pairs)))
    rate = args.pairs / (time.perf_counter() - start)   # samples() returns host arrays: the work is done
    print(f"collect: {rate:.2f} ODE pairs/s per rank ({args.size} SDXL UNet, {device.type}"
          f"{' bf16' if collector.on_gpu else ''}, {args.sampler_steps} CFG steps, {args.pair_batch} pairs per call, "
          f"latents {tuple(family.data_shape)})", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=1024, help="prompts to encode")
    parser.add_argument("--batch", type=int, default=64, help="prompts per encoder call")
    parser.add_argument("--rows", type=int, default=1024, help="SDXL-sized rows in the read benchmark's stream")
    parser.add_argument("--read-batch", type=int, default=4, help="samples per rank per read")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--pair-batch", type=int, default=16)
    parser.add_argument("--sampler-steps", type=int, default=25, help="the SDXL recipe's collect.sampler_steps")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the recipe's, 1024 at full "
                        "size); lower only to try the full-size path on a CPU")
    parser.add_argument("--skip", nargs="*", default=[], choices=["encode", "stream", "collect"])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.prompts, args.batch, args.rows, args.pairs, args.pair_batch, args.sampler_steps = \
            "tiny", 16, 8, 16, 4, 2, 2
    temporary = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="dmdx_data_bench_")
    device = torch.device(args.device)
    recipe = recipe_for(args.size, args)
    family = build_family(recipe, planning=True)   # the checked-in config: no pretrained folder needed
    try:
        if "encode" not in args.skip:
            bench_encoding(recipe, family, args, device)
        if "stream" not in args.skip:
            bench_stream(args)
        if "collect" not in args.skip:
            bench_pairs(recipe, family, args, device)
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
