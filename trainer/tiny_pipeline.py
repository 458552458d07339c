"""`python -m trainer.tiny_pipeline MODEL OUT_DIR`: a complete diffusers pipeline folder of a tiny twin with random
weights — denoiser, VAE, text encoders, tokenizers, scheduler and model_index.json, the layout of the hub's
pretrained pipelines — so that a tiny-twin recipe runs every path of the real one (text encoding, training, export
into the stock pipeline) with nothing downloaded. MODEL: sdxl_tiny, sd3_medium_tiny, sd35_large_tiny,
cogvideox_2b_tiny, cogvideox_5b_tiny.

Tokenizers are byte-level BPE without merges (docs/testing.md): any text, no vocabulary file. Text-encoder widths are
chosen so that the pipelines' own `encode_prompt` yields the widths the tiny denoisers take.
"""
from __future__ import annotations

import argparse
import os
import sys

import diffusers
import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import PreTrainedTokenizerFast
from transformers import T5Config, T5EncoderModel

from parallel.runtime_env import apply_runtime_defaults
from trainer.families import family_class
from trainer.families.configs import load_config


MODELS = ("sdxl_tiny", "sd3_medium_tiny", "sd35_large_tiny", "cogvideox_2b_tiny", "cogvideox_5b_tiny")
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
CLIP_TOKENS = 8     # the tiny CLIP tokenizers' model_max_length (SDXL's and SD3's 77)
T5_TOKENS = 8       # SD3's and CogVideoX's T5 tokens in the tiny twins (256 and 226 at full size)


def byte_level_tokenizer(max_length: int):
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                       special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_length, padding_side="right")


def clip(tokenizer, hidden: int, projection: int | None = None):
    """A 2-layer CLIP text encoder (the pipelines take the penultimate layer's tokens); with a projection when
    `projection` is given (the pooled embedding of SDXL's second and SD3's both encoders)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_TOKENS,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5(tokenizer, width: int):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def image_vae(latent_channels: int, **extra):
    """AutoencoderKL with SDXL's / SD3's 8x downsampling at 8-16 channels."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16],
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=128,
                         **extra)


def denoiser(model: str):
    name = "sdxl" if model.startswith("sdxl") else "sd3" if model.startswith("sd3") else "cogvideox"
    config = {k: v for k, v in load_config(model).items() if not k.startswith("_")}
    return family_class(name).denoiser_class.__mro__[1].from_config(config)   # the stock diffusers class


def build_pipeline(model: str, seed: int = 0):
    if model not in MODELS:
        raise ValueError(f"unknown tiny model '{model}' (one of {', '.join(MODELS)})")
    torch.manual_seed(seed)
    net = denoiser(model)
    if model == "sdxl_tiny":
        tok = byte_level_tokenizer(CLIP_TOKENS)
        return diffusers.StableDiffusionXLPipeline(
            vae=image_vae(4, scaling_factor=0.13025, force_upcast=True), text_encoder=clip(tok, 32),
            text_encoder_2=clip(tok, 32, projection=32), tokenizer=tok, tokenizer_2=tok, unet=net,
            scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012, timestep_spacing="trailing"))
    if model.startswith("sd3"):
        clip_tok, t5_tok = byte_level_tokenizer(CLIP_TOKENS), byte_level_tokenizer(T5_TOKENS)
        return diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=image_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False),
            text_encoder=clip(clip_tok, 16, projection=8), tokenizer=clip_tok,
            text_encoder_2=clip(clip_tok, 16, projection=8), tokenizer_2=clip_tok,
            text_encoder_3=t5(t5_tok, net.config.joint_attention_dim), tokenizer_3=t5_tok)
    t5_tok = byte_level_tokenizer(T5_TOKENS)
    vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1,
                                           norm_num_groups=2, temporal_compression_ratio=4,
                                           down_block_types=["CogVideoXDownBlock3D"] * 4,
                                           up_block_types=["CogVideoXUpBlock3D"] * 4)
    scheduler = diffusers.CogVideoXDDIMScheduler(snr_shift_scale=3.0 if "2b" in model else 1.0,
                                                 rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                                 timestep_spacing="trailing", beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012)
    return diffusers.CogVideoXPipeline(tokenizer=t5_tok, text_encoder=t5(t5_tok, net.config.text_embed_dim),
                                       vae=vae, transformer=net, scheduler=scheduler)


def save_tiny_pipeline(model: str, out_dir: str, seed: int = 0) -> str:
    build_pipeline(model, seed).save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m trainer.tiny_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=", ".join(MODELS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model not in MODELS:
        print(f"error: unknown tiny model '{args.model}' (hint: one of {', '.join(MODELS)})", file=sys.stderr)
        return 2
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        print(f"error: {args.out_dir} exists and is not empty (hint: pick a new folder; nothing was written)",
              file=sys.stderr)
        return 2
    save_tiny_pipeline(args.model, args.out_dir, args.seed)
    print(f"wrote the {args.model} pipeline to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
