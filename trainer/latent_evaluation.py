"""Evaluation of a latent family's generator (SDXL, SD3, CogVideoX; docs/evaluation.md), on every rank: each rank
draws the evaluation samples whose index i has i % world_size == rank (noise keyed by (eval.sample_seed, i), so the
samples do not depend on the world size), decodes them with the teacher pipeline's VAE, and adds their DINOv2
features and CLIP scores to its metric states; the states are summed over ranks (trainer/image_metrics.py).

- Prompts: eval.prompts (held out; a file is encoded into <run.dir>/eval_prompts) or else the training prompts, rows
  0 .. N-1 cycled; metrics.json says which.
- FD-DINOv2's reference: eval.reference (real images' statistics from `python -m trainer.reference_stats`), or else
  the teacher's multi-step CFG samples for the same prompts and initial noise, computed once per run and kept in
  <run.dir>/evaluate/teacher_reference.safetensors (the same file format, so the same checks apply).
- Video: every decoded frame is scored as an image. fd_dinov2 compares the distribution of frames and clip_score
  averages over frames; neither sees motion or temporal consistency.

Used by the evaluate stage (the finished student), `python -m trainer.evaluate` (any checkpoint) and the distill
stage's in-loop evaluation (eval.every), always with a plain, whole generator module (the EMA weights) per rank.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from data.convert import is_prompt_file
from parallel.distributed import barrier, rank0_value
from parallel.loading import resolve_model_dir
from parallel.randomness import StepRandom
from trainer.families.latent import frame_grid
from trainer.families.prompts import StreamPromptTable
from trainer.image_metrics import ClipScore, FrechetDINOv2, ReferenceError
from trainer.sampling import student_sample, teacher_sample
from trainer.sections import RecipeError

EVAL_PROMPTS_DIR = "eval_prompts"
TEACHER_REFERENCE = "teacher_reference.safetensors"


def check_eval_models(recipe, config_path: str) -> None:
    """Before the first stage: the feature models and the teacher's VAE an evaluation of this run will load are
    here (a local folder or a cached hub id), so a missing one is one line now, not a failure after training."""
    ev = recipe.eval
    if recipe.family.name == "toy" or ("evaluate" not in recipe.stages and not ev.every):
        return
    for key, path, subfolder in (("eval.dinov2", ev.dinov2, None), ("eval.clip", ev.clip, None),
                                 ("teacher.pretrained", recipe.teacher.pretrained, "vae")):
        if path is None:
            continue
        try:
            folder = resolve_model_dir(path, subfolder)
        except OSError:
            folder = None
        if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
            where = f"{path}/{subfolder}" if subfolder else path
            raise RecipeError(config_path, key, f"'{where}' is neither a local model folder nor in the local hub "
                              f"cache (evaluation loads it)", "download it beforehand (huggingface-cli download), or "
                              "drop 'evaluate' from stages and eval.every")


def eval_prompt_path(recipe, run_dir: str) -> str | None:
    """The held-out prompts' stream: eval.prompts itself when it is a stream, <run_dir>/eval_prompts when it is a
    file (trainer/stages/__init__.py encodes it there), None without eval.prompts."""
    source = recipe.eval.prompts
    if source is None:
        return None
    return os.path.join(run_dir, EVAL_PROMPTS_DIR) if is_prompt_file(source) else source


class LatentEvaluator:
    """Feature models, VAE, prompts and reference of one run's evaluation, loaded once on this rank's device."""

    def __init__(self, recipe, family, run_dir: str, dist_info, log=print):
        ev = recipe.eval
        self.recipe, self.family, self.run_dir, self.dist, self.log = recipe, family, run_dir, dist_info, log
        self.device = dist_info.device
        self.vae = family.load_vae(self.device)
        if self.vae is None:
            raise FileNotFoundError(f"{recipe.teacher.pretrained}: no vae/ folder to decode the samples with (hint: "
                                    f"teacher.pretrained must name a diffusers pipeline folder or hub id)")
        stream = eval_prompt_path(recipe, run_dir)
        self.prompts = StreamPromptTable(stream, family.embedding_shapes()) if stream else family.prompts
        self.prompt_set = (f"held out: {ev.prompts} ({self.prompts.num_prompts} prompts)" if stream else
                           f"training prompts (rows 0..{min(ev.num_samples, family.num_prompts) - 1})")
        self.fd = FrechetDINOv2(ev.dinov2, ev.resolution, self.device) if ev.dinov2 else None
        self.clip = ClipScore(ev.clip, self.device) if ev.clip else None
        self.reference_source = None
        self.indices = list(range(dist_info.rank, ev.num_samples, dist_info.world_size))

    # --- the samples ------------------------------------------------------------------------------------------
    def chunks(self):
        size = self.recipe.eval.batch_size
        for start in range(0, len(self.indices), size):
            yield self.indices[start:start + size]

    def prompt_ids(self, indices) -> torch.Tensor:
        return torch.tensor(indices) % self.prompts.num_prompts

    def decoded(self, draw):
        """(indices, frames [n, F, 3, H, W]) per chunk of this rank's samples; draw(indices, cond, rand) -> latents."""
        for indices in self.chunks():
            cond = self.family.condition(self.prompts.rows(self.prompt_ids(indices)), self.device)
            rand = StepRandom(self.recipe.eval.sample_seed, 0, indices, self.device)
            # bf16 autocast on GPUs, as training runs its passes (the VAE decodes in fp32 regardless)
            with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
                yield indices, self.family.decode(self.vae, draw(indices, cond, rand))

    def score(self, indices, frames: torch.Tensor, reference: bool = False) -> None:
        flat = frames.flatten(0, 1)                                   # every frame an image
        if self.fd is not None:
            (self.fd.update_reference if reference else self.fd.update)(flat)
        if self.clip is not None and not reference:
            texts = self.prompts.texts(self.prompt_ids(indices).tolist())
            self.clip.update(flat, [t for t in texts for _ in range(frames.shape[1])])

    # --- FD-DINOv2's reference ----------------------------------------------------------------------------------
    def ensure_reference(self, load_teacher) -> None:
        """eval.reference, else the cached teacher reference, else the teacher's samples now (collective; written by
        rank 0). load_teacher() -> (teacher denoiser convention, teacher module on this device)."""
        if self.fd is None or self.fd.reference_ready:
            return
        ev = self.recipe.eval
        hint = "python -m trainer.reference_stats writes one for this eval section"
        if ev.reference is not None:
            meta = self.fd.load_reference(ev.reference, ev.num_samples, hint)
            self.reference_source = f"real: {ev.reference} ({meta['num_samples']} samples, {meta.get('source', '')})"
            return
        path = os.path.join(self.run_dir, "evaluate", TEACHER_REFERENCE)
        steps, w = self.recipe.teacher.sampler_steps, self.recipe.distill.method.guidance_scale
        source = (f"teacher {self.recipe.teacher.pretrained}, {steps} steps, CFG {w}, {ev.num_samples} samples of "
                  f"{self.prompt_set}, seed {ev.sample_seed}")
        if rank0_value(os.path.isfile(path)):
            try:
                self.fd.load_reference(path, ev.num_samples, "it is recomputed", source)
                self.reference_source = f"teacher: {path}"
                return
            except ReferenceError as e:   # another eval section made it: recompute (every rank saw the same file)
                self.log(f"[evaluate] {e}")
        self.log(f"[evaluate] the teacher's reference: {ev.num_samples} samples, {steps} steps, CFG {w}")
        denoiser, teacher = load_teacher()
        uncond_rows = self.family.null_condition

        def draw(indices, cond, rand):
            noise = rand.normal("eval_noise_0", self.family.data_shape)
            return teacher_sample(denoiser, teacher, noise, cond, uncond_rows(len(indices), self.device), w, steps)
        for indices, frames in self.decoded(draw):
            self.score(indices, frames, reference=True)
        self.fd.reduce_reference()
        if self.dist.is_main:
            self.fd.save_reference(path, source)
        barrier()
        self.reference_source = f"teacher: {path}"

    # --- one evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, denoiser, generator, timesteps: list[float], conditioning_timestep, load_teacher) -> tuple:
        """(metrics, grid): the generator's K-step samples scored on every rank (collective); grid: HWC uint8 of
        rank 0's first samples (None elsewhere)."""
        self.ensure_reference(load_teacher)
        grid, started = None, time.perf_counter()

        def draw(indices, cond, rand):
            noise_fn = lambda i: rand.normal(f"eval_noise_{i}", self.family.data_shape)  # noqa: E731
            return student_sample(denoiser, generator, cond, timesteps, noise_fn, conditioning_timestep)
        frames_per_sample = 1
        for indices, frames in self.decoded(draw):
            self.score(indices, frames)
            frames_per_sample = frames.shape[1]
            if grid is None and self.dist.is_main:
                grid = frame_grid(frames)
        seconds = time.perf_counter() - started
        ev = self.recipe.eval
        metrics = {"num_samples": ev.num_samples, "frames_per_sample": frames_per_sample,
                   "student_steps": len(timesteps), "prompt_set": self.prompt_set}
        if self.fd is not None:
            metrics["fd_dinov2"] = self.fd.compute()
            metrics["fd_reference"] = self.reference_source
            metrics["dinov2"], metrics["resolution"] = ev.dinov2, ev.resolution
        if self.clip is not None:
            metrics["clip_score"] = self.clip.compute()
            metrics["clip"] = ev.clip
        if frames_per_sample > 1:
            metrics["video_note"] = ("every decoded frame is scored as an image: fd_dinov2 compares frame "
                                     "distributions, clip_score averages over frames; neither measures motion")
        metrics["samples_per_second"] = ev.num_samples / max(seconds, 1e-9)   # all ranks together
        return metrics, grid


