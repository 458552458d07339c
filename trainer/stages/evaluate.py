"""The `evaluate` stage and what `python -m trainer.evaluate` shares with it (docs/evaluation.md).

- Toy families (rank 0; the toy is small): the student's and the teacher's samples against the held-out data (FD,
  precision, recall, class coverage; trainer/evaluation.py), metrics.json, PNG grids and tensorboard.
- Latent families (every rank; trainer/latent_evaluation.py): FD-DINOv2 and CLIP score of decoded samples,
  metrics.json, the decoded sample grid (PNG and tensorboard; video: a frame grid), the recipe and provenance as
  tensorboard text, and hparams.
The stage is done once complete.json is written, after all of them: a kill in between reruns the whole stage.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
from PIL import Image

from parallel.distributed import barrier, rank0_value
from trainer.evaluation import eval_labels, metrics_for, sample_grid_png, train_classifier, write_metrics
from trainer.latent_evaluation import LatentEvaluator
from trainer.monitor import Monitor
from trainer.stages.artifacts import final_stage, mark_stage_complete, method_label, stage_complete
from trainer.stages.roles import build_denoiser
from trainer.stages.students import draw_student_samples, draw_teacher_samples, load_student, load_teacher
from trainer.stages.training import run_text

EVALUATE_DIR = "evaluate"


def run_evaluate_stage(recipe, run_dir: str, dist_info, log) -> dict | None:
    """Returns the metrics dict on rank 0."""
    stage_dir = os.path.join(run_dir, EVALUATE_DIR)
    metrics_path = os.path.join(stage_dir, "metrics.json")
    if rank0_value(stage_complete(stage_dir)):
        log(f"[evaluate] done already: {metrics_path}")
        if not dist_info.is_main:
            return None
        with open(metrics_path) as f:
            return json.load(f)
    if dist_info.is_main:
        os.makedirs(stage_dir, exist_ok=True)
        shutil.rmtree(os.path.join(stage_dir, "tb"), ignore_errors=True)   # an interrupted attempt's partial events
    barrier()
    if recipe.family.name != "toy":
        recipe, family, denoiser, generator = load_student(run_dir, recipe)
        step = getattr(recipe, final_stage(recipe) or "distill").train.steps
        metrics, outputs = evaluate_latent(recipe, run_dir, dist_info, log, family, denoiser, generator, stage_dir,
                                           step, "the finished student (EMA)")
    elif dist_info.is_main:
        recipe, family, denoiser, generator = load_student(run_dir, recipe)
        metrics, outputs = evaluate_toy(recipe, run_dir, family, denoiser, generator, stage_dir)
    else:
        metrics, outputs = None, []
    if dist_info.is_main:
        mark_stage_complete(stage_dir, outputs)
    barrier()
    return metrics


def evaluate_toy(recipe, run_dir: str, family, denoiser, generator, out_dir: str, step: int = 0) -> tuple[dict, list]:
    """The toy's metrics of `generator` and of the teacher, written into out_dir (metrics.json, PNGs, tb/)."""
    metrics_path = os.path.join(out_dir, "metrics.json")
    dataset, ev = family.dataset, recipe.eval
    classifier = train_classifier(dataset)
    labels = eval_labels(ev.num_samples, dataset)
    w = recipe.distill.method.guidance_scale
    t0 = time.perf_counter()
    student = draw_student_samples(recipe, family, denoiser, generator, labels, ev.sample_seed)
    student_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = draw_teacher_samples(recipe, run_dir, family, labels, ev.sample_seed, w)
    teacher_seconds = time.perf_counter() - t0
    # the real data's own figures (held-out vs a same-size draw of training data) calibrate the scale
    real_idx = torch.arange(min(len(dataset.train_x), ev.num_samples))
    metrics = {
        "dataset": dataset.name, "method": method_label(recipe), "guidance_scale": w,
        "student_steps": recipe.distill.generator.num_steps, "teacher_sampler_steps": recipe.teacher.sampler_steps,
        "num_samples": ev.num_samples, "heldout_samples": len(dataset.heldout_x),
        "student": metrics_for(student, labels, dataset, classifier),
        "teacher": metrics_for(teacher, labels, dataset, classifier),
        "train_data": metrics_for(dataset.train_x[real_idx], dataset.train_y[real_idx], dataset, classifier),
        "student_samples_per_second": len(labels) / student_seconds,
        "teacher_samples_per_second": len(labels) / teacher_seconds,
    }
    metrics["fd_ratio_student_over_teacher"] = metrics["student"]["fd"] / max(metrics["teacher"]["fd"], 1e-12)
    os.makedirs(out_dir, exist_ok=True)
    write_metrics(metrics_path, metrics)
    grid_labels = eval_labels(ev.grid_samples if dataset.num_classes else 2000, dataset)
    grid_student = draw_student_samples(recipe, family, denoiser, generator, grid_labels, ev.sample_seed)
    grid_teacher = draw_teacher_samples(recipe, run_dir, family, grid_labels, ev.sample_seed, w)
    png_student = os.path.join(out_dir, "student_samples.png")
    png_teacher = os.path.join(out_dir, "teacher_samples.png")
    img = sample_grid_png(grid_student, dataset, png_student)
    img_teacher = sample_grid_png(grid_teacher, dataset, png_teacher)
    monitor = Monitor(os.path.join(out_dir, "tb"), True, 0, 0, "evaluate", progress=False)
    for who in ("student", "teacher"):
        for key, value in metrics[who].items():
            monitor.writer.add_scalar(f"eval/{who}/{key}", value, step)
    monitor.image("eval/student_samples", img, step)
    monitor.image("eval/teacher_samples", img_teacher, step)
    monitor.close()
    return metrics, [metrics_path, png_student, png_teacher, os.path.join(out_dir, "tb")]


