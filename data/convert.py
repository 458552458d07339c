"""`python -m data.convert SOURCE INPUT --out DIR [options]`: inputs -> MDS shards.

  images  DIR          a folder of images (png, jpg, jpeg, webp; sorted by name) with optional same-stem .txt
                       captions -> `images` stream; with --vae VAE_DIR -> `real_latents` (VAE-encoded)
  prompts FILE.jsonl   one JSON object per line with "text" (or "prompt") and optional "label" -> `prompts`
                       (text only: `python -m trainer.prepare prompts` encodes prompts with a family's own text
                       encoders into the stream training reads)
  toy NAME             the bundled toy training split (digits, grid25, grid25u) -> `real_latents` ([D] vectors
                       with class labels), for DMD2's real branch through a stream
  parquet FILE         --kind prompts (column --text-column) or --kind images (columns --image-column holding
                       encoded image bytes, --caption-column)

The VAE loads with `from_pretrained` from a local folder or hub id (diffusers AutoencoderKL). Inputs are cut into chunks of --chunk items; chunk j goes to rank j mod world_size (run under
torchrun to spread the encoding) and is written atomically as its own part, so a rerun resumes where a crash left
off. Sample ids are input positions (0..N-1). A progress bar with ETA runs on rank 0.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm import tqdm

from data.parts import PartsWriter, units_of_rank
from data.schemas import columns
from data.toy import load_toy
from parallel.distributed import barrier, init_distributed, shutdown
from parallel.runtime_env import apply_runtime_defaults

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ConvertError(ValueError):
    pass


def list_images(folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder}: not a folder (hint: images takes a folder of image files)")
    items = []
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(IMAGE_SUFFIXES):
            caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
            caption = open(caption_path).read().strip() if os.path.isfile(caption_path) else ""
            items.append({"path": os.path.join(folder, name), "caption": caption})
    if not items:
        raise ConvertError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def is_prompt_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(PROMPT_FILE_SUFFIXES)


def read_jsonl_prompts(path: str, column: str = "text") -> list[dict]:
    """{text, label} per object of a jsonl file: `column` (else "prompt") and an optional "label"."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            text = obj.get(column, obj.get("prompt")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ConvertError(f"{path}:{line_no}: needs a string '{column}' (or 'prompt') field (hint: "
                                   f"--column / family.prompt_column names it)")
            items.append({"text": text, "label": int(obj.get("label", -1))})
    return items


