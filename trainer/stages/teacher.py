"""The `teacher` stage (toy families only): train the teacher by denoising, and the toy's pixel backbone for ADP."""
from __future__ import annotations

import os

import torch

from data.toy import ToyStream
from parallel.backends import build_backend
from parallel.distributed import barrier
from parallel.randomness import derive_seed
from trainer.families import build_family
from trainer.methods import Nets
from trainer.methods.denoise import DenoisePretrain
from trainer.stages.artifacts import TEACHER_FILE, pixel_backbone_path, save_atomic, teacher_path
from trainer.stages.roles import build_denoiser
from trainer.trainer import StageTrainer, loop_config


def ensure_pixel_backbone(recipe, run_dir: str, dist_info, log) -> str:
    """The toy's pixel backbone (a classifier on the split disjoint from the evaluation classifier's), trained once
    by rank 0 in the teacher stage (or before ADP when the teacher is pretrained); deterministic."""
    path = pixel_backbone_path(recipe, run_dir)
    family = build_family(recipe)
    if dist_info.is_main and not os.path.isfile(path):
        state = family.train_pixel_backbone()   # None: the family loads a pretrained backbone instead
        if state is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_atomic(state, path)
            log(f"[teacher] wrote the pixel-discriminator backbone {path}")
    barrier()
    return path


def run_teacher_stage(recipe, run_dir: str, dist_info, log, provenance: dict | None = None) -> None:
    stage_dir = os.path.join(run_dir, "teacher")
    out_path = os.path.join(stage_dir, TEACHER_FILE)
    ensure_pixel_backbone(recipe, run_dir, dist_info, log)
    if recipe.teacher.pretrained or os.path.isfile(out_path):
        log(f"[teacher] done already: {teacher_path(recipe, run_dir)}")
        return
    family = build_family(recipe)
    seed = recipe.run.seed
    train = recipe.teacher.train
    backend = build_backend(recipe.parallel, dist_info, family, train.grad_clip, train.ema_decay)
    torch.manual_seed(derive_seed(seed, "init_teacher"))
    net = backend.build_role("generator", family.build_denoiser)
    backend.setup_optimizer("generator", recipe.teacher.optimizer)
    backend.setup_ema()
    backend.warm_up(family.example_inputs(2, dist_info.device))
    trainer = StageTrainer(stage_dir=stage_dir, stage_name="teacher", method=DenoisePretrain(recipe.teacher, family),
                           nets=Nets(generator=net), backend=backend, denoiser=build_denoiser(recipe),
                           family=family, loop=loop_config(train, seed), dist_info=dist_info, student_timesteps=[],
                           data_source=ToyStream(family.dataset, seed), guards_cfg=recipe.guards,
                           provenance=provenance)
    trainer.run()
    ema = backend.full_state("ema")   # a collective under sharded backends: every rank calls it
    if dist_info.is_main:
        save_atomic(ema, out_path)
    barrier()
    log(f"[teacher] wrote {out_path}")
