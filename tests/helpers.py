"""Small builders shared by tests: a tiny toy recipe with a random teacher saved to a temp dir."""
from __future__ import annotations

import os
from collections import defaultdict

import torch
from safetensors.torch import save_file

from parallel.distributed import DistInfo
from trainer.config import load_recipe
from trainer.families import build_family
from trainer.stages.collect import collect_pairs
from trainer.stages.teacher import ensure_pixel_backbone
from trainer.stages.training import build_stage_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "recipes", "tiny", "toy_smoke.yaml")
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_recipe(tmp_path, *overrides):
    run_dir = str(tmp_path / "run")
    return load_recipe(SMOKE, [f"run.dir={run_dir}", "family.hidden=32", "distill.train.batch_size=8",
                               *overrides])


def random_teacher(tmp_path, recipe, seed=0) -> str:
    torch.manual_seed(seed)
    net = build_family(recipe).build_denoiser()
    path = str(tmp_path / "teacher.safetensors")
    save_file(net.state_dict(), path)
    return path


def distill_trainer(tmp_path, *overrides):
    """A StageTrainer over a random teacher (teacher.pretrained), built but not run."""
    recipe = tiny_recipe(tmp_path, "stages=[teacher,distill]", *overrides)
    path = random_teacher(tmp_path, recipe)
    recipe = tiny_recipe(tmp_path, f"teacher.pretrained={path}", "stages=[distill]", *overrides)
    return build_stage_trainer(recipe, recipe.run.dir, SINGLE)


def pretrain_trainer(tmp_path, *overrides):
    """A pretrain-stage trainer (regression or ADP) over a random teacher, with real ODE pairs collected from it
    (32 pairs, 4 sampler steps) and the toy's pixel backbone; built but not run."""
    recipe = tiny_recipe(tmp_path, *overrides)
    path = random_teacher(tmp_path, recipe)
    recipe = tiny_recipe(tmp_path, f"teacher.pretrained={path}", "stages=[collect,pretrain]",
                         "pretrain.train.batch_size=8", "collect.num_pairs=32", "collect.micro_batch=16",
                         "collect.sampler_steps=4", *overrides)
    collect_pairs(recipe, SINGLE, progress=False)
    ensure_pixel_backbone(recipe, recipe.run.dir, SINGLE, lambda message: None)
    return build_stage_trainer(recipe, recipe.run.dir, SINGLE, "pretrain")


def saved_vision(kind: str, folder: str) -> str:
    """A tiny random SAM / DINOv2 vision model saved with save_pretrained (what a pretrained backbone folder holds)."""
    from trainer.families.pixel_backbones import build_vision, vision_config
    torch.manual_seed(0)
    model = build_vision(kind, vision_config(kind, f"{kind}_tiny"))
    model.save_pretrained(folder)
    return folder


def saved_clip(folder: str, seed: int = 3) -> str:
    """A tiny random CLIP (text + vision, 32 px) with a byte-level tokenizer, saved with save_pretrained. Seed 3
    gives positive image-text cosines on random images (scores above CLIP score's clamp at 0)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    from trainer.tiny_pipeline import byte_level_tokenizer
    tokenizer = byte_level_tokenizer(16)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
              ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: str) -> str:
    """A diffusers-layout folder with the tiny twin's random UNet (unet/) and VAE (vae/)."""
    from diffusers import AutoencoderKL
    from trainer.families.configs import load_config
    from trainer.families.sdxl import SDXLUNet
    torch.manual_seed(0)
    unet = {k: v for k, v in load_config("sdxl_tiny").items() if not k.startswith("_")}
    SDXLUNet.from_config(unet).save_pretrained(os.path.join(folder, "unet"))
    vae = {k: v for k, v in load_config("sdxl_vae_tiny").items() if not k.startswith("_")}
    AutoencoderKL.from_config(vae).save_pretrained(os.path.join(folder, "vae"))
    return folder


def recorded_steps(trainer, steps: int) -> tuple[dict, dict]:
    """Run `steps` steps of the real `train_step` and record ({phase/role: step-0 full gradients before clipping},
    {step: rank-reduced losses}) through its after-phase hook. Collective under sharded backends: call on all
    ranks."""
    grads = {}

    def record(step, phase, out):
        if step == 0:
            for role in phase.updates:
                grads[f"{phase.name}/{role}"] = trainer.backend.full_grads(role)

    trainer.after_phase = record
    losses = {}
    for step in range(steps):
        sums = defaultdict(list)
        trainer.train_step(step, sums)
        losses[step] = trainer.reduce_metrics({k: v for k, v in sums.items() if k.startswith("loss/")})
    trainer.after_phase = None
    return grads, losses


def sdxl_tiny_embedding_shapes() -> dict:
    """The tiny SDXL twin's conditioning inputs (its checked-in config)."""
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"), ["teacher.pretrained=none/none"])
    return build_family(recipe, planning=True).embedding_shapes()   # planning: the checked-in config


def write_embedded_stream(folder: str, kind: str, count: int, shapes: dict, latent_shape: tuple | None = None,
                          seed: int = 0, dtype: str = "float16") -> str:
    """A `prompts` or `real_latents` stream of `count` samples with random `emb_*` rows of `shapes` (and random
    latents of `latent_shape`), uncompressed, one part: synthetic stand-ins for trainer.prepare's output."""
    import numpy as np
    from data.parts import PartsWriter
    from data.schemas import columns, embedding_columns
    rng = np.random.default_rng(seed)
    writer = PartsWriter(folder, columns(kind, embedding_columns(shapes, dtype)), compression=None)

    def sample(i):
        emb = {f"emb_{name}": rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}
        if kind == "prompts":
            return {"id": i, "text": f"prompt {i}", "label": -1, **emb}
        return {"id": i, "latent": rng.standard_normal(latent_shape).astype(np.float16), "caption": f"caption {i}",
                "label": -1, **emb}
    writer.write(0, (sample(i) for i in range(count)))
    writer.merge(1)
    return folder