class InLoopEvaluation:
    """eval.every in the distill stage: every `every` steps the EMA weights are gathered whole on every rank into a
    plain generator module kept on the device, and evaluated. Cost: one full-parameter gather of the EMA (a reason
    to keep the cadence at hundreds of steps), one whole generator, the VAE and the feature models resident on each
    rank (the memory planner counts them), and the sampling time of eval.num_samples / world_size samples."""

    def __init__(self, recipe, run_dir: str, dist_info, family, build_generator, generator_denoiser, timesteps,
                 conditioning_timestep, load_teacher, log=print):
        self.every = recipe.eval.every
        self.recipe, self.run_dir, self.dist, self.family = recipe, run_dir, dist_info, family
        self.build_generator, self.load_teacher, self.log = build_generator, load_teacher, log
        self.denoiser, self.timesteps, self.conditioning = generator_denoiser, timesteps, conditioning_timestep
        self.evaluator, self.generator = None, None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, ema_state: dict) -> tuple[dict, np.ndarray | None]:
        """(metrics, grid) of the EMA weights `ema_state` (full tensors); collective."""
        if self.evaluator is None:
            self.evaluator = LatentEvaluator(self.recipe, self.family, self.run_dir, self.dist, self.log)
            self.generator = self.build_generator().to(self.dist.device).eval().requires_grad_(False)
        self.generator.load_state_dict(ema_state, strict=False)   # parameters only: buffers keep their values
        return self.evaluator.evaluate(self.denoiser, self.generator, self.timesteps, self.conditioning,
                                       self.load_teacher)