def read_prompt_texts(path: str, column: str = "text") -> list[str]:
    """The prompts of a text file (one per non-empty line), a jsonl file (`column`, else "prompt", per object) or a
    parquet file (`column`). Held as a list of strings by the encoding command only (~100 B a prompt)."""
    if path.lower().endswith(".parquet"):
        names = pq.read_schema(path).names
        if column not in names:
            raise ConvertError(f"{path}: column '{column}' not found (has {names}) (hint: pass the caption "
                               f"column's name, --column / family.prompt_column)")
        texts = [t if t is not None else "" for t in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    elif path.lower().endswith(".jsonl"):
        texts = [item["text"] for item in read_jsonl_prompts(path, column)]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ConvertError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise ConvertError(f"{path}: no prompts")
    return texts


def read_parquet(path: str, kind: str, text_column: str, image_column: str, caption_column: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found")
    table = pq.read_table(path)
    needed = [text_column] if kind == "prompts" else [image_column, caption_column]
    for col in needed:
        if col not in table.column_names:
            raise ConvertError(f"{path}: column '{col}' not found (has {table.column_names}); hint: pass "
                               f"--{'text' if col == text_column else 'image' if col == image_column else 'caption'}"
                               f"-column")
    rows = table.to_pylist()
    if kind == "prompts":
        return [{"text": r[text_column], "label": int(r.get("label", -1) if r.get("label") is not None else -1)}
                for r in rows]
    out = []
    for r in rows:
        value = r[image_column]
        data = value.get("bytes") if isinstance(value, dict) else value
        out.append({"bytes": data, "caption": r[caption_column] or ""})
    return out


@torch.no_grad()
def encode_images(vae, images, resolution: int, device="cpu") -> torch.Tensor:
    """PIL images -> float32 latents [N, C, h, w] on the host: centre crop, resize to `resolution`, [-1, 1], VAE
    posterior mean (deterministic: the mean, not a sample, so reruns reproduce the stream), shifted and scaled by the
    VAE's shift and scaling factors (the denoiser's latent space). The VAE runs in its own dtype on `device`."""
    batch = []
    for img in images:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    pixels = torch.stack(batch).to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean.float()
    cfg = vae.config
    return ((latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).cpu()


def open_images(items: list[dict], start: int) -> list:
    """PIL images of image items (a file `path` or encoded `bytes`); an unreadable one is a ConvertError."""
    images = []
    for it in items:
        try:
            img = Image.open(it["path"]) if "path" in it else Image.open(io.BytesIO(it["bytes"]))
            img.load()
        except Exception as e:
            raise ConvertError(f"{it.get('path', f'row {start + len(images)}')}: not a readable image ({e})") from None
        images.append(img)
    return images


def chunk_samples(source: str, items: list[dict], start: int, vae, resolution: int) -> list[dict]:
    if source == "toy":
        return [{"id": start + i, "latent": it["latent"], "caption": "", "label": it["label"]}
                for i, it in enumerate(items)]
    if source == "prompts" or (source == "parquet" and "text" in items[0]):
        return [{"id": start + i, "text": it["text"], "label": it["label"]} for i, it in enumerate(items)]
    images = open_images(items, start)
    if vae is not None:
        latents = encode_images(vae, images, resolution)
        return [{"id": start + i, "latent": lat.half().numpy(), "caption": it["caption"], "label": -1}
                for i, (it, lat) in enumerate(zip(items, latents))]
    return [{"id": start + i, "image": img.convert("RGB"), "caption": it["caption"]}
            for i, (it, img) in enumerate(zip(items, images))]


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["images", "prompts", "parquet", "toy"])
    parser.add_argument("input")
    parser.add_argument("--out", required=True, help="output folder for the MDS stream")
    parser.add_argument("--kind", choices=["prompts", "images"], default="images", help="parquet only")
    parser.add_argument("--vae", help="AutoencoderKL folder or hub id: encode images to real_latents")
    parser.add_argument("--resolution", type=int, default=1024, help="image side before VAE encoding")
    parser.add_argument("--chunk", type=int, default=256, help="inputs per part (unit of work and of resume)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    args = parser.parse_args(argv)


    try:
        if args.source == "toy":
            if args.input not in ("digits", "grid25", "grid25u"):
                raise ConvertError(f"{args.input}: unknown toy dataset (digits, grid25, grid25u)")
            toy = load_toy(args.input)
            items = [{"latent": x.numpy().astype("float16"), "label": int(y) if toy.num_classes else -1}
                     for x, y in zip(toy.train_x, toy.train_y)]
        elif args.source == "images":
            items = list_images(args.input)
        elif args.source == "prompts":
            items = read_jsonl_prompts(args.input)
        else:
            items = read_parquet(args.input, args.kind, args.text_column, args.image_column, args.caption_column)
        if not items:
            raise ConvertError(f"{args.input}: no items")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.source == "prompts" or (args.source == "parquet" and args.kind == "prompts")
    if prompts and args.vae:
        print("error: --vae applies to images, not prompts", file=sys.stderr)
        return 2
    kind = "prompts" if prompts else ("real_latents" if args.vae or args.source == "toy" else "images")
    info = init_distributed()
    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False) if args.vae else None
    writer = PartsWriter(args.out, columns(kind))
    num_units = math.ceil(len(items) / args.chunk)
    todo = [u for u in units_of_rank(num_units, info.rank, info.world_size) if not writer.done(u)]
    try:
        for unit in tqdm(todo, desc=f"convert -> {kind}", unit="chunk", disable=not info.is_main, file=sys.stderr):
            start = unit * args.chunk
            writer.write(unit, chunk_samples(args.source, items[start:start + args.chunk], start, vae,
                                             args.resolution))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    barrier()
    if info.is_main:
        print(f"wrote {kind}: {writer.merge(num_units)}")
    barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
