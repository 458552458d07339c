"""`python -m trainer.reference_stats SOURCE --recipe RECIPE --out FILE [--num N] [--batch B] [key=value ...]`

FD-DINOv2's reference statistics from real data, for `eval.reference` (docs/evaluation.md): the DINOv2 feature sums,
outer-product sums and count of SOURCE's images, with the feature model's hash, the resolution and the sample count
in the file's metadata (trainer/image_metrics.py), so that an evaluation with another model or resolution refuses it.
The feature model and resolution are the recipe's `eval.dinov2` and `eval.resolution`.

SOURCE: a folder of images, a parquet file with an `image` column (--image-column), or a `real_latents` stream
folder (python -m trainer.prepare images; its latents are decoded with the recipe teacher's VAE first). Works
single-process and under torchrun (image i goes to rank i % world size; the sums do not depend on the world size).
An existing --out is never overwritten. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from data.convert import ConvertError, list_images, open_images, read_parquet
from data.streaming_import import import_streaming
from parallel.distributed import barrier, init_distributed, shutdown
from parallel.runtime_env import apply_runtime_defaults
from trainer.config import RecipeError, load_recipe
from trainer.exit_codes import BAD_INPUT, OK
from trainer.families import build_family
from trainer.image_metrics import FrechetDINOv2, square


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.reference_stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder, parquet file or real_latents stream folder")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. eval.dinov2=facebook/dinov2-large")
    parser.add_argument("--recipe", required=True, help="the recipe whose eval section will read the file")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--num", type=int, default=None, help="use the first N samples (default: all)")
    parser.add_argument("--batch", type=int, default=32, help="images per feature-model call")
    parser.add_argument("--image-column", default="image", help="parquet: the image column")
    return parser.parse_intermixed_args(argv)


class ImageSource:
    """Images of a folder or parquet file: `batch(indices)` -> [n, 3, size, size] in [0, 1]."""

    def __init__(self, source: str, image_column: str, size: int):
        self.items = (read_parquet(source, "images", "text", image_column, image_column)
                      if source.endswith(".parquet") else list_images(source))
        self.size = size

    def __len__(self):
        return len(self.items)

    def batch(self, indices) -> torch.Tensor:
        images = open_images([self.items[i] for i in indices], indices[0])
        return torch.cat([square(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255)
                                 .permute(2, 0, 1)[None], self.size) for img in images])


class LatentSource:
    """A real_latents stream's latents decoded with the teacher's VAE: `batch(indices)` -> frames as images."""

    def __init__(self, source: str, recipe, device):
        self.dataset = import_streaming().base.local.LocalDataset(source)
        self.family = build_family(recipe, read_prompts=False)
        self.vae = self.family.load_vae(device)
        if self.vae is None:
            raise ConvertError(f"{recipe.teacher.pretrained}: no vae/ to decode {source}'s latents (hint: "
                               f"teacher.pretrained must be a diffusers pipeline)")

    def __len__(self):
        return len(self.dataset)

    def batch(self, indices) -> torch.Tensor:
        latents = torch.from_numpy(np.stack([self.dataset[int(i)]["latent"] for i in indices])).float()
        return self.family.decode(self.vae, latents).flatten(0, 1)


def main(argv=None) -> int:
    apply_runtime_defaults()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    ev = recipe.eval
    if ev.dinov2 is None:
        print(f"error: {args.recipe}: eval.dinov2: not set (hint: eval.dinov2=FOLDER_OR_HUB_ID, the model the "
              f"evaluation will use)", file=sys.stderr)
        return BAD_INPUT
    if os.path.exists(args.out):
        print(f"error: {args.out}: exists (hint: pick a new file; nothing was written)", file=sys.stderr)
        return BAD_INPUT
    if not os.path.exists(args.source):
        print(f"error: {args.source}: not found (hint: an image folder, a parquet file or a real_latents stream)",
              file=sys.stderr)
        return BAD_INPUT
    dist_info = init_distributed()
    try:
        fd = FrechetDINOv2(ev.dinov2, ev.resolution, dist_info.device)
        is_stream = os.path.isfile(os.path.join(args.source, "index.json"))
        source = (LatentSource(args.source, recipe, dist_info.device) if is_stream
                  else ImageSource(args.source, args.image_column, ev.resolution))
        total = min(len(source), args.num or len(source))
        if total < 2:
            raise ConvertError(f"{args.source}: {total} samples; the statistics need at least 2")
        mine = list(range(dist_info.rank, total, dist_info.world_size))
        chunks = [mine[i:i + args.batch] for i in range(0, len(mine), args.batch)]
        for chunk in tqdm(chunks, desc=f"[reference] {total} samples", unit="batch", file=sys.stderr,
                          disable=not dist_info.is_main, mininterval=0 if sys.stderr.isatty() else 30):
            with torch.no_grad():
                fd.update_reference(source.batch(chunk).to(dist_info.device))
        fd.reduce_reference()
        if dist_info.is_main:
            kind = "real_latents stream, decoded" if is_stream else "images"
            meta = fd.save_reference(args.out, f"{os.path.abspath(args.source)} ({kind}, first {total})")
            print(f"wrote {args.out}: {meta['num_samples']} {'frames' if is_stream else 'images'}, DINOv2 "
                  f"{ev.dinov2} (sha256 {meta['feature_model_sha256'][:12]}...), resolution {ev.resolution}; set "
                  f"eval.reference={args.out}")
        barrier()
    except (ConvertError, FileNotFoundError, OSError) as e:
        if dist_info.is_main:
            print(f"error: {e}", file=sys.stderr)
        shutdown()
        return BAD_INPUT
    shutdown()
    return OK


if __name__ == "__main__":
    sys.exit(main())
