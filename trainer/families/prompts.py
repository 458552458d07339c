"""Prompts of the latent families (SDXL, SD3, CogVideoX): encoded once by the teacher pipeline's own text encoders and
`encode_prompt` into a `prompts` MDS stream, then read from it, never held whole in memory (docs/data.md "Prompt
embeddings").

Why precompute: SD3's T5-XXL (4.7 B parameters) and CogVideoX's T5 would otherwise sit beside the teacher, the fake
score and the student on every GPU; encoding once costs one pass per prompt. Why a stream: one prompt's embeddings
are 315 KB (SDXL, fp16) to 2.6 MB (SD3 at 333 tokens); a million prompts do not fit in a rank's host memory, let
alone once per rank. Training reads each step's rows from the stream like any other batch (exactly once per epoch,
resumable on any world size); sampling and tensorboard grids read a few rows by id (`StreamPromptTable`).

The stream (kind `prompts`, uncompressed so it is read in place and by row): per prompt `id` (its position in the
prompt file), `text`, `label` (-1), and `emb_<input>` per conditioning input of the denoiser (the family's
`embedding_shapes()`), float16 by default (MDS has no bfloat16; fp16 keeps CLIP's and T5's outputs, which are
layer-normed, to ~1e-3 relative) or float32. Beside index.json: `empty_prompt.safetensors` (the empty prompt's
embeddings, fp32: the `uncond: empty_prompt` null branch) and `source.json` (the prompt file's sha256 and the
encoding settings: a run dir's stream encoded from another file or with other settings is encoded again, a stream
the user made is refused as an output; never mixed).

Without `family.prompts` the family conditions on a small table of unit-variance random rows (`RandomPromptTable`:
tiny twins, benchmarks, the planner), at most `family.num_prompts` <= 4096 rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys

import diffusers
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.convert import ConvertError, read_prompt_texts
from data.parts import PartsWriter, units_of_rank
from data.schemas import EMBEDDING_PREFIX, columns, embedding_columns
from data.streaming_import import import_streaming
from data.streams import StreamError, read_index
from parallel.distributed import barrier, rank0_value

EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
SOURCE_FILE = "source.json"
PROMPTS_PER_PART = 1024   # the unit of work and of resume


class PromptFileError(ConvertError):
    """Prompts that cannot be encoded; the message names the file or folder, the problem, and a hint."""


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- encoding ----------------------------------------------------------------------------------------------------
# names, looked up on use: touching a pipeline class imports its transformers models (seconds, and warnings on
# every command that never encodes)
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "cogvideox": "CogVideoXPipeline"}


def load_text_pipeline(recipe, device, dtype=torch.float32):
    """The teacher's diffusers pipeline (folder or hub id) with its text encoders and tokenizers only, on `device`."""
    name = recipe.family.name
    skip = {"unet": None} if name == "sdxl" else {"transformer": None}
    pipeline = getattr(diffusers, PIPELINES[name]).from_pretrained(recipe.teacher.pretrained, vae=None, dtype=dtype, **skip)
    return pipeline.to(device)


@torch.no_grad()
def encode(pipeline, family, texts: list[str], device) -> dict[str, torch.Tensor]:
    """Prompts -> {input: [N, ...]} in the family's embedding layout, through the pipeline's own `encode_prompt`."""
    name = family.cfg.name
    if name == "sdxl":
        tokens, _, pooled, _ = pipeline.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return {"encoder_hidden_states": tokens, "text_embeds": pooled}
    if name == "sd3":
        t5_tokens = family.cfg.prompt_length - pipeline.tokenizer_max_length
        if t5_tokens <= 0:
            raise PromptFileError(f"family.prompt_length {family.cfg.prompt_length}: SD3's prompts are "
                                  f"{pipeline.tokenizer_max_length} CLIP tokens then the T5 tokens (hint: "
                                  f"prompt_length must equal the encoded token count, {pipeline.tokenizer_max_length} "
                                  f"+ T5's)")
        tokens, _, pooled, _ = pipeline.encode_prompt(texts, None, None, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=t5_tokens)
        return {"encoder_hidden_states": tokens, "pooled_projections": pooled}
    tokens, _ = pipeline.encode_prompt(texts, do_classifier_free_guidance=False,
                                       max_sequence_length=family.prompt_length, device=device)
    return {"encoder_hidden_states": tokens}