def evaluate_latent(recipe, run_dir: str, dist_info, log, family, denoiser, generator, out_dir: str, step: int,
                    weights: str) -> tuple[dict | None, list]:
    """A latent family's metrics of `generator` (a whole module, on any device; moved to this rank's), on every rank
    (collective); rank 0 writes metrics.json, samples.png and tensorboard (tb/ in the run's evaluate folder, at
    `step`). Returns (metrics, written paths) on rank 0, (None, []) elsewhere."""
    evaluator = LatentEvaluator(recipe, family, run_dir, dist_info, log)
    device = dist_info.device
    generator = generator.to(device)
    g = recipe.distill.generator
    timesteps = denoiser.schedule.student_timesteps(g.num_steps)
    conditioning = g.conditioning_timestep if g.num_steps == 1 else None

    def teacher():
        return build_denoiser(recipe), load_teacher(recipe, run_dir, family).to(device)
    metrics, grid = evaluator.evaluate(denoiser, generator, timesteps, conditioning, teacher)
    if not dist_info.is_main:
        return None, []
    metrics = {"step": step, "weights": weights, "method": method_label(recipe), "family": recipe.family.name,
               **metrics}
    os.makedirs(out_dir, exist_ok=True)
    metrics_path, png = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "samples.png")
    write_metrics(metrics_path, metrics)
    Image.fromarray(grid).save(png)
    tb = os.path.join(run_dir, EVALUATE_DIR, "tb")
    monitor = Monitor(tb, True, 0, 0, "evaluate", progress=False)
    for key in ("fd_dinov2", "clip_score"):
        if key in metrics:
            monitor.writer.add_scalar(f"eval/{key}", metrics[key], step)
    monitor.image("eval/samples" if metrics["frames_per_sample"] == 1 else "eval/frames", grid, step)
    for tag, text in run_text(recipe, run_dir).items():
        monitor.writer.add_text(tag, text, step)
    monitor.writer.add_hparams(hparams(recipe), {f"hparam/{k}": metrics[k] for k in ("fd_dinov2", "clip_score")
                                                 if k in metrics}, run_name=f"hparams_step_{step}")
    monitor.close()
    log(f"[evaluate] step {step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in ("fd_dinov2", "clip_score")
                                                 if k in metrics) + f" ({metrics['prompt_set']}) -> {metrics_path}")
    return metrics, [metrics_path, png, tb]


def hparams(recipe) -> dict:
    """The settings a sweep varies, flat, for tensorboard's hparams view."""
    d = recipe.distill
    out = {"method": method_label(recipe), "family": recipe.family.name, "student_steps": d.generator.num_steps,
           "guidance_scale": d.method.guidance_scale, "batch_size": d.train.batch_size, "steps": d.train.steps,
           "ema_decay": d.train.ema_decay}
    for role, opt in d.optimizer.items():
        out[f"lr_{role}"] = opt.lr
    return out
