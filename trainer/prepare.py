"""`python -m trainer.prepare {prompts,images} INPUT --recipe RECIPE --out DIR [options] [key=value ...]`: a caption
set and an image set -> the MDS streams a latent family trains on, with the recipe's own encoders (the teacher
pipeline's text encoders and VAE: `teacher.pretrained`, a diffusers pipeline folder or hub id).

  prompts FILE   a .txt (one prompt per line), .jsonl or .parquet file (column --column) -> a `prompts` stream:
                 each prompt's text and embeddings; point `family.prompts` at DIR
  images INPUT   a folder of images with same-stem .txt captions, or a .parquet file (--image-column holding
                 encoded image bytes, --caption-column) -> a `real_latents` stream: each image's VAE latent with its
                 own caption's embeddings (DMD2's real branch); point `data.real_remote` at DIR

Run it under torchrun to spread the work over GPUs (`torchrun --nproc-per-node 8 -m trainer.prepare ...`): each
rank encodes its parts on its own GPU (text encoders in bf16), a rerun writes only the missing parts, and the
result does not depend on the number of ranks. On CPU it runs in one process (tests, tiny twins). Progress with ETA
on rank 0. docs/data.md "From raw files to a running recipe".
"""
from __future__ import annotations

import argparse
import math
import sys

from diffusers import AutoencoderKL
from tqdm import tqdm

from data.convert import ConvertError, encode_images, is_prompt_file, list_images, open_images, read_parquet
from data.parts import PartsWriter, units_of_rank
from data.schemas import columns, embedding_columns
from data.streams import StreamError
from parallel.distributed import barrier, init_distributed, shutdown
from parallel.runtime_env import apply_runtime_defaults
from trainer.config import RecipeError, load_recipe
from trainer.families import build_family
from trainer.families.prompts import (PROMPTS_PER_PART, PromptFileError, TextEncoder, check_shapes,
                                      embedding_fields, encode_prompt_stream)

IMAGES_PER_PART = 256


def encode_image_stream(recipe, family, source: str, out: str, dist_info, image_column: str = "image",
                        caption_column: str = "caption", dtype: str = "float16", batch: int = 16,
                        vae_path: str | None = None, progress: bool = True) -> str:
    """Images (a folder with .txt captions, or a parquet file) -> a `real_latents` stream in `out`: VAE latents
    (fp16) with their captions' embeddings. Collective, resumable, independent of the number of ranks."""
    if recipe.family.name == "cogvideox":
        raise ConvertError("prepare images: CogVideoX trains on video latents, which this command does not write")
    items = (read_parquet(source, "images", "text", image_column, caption_column) if source.endswith(".parquet")
             else list_images(source))
    writer = PartsWriter(out, columns("real_latents", embedding_columns(family.embedding_shapes(), dtype)),
                         compression=None)
    num_units = math.ceil(len(items) / IMAGES_PER_PART)
    todo = [u for u in units_of_rank(num_units, dist_info.rank, dist_info.world_size) if not writer.done(u)]
    if todo:
        device = dist_info.device
        # fp32 VAE on every device: SDXL's VAE overflows in fp16, and encoding is a small part of the work
        vae = (AutoencoderKL.from_pretrained(vae_path) if vae_path else
               AutoencoderKL.from_pretrained(recipe.teacher.pretrained, subfolder="vae"))
        vae = vae.to(device).eval().requires_grad_(False)
        text = TextEncoder(recipe, family, device, batch)
        for unit in tqdm(todo, desc=f"[images] encoding {len(items)} images", unit="part", file=sys.stderr,
                         disable=not (progress and dist_info.is_main), mininterval=0 if sys.stderr.isatty() else 30):
            start = unit * IMAGES_PER_PART
            chunk = items[start:start + IMAGES_PER_PART]
            images = open_images(chunk, start)
            latents = [encode_images(vae, images[i:i + batch], recipe.family.resolution, device)
                       for i in range(0, len(images), batch)]
            latents = [latent for part in latents for latent in part]
            captions = [it["caption"] for it in chunk]
            embeddings = text(captions)
            check_shapes(family, embeddings, source)
            writer.write(unit, ({"id": start + k, "latent": latents[k].half().numpy(), "caption": captions[k],
                                 "label": -1, **embedding_fields(embeddings, k, dtype)} for k in range(len(chunk))))
    barrier()
    summary = writer.merge(num_units) if dist_info.is_main else ""
    barrier()
    return summary


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["prompts", "images"])
    parser.add_argument("input", help="the prompt file, or the image folder / parquet file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--recipe", required=True, help="the recipe whose family and teacher encode")
    parser.add_argument("--out", required=True, help="the stream's folder (a rerun resumes it)")
    parser.add_argument("--column", default="text", help="prompts: the prompts' column of a .jsonl / .parquet file")
    parser.add_argument("--image-column", default="image", help="images from parquet: the encoded image bytes")
    parser.add_argument("--caption-column", default="caption", help="images from parquet: the captions")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embeddings")
    parser.add_argument("--batch", type=int, default=64, help="prompts (images: images) per encoder call")
    parser.add_argument("--part-size", type=int, default=PROMPTS_PER_PART,
                        help="prompts: prompts per part (the unit of work, of resume and of spreading over ranks)")
    parser.add_argument("--vae", help="images: an AutoencoderKL folder or hub id (default: the teacher's vae/)")
    args = parser.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.family.name == "toy":
            raise RecipeError(f"{args.recipe}: family.name: the toy has no encoders (hint: python -m data.convert toy)")
        if recipe.teacher.pretrained is None:
            raise RecipeError(f"{args.recipe}: teacher.pretrained: needed for its text encoders (hint: a diffusers "
                              f"pipeline folder or hub id)")
        if args.what == "prompts" and not is_prompt_file(args.input):
            raise PromptFileError(f"{args.input}: not a prompt file (hint: a .txt, .jsonl or .parquet file)")
        if args.batch <= 0 or args.part_size <= 0:
            raise PromptFileError(f"--batch {args.batch} / --part-size {args.part_size}: must be positive")
        info = init_distributed()
        family = build_family(recipe, read_prompts=False)   # the embedding layout
        if args.what == "prompts":
            summary = encode_prompt_stream(recipe, family, args.input, args.out, info, args.column, args.dtype,
                                           args.batch, log=print if info.is_main else (lambda message: None),
                                           part_size=args.part_size)
        else:
            summary = encode_image_stream(recipe, family, args.input, args.out, info, args.image_column,
                                          args.caption_column, args.dtype, args.batch, args.vae)
    except (RecipeError, ConvertError, StreamError) as e:   # PromptFileError is a ConvertError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if info.is_main:
        print(f"wrote {summary}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
