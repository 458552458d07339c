"""A finished run's student and teacher on the CPU, and their samples: what evaluation, `trainer.sample` and
`trainer.export` read."""
from __future__ import annotations

import os

import torch

from parallel.loading import load_full_state
from trainer.config import load_recipe
from trainer.evaluation import eval_noise
from trainer.families import build_family
from trainer.sampling import student_sample, teacher_sample
from trainer.stages.artifacts import final_stage, stage_student_path, teacher_path
from trainer.stages.roles import (build_denoiser, build_generator_denoiser, build_generator_module,
                                  load_student_weights)


def load_student(run_dir: str, recipe=None):
    """(recipe, family, generator denoiser, generator) of a finished run's last training stage, EMA weights, on
    the CPU."""
    recipe = recipe or load_recipe(os.path.join(run_dir, "config.yaml"))
    family = build_family(recipe, run_dir=run_dir)
    generator = build_generator_module(recipe, family)
    load_student_weights(generator, stage_student_path(run_dir, final_stage(recipe) or "distill"))
    return recipe, family, build_generator_denoiser(recipe), generator.eval().requires_grad_(False)


def draw_student_samples(recipe, family, denoiser, generator, labels: torch.Tensor, seed: int,
                         num_steps: int | None = None, batch: int = 1000) -> torch.Tensor:
    """[N, *data_shape] student samples with the student's own K-step sampler; noise keyed by (seed, sample index)."""
    g = recipe.distill.generator
    num_steps = num_steps or g.num_steps
    timesteps = denoiser.schedule.student_timesteps(num_steps)
    conditioning = g.conditioning_timestep if num_steps == 1 else None
    out = []
    for start in range(0, len(labels), batch):
        idx = range(start, min(start + batch, len(labels)))
        noise_fn = lambda i: eval_noise(len(labels), seed, family.data_shape, f"student_noise_{i}")[idx.start:idx.stop]  # noqa: E731
        out.append(student_sample(denoiser, generator, family.condition(labels[idx.start:idx.stop]), timesteps,
                                  noise_fn, conditioning))
    return torch.cat(out)


def load_teacher(recipe, run_dir: str, family):
    """The frozen teacher, whole, on the CPU (sampling, collection): the toy's file or a diffusers folder / hub id."""
    teacher = family.build_denoiser()
    with family.teacher_source(teacher_path(recipe, run_dir)) as source:
        load_full_state(teacher, source)
    return teacher.eval().requires_grad_(False)


def draw_teacher_samples(recipe, run_dir, family, labels: torch.Tensor, seed: int, guidance_scale: float):
    denoiser = build_denoiser(recipe)
    teacher = load_teacher(recipe, run_dir, family)
    noise = eval_noise(len(labels), seed, family.data_shape, "teacher_noise")
    return teacher_sample(denoiser, teacher, noise, family.condition(labels),
                          family.null_condition(len(labels), "cpu"), guidance_scale, recipe.teacher.sampler_steps)