def check_shapes(family, encoded: dict[str, torch.Tensor], where: str) -> None:
    for name, shape in family.embedding_shapes().items():
        got = tuple(encoded[name].shape[1:])
        if got != tuple(shape):
            raise PromptFileError(f"{where}: the text encoders give {name} of shape {got}, the denoiser takes "
                                  f"{tuple(shape)} (hint: family.prompt_length must equal the encoded token count)")


class TextEncoder:
    """The family's text encoders on this rank's device: bf16 on CUDA (fp32 on CPU, where bf16 matmuls are slow),
    `batch` prompts per call."""

    def __init__(self, recipe, family, device, batch: int = 64, pipeline=None):
        """pipeline: one already built (benchmarks); default: the teacher's, loaded with load_text_pipeline."""
        self.family, self.device, self.batch = family, torch.device(device), batch
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipeline = pipeline if pipeline is not None else load_text_pipeline(recipe, self.device, self.dtype)
        # truncating a long caption to the encoders' tokens is what the stock pipelines do too; their warning per
        # call (with the cut text) would drown the progress bar over a million prompts
        diffusers.utils.logging.set_verbosity_error()

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{input: [N, ...]} float32 on the host."""
        parts = [encode(self.pipeline, self.family, texts[i:i + self.batch], self.device)
                 for i in range(0, len(texts), self.batch)]
        return {name: torch.cat([p[name] for p in parts]).float().cpu() for name in parts[0]}


def embedding_fields(embeddings: dict[str, torch.Tensor], k: int, dtype: str) -> dict[str, np.ndarray]:
    """Sample k's `emb_<input>` columns in the stored dtype."""
    return {EMBEDDING_PREFIX + name: value[k].numpy().astype(dtype) for name, value in embeddings.items()}


def encode_prompt_stream(recipe, family, source: str, out: str, dist_info, column: str = "text",
                         dtype: str = "float16", batch: int = 64, log=print, progress: bool = True,
                         part_size: int = PROMPTS_PER_PART, replace_stale: bool = False) -> str:
    """Encode the prompt file `source` into the `prompts` stream `out`. Collective: each rank encodes its parts
    (`part_size` prompts, round-robin) on its device; a rerun writes only the missing parts (a part's content
    depends only on its number, so any number of ranks writes the same stream); rank 0 merges. Returns a summary.
    replace_stale: see prepare_output."""
    settings = {"sha256": file_digest(source), "column": column, "dtype": dtype, "family": recipe.family.name,
                "embedding_shapes": {k: list(v) for k, v in family.embedding_shapes().items()},
                "part_size": part_size}   # not the batch: it changes rounding only, and a resume may pick another
    texts = read_prompt_texts(source, column)   # a bad file fails here, before anything is written
    problem = None
    if dist_info.is_main:
        try:
            prepare_output(out, settings, log, replace_stale)
        except PromptFileError as e:
            problem = str(e)
    problem = rank0_value(problem)   # every rank stops with rank 0's line, none waits at a barrier
    if problem:
        raise PromptFileError(problem)
    writer = PartsWriter(out, columns("prompts", embedding_columns(family.embedding_shapes(), dtype)),
                         compression=None)
    num_units = math.ceil(len(texts) / part_size)
    todo = [u for u in units_of_rank(num_units, dist_info.rank, dist_info.world_size) if not writer.done(u)]
    if todo or (dist_info.is_main and not os.path.isfile(os.path.join(out, EMPTY_PROMPT_FILE))):
        encoder = TextEncoder(recipe, family, dist_info.device, batch)
        if dist_info.is_main:
            empty = encoder([""])
            check_shapes(family, empty, source)
            save_file({name: value[0].contiguous() for name, value in empty.items()},
                      os.path.join(out, EMPTY_PROMPT_FILE))
        bar = tqdm(todo, desc=f"[prompts] encoding {len(texts)} prompts", unit="part", file=sys.stderr,
                   disable=not (progress and dist_info.is_main), mininterval=0 if sys.stderr.isatty() else 30)
        for unit in bar:
            start = unit * part_size
            chunk = texts[start:start + part_size]
            embeddings = encoder(chunk)
            check_shapes(family, embeddings, source)
            writer.write(unit, ({"id": start + k, "text": text, "label": -1, **embedding_fields(embeddings, k, dtype)}
                                for k, text in enumerate(chunk)))
    barrier()
    summary = writer.merge(num_units) if dist_info.is_main else ""
    barrier()
    return summary


