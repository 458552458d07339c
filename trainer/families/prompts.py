"""The precomputed-embeddings path: a prompt file (one prompt per line) encoded ONCE by the teacher pipeline's own
text encoders and `encode_prompt` (so the embeddings are exactly what the stock pipeline feeds its denoiser), written
to `<run.dir>/prompts/embeddings.safetensors`, then held by the family as its prompt table.

Why precompute: SD3's T5-XXL (4.7 B parameters) and CogVideoX's T5 would otherwise sit beside the teacher, the fake
score and the student on every GPU; encoding once costs one pass per prompt and no memory during training. The table
is held in host memory, [P, L, D] per input (SD3 at bf16-free fp32: 5.5 MB per prompt; 10 k prompts, 55 GB): prompt
sets of that size want a stream of embeddings instead, which this path does not do yet.

Layout of the file: one tensor per conditioning input, [P, ...] (the family's `embedding_shapes()`), the empty
prompt's row under `empty.<name>` (the `uncond: empty_prompt` null branch), and `prompts_sha256` in the metadata,
checked on load so that an edited prompt file is re-encoded, never silently mixed.
"""
from __future__ import annotations

import hashlib
import os

import diffusers
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

EMBEDDINGS = os.path.join("prompts", "embeddings.safetensors")
CHUNK = 32   # prompts per encode_prompt call


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def prompts_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_text_pipeline(recipe):
    """The teacher's diffusers pipeline with its text encoders and tokenizers only (no denoiser, no VAE)."""
    name = recipe.family.name
    cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
           "cogvideox": diffusers.CogVideoXPipeline}[name]
    skip = {"unet": None} if name == "sdxl" else {"transformer": None}
    return cls.from_pretrained(recipe.teacher.pretrained, vae=None, **skip)


def encode(pipeline, family, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompts -> {name: [N, ...]} in the family's embedding layout, through the pipeline's `encode_prompt`."""
    name = family.cfg.name
    with torch.no_grad():
        if name == "sdxl":
            tokens, _, pooled, _ = pipeline.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            return {"encoder_hidden_states": tokens, "text_embeds": pooled}
        if name == "sd3":
            t5_tokens = family.cfg.prompt_length - pipeline.tokenizer_max_length
            if t5_tokens <= 0:
                raise ValueError(f"family.prompt_length {family.cfg.prompt_length}: SD3's prompts are "
                                 f"{pipeline.tokenizer_max_length} CLIP tokens then the T5 tokens (hint: prompt_length "
                                 f"must equal the encoded token count, {pipeline.tokenizer_max_length} + T5's)")
            tokens, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False,
                                                          max_sequence_length=t5_tokens)
            return {"encoder_hidden_states": tokens, "pooled_projections": pooled}
        tokens, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=family.prompt_length, device="cpu")
        return {"encoder_hidden_states": tokens}


def encode_prompt_file(recipe, run_dir: str, log, family_class) -> str:
    """Write <run_dir>/prompts/embeddings.safetensors for recipe.family.prompts unless it is there for the same file.
    Rank 0 only (the caller's barrier makes the others wait). Returns the path. family_class: the recipe's family
    (trainer/families/__init__.py `family_class`)."""
    path = os.path.join(run_dir, EMBEDDINGS)
    digest = prompts_digest(recipe.family.prompts)
    if os.path.isfile(path) and stored_digest(path) == digest:
        log(f"[prompts] encoded already: {path}")
        return path
    prompts = read_prompts(recipe.family.prompts)
    # the family for its embedding layout only: a placeholder table (one row per prompt) skips the random one
    family = family_class(recipe.family, recipe.teacher.pretrained,
                                              prompt_table={"placeholder": torch.empty(len(prompts), 0)})
    pipeline = load_text_pipeline(recipe)
    chunks = []
    for start in tqdm(range(0, len(prompts), CHUNK), desc="[prompts] encoding", unit="chunk"):
        chunks.append(encode(pipeline, family, prompts[start:start + CHUNK]))
    table = {name: torch.cat([c[name] for c in chunks]).float().contiguous() for name in chunks[0]}
    empty = encode(pipeline, family, [""])
    for name, shape in family.embedding_shapes().items():
        got = tuple(table[name].shape[1:])
        if got != tuple(shape):
            raise ValueError(f"family.prompts: the text encoders give {name} of shape {got}, the denoiser takes "
                             f"{tuple(shape)} (hint: family.prompt_length must equal the encoded token count)")
        table[f"empty.{name}"] = empty[name][0].float().contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(table, tmp, metadata={"prompts_sha256": digest, "num_prompts": str(len(prompts))})
    os.replace(tmp, path)
    log(f"[prompts] encoded {len(prompts)} prompts with the teacher's text encoders -> {path}")
    return path


def stored_digest(path: str) -> str | None:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("prompts_sha256")


def load_prompt_table(recipe) -> dict:
    """{name: [P, ...]} of the encoded prompt file, plus `empty.<name>` rows; a missing or stale file is an error
    naming the command that writes it."""
    path = os.path.join(recipe.run.dir, EMBEDDINGS)
    if not os.path.isfile(path) or stored_digest(path) != prompts_digest(recipe.family.prompts):
        raise FileNotFoundError(f"{path}: no embeddings of {recipe.family.prompts} (hint: run python -m trainer.main "
                                f"on the recipe; its first step encodes the prompt file)")
    return load_file(path)
