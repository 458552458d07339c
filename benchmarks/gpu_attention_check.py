"""GPU check of the Ulysses attention (issue #7): one full-size CogVideoX attention layer (17,550 video + 226 text
tokens, bf16) forward + backward through the Ulysses processor at SP = 1 (its layout work without collectives)
beside diffusers' stock `CogVideoXAttnProcessor2_0`.

    python benchmarks/gpu_attention_check.py [--model cogvideox_2b] [--batch 1] [--repeats 10]

Without CUDA it runs the tiny twin's layer on the CPU (the dry run before spending device time). Prints one table:
milliseconds per forward + backward (median of --repeats after warm-up), the ratio and the largest output
difference. Well under a minute on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cogvideox_2b", choices=["cogvideox_2b", "cogvideox_5b"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from parallel.sequence import SequenceShards
    from trainer.families.cogvideox import CogVideoXTransformer, UlyssesCogVideoXAttnProcessor
    from trainer.families.configs import load_config
    cuda = torch.cuda.is_available()
    model_name = args.model if cuda else f"{args.model}_tiny"
    config = {k: v for k, v in load_config(model_name).items() if not k.startswith("_")}
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    layers = config["num_layers"]
    config["num_layers"] = 1                    # one block is enough to own one attention layer
    with torch.device(device):
        model = CogVideoXTransformer.from_config(config).to(dtype)
    attn = model.transformer_blocks[0].attn1
    width = attn.to_q.in_features
    # 49 frames at 720 x 480: 13 x 30 x 45 = 17,550 video tokens; the tiny twin: 3 x 4 x 4
    latent = (13, 16, 60, 90) if cuda else (3, 16, 8, 8)
    video_tokens = latent[0] * latent[2] * latent[3] // 4
    text_tokens = config["max_text_seq_length"]
    rotary = model.rotary_embedding(torch.zeros(1, *latent, device=device))
    generator = torch.Generator(device).manual_seed(0)
    video = torch.randn(args.batch, video_tokens, width, device=device, dtype=dtype, generator=generator)
    text = torch.randn(args.batch, text_tokens, width, device=device, dtype=dtype, generator=generator)

    def timed(processor):
        attn.set_processor(processor)
        times, out = [], None
        for i in range(args.repeats + 2):
            v, t = video.clone().requires_grad_(), text.clone().requires_grad_()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out_video, out_text = attn(hidden_states=v, encoder_hidden_states=t, image_rotary_emb=rotary)
            (out_video.float().sum() + out_text.float().sum()).backward()
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
            out = out_video.detach()
        return statistics.median(times), out

    stock_ms, stock_out = timed(CogVideoXAttnProcessor2_0())
    ulysses_ms, ulysses_out = timed(UlyssesCogVideoXAttnProcessor(SequenceShards()))
    print(f"{model_name} attention layer ({layers} per forward), batch {args.batch}, {video_tokens} video + "
          f"{text_tokens} text tokens, {dtype}, {device.type}: forward + backward ms (median of {args.repeats})")
    print(f"{'stock CogVideoXAttnProcessor2_0':<36} {stock_ms:>9.2f}")
    print(f"{'Ulysses processor, SP = 1':<36} {ulysses_ms:>9.2f}   ratio {ulysses_ms / stock_ms:.3f}")
    print(f"max |output difference|: {(stock_out.float() - ulysses_out.float()).abs().max().item():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