def prepare_output(out: str, settings: dict, log, replace_stale: bool) -> None:
    """Rank 0: a stream in `out` encoded from another file or with other settings is removed with a line when
    `replace_stale` (the run dir's own copy of family.prompts), else refused (a stream the user made stays); the
    settings are recorded before any part is written."""
    path = os.path.join(out, SOURCE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == settings:
                return
        started = any(name.startswith("part_") for name in os.listdir(out))
        if started and not replace_stale:
            raise PromptFileError(f"{out}: holds prompts encoded from another file or with other settings "
                                  f"({SOURCE_FILE}) (hint: choose another --out, or delete it; nothing was changed)")
        log(f"[prompts] {out}: encoded from another prompt file or with other settings: encoding again")
        shutil.rmtree(out)
    elif os.path.isdir(out) and os.listdir(out):
        raise PromptFileError(f"{out}: exists and is not a prompt stream this command wrote (no {SOURCE_FILE}) "
                              f"(hint: choose another --out; nothing was changed)")
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)


def stream_encoded_from(out: str, source: str) -> bool:
    """Whether `out` is a complete prompt stream encoded from the file `source` as it is now."""
    path = os.path.join(out, SOURCE_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out, "index.json"))):
        return False
    with open(path) as f:
        return json.load(f).get("sha256") == file_digest(source)


# --- reading -----------------------------------------------------------------------------------------------------
class RandomPromptTable:
    """`num_prompts` unit-variance rows per conditioning input, a pure function of `seed` (tiny twins, benchmarks,
    the planner: no text, no encoders). Made on first use."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_prompts: int, seed: int):
        self.shapes, self.num_prompts, self.seed = shapes, num_prompts, seed
        self.empty = None
        self._rows = None

    def rows(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{input: [N, ...]} float32 on the host for prompt ids [N]."""
        if self._rows is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._rows = {name: torch.randn(self.num_prompts, *shape, generator=generator)
                          for name, shape in self.shapes.items()}
        return {name: table[ids] for name, table in self._rows.items()}

    def texts(self, ids) -> list[str]:
        return [f"random prompt {int(i)}" for i in ids]


class StreamPromptTable:
    """Rows of a local `prompts` stream by id (sampling, tensorboard grids, ODE-pair collection): only the asked
    rows are read. Training reads the same stream per batch instead (trainer/stages/training.py)."""

    def __init__(self, root: str, shapes: dict[str, tuple[int, ...]]):
        self.root, self.shapes = root, shapes
        self.num_prompts = sum(shard["samples"] for shard in read_index(root).get("shards", []))
        self._dataset = None
        empty = os.path.join(root, EMPTY_PROMPT_FILE)
        self.empty = load_file(empty) if os.path.isfile(empty) else None

    def _sample(self, i: int) -> dict:
        if self._dataset is None:
            self._dataset = import_streaming().base.local.LocalDataset(self.root)
        return self._dataset[int(i)]

    def rows(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        samples = [self._sample(i) for i in ids.tolist()]
        missing = [n for n in self.shapes if EMBEDDING_PREFIX + n not in samples[0]]
        if missing:
            raise StreamError(f"{self.root}: no {EMBEDDING_PREFIX}{missing[0]} column (hint: encode the prompts "
                              f"with python -m trainer.prepare prompts)")
        return {name: torch.from_numpy(np.stack([s[EMBEDDING_PREFIX + name] for s in samples])).float()
                for name in self.shapes}

    def texts(self, ids) -> list[str]:
        return [self._sample(i)["text"] for i in ids]
