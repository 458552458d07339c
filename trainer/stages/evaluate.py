"""The `evaluate` stage (toy families): the student's and the teacher's samples against the held-out data (FD,
precision, recall, class coverage; trainer/evaluation.py), metrics.json, PNG grids and tensorboard. The stage is
done once complete.json is written, after all of them: a kill in between reruns the whole stage."""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from parallel.distributed import barrier
from trainer.evaluation import eval_labels, metrics_for, sample_grid_png, train_classifier, write_metrics
from trainer.monitor import Monitor
from trainer.stages.artifacts import mark_stage_complete, method_label, stage_complete
from trainer.stages.students import draw_student_samples, draw_teacher_samples, load_student


def run_evaluate_stage(recipe, run_dir: str, dist_info, log) -> dict | None:
    """Rank 0 evaluates (the toy is small); other ranks wait. Returns the metrics dict on rank 0."""
    stage_dir = os.path.join(run_dir, "evaluate")
    metrics_path = os.path.join(stage_dir, "metrics.json")
    if not dist_info.is_main:
        barrier()
        return None
    os.makedirs(stage_dir, exist_ok=True)
    if stage_complete(stage_dir):
        log(f"[evaluate] done already: {metrics_path}")
        barrier()
        with open(metrics_path) as f:
            return json.load(f)
    shutil.rmtree(os.path.join(stage_dir, "tb"), ignore_errors=True)   # an interrupted attempt's partial events
    recipe, family, denoiser, generator = load_student(run_dir, recipe)
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
    write_metrics(metrics_path, metrics)
    grid_labels = eval_labels(ev.grid_samples if dataset.num_classes else 2000, dataset)
    grid_student = draw_student_samples(recipe, family, denoiser, generator, grid_labels, ev.sample_seed)
    grid_teacher = draw_teacher_samples(recipe, run_dir, family, grid_labels, ev.sample_seed, w)
    png_student = os.path.join(stage_dir, "student_samples.png")
    png_teacher = os.path.join(stage_dir, "teacher_samples.png")
    img = sample_grid_png(grid_student, dataset, png_student)
    img_teacher = sample_grid_png(grid_teacher, dataset, png_teacher)
    monitor = Monitor(os.path.join(stage_dir, "tb"), True, 0, 0, "evaluate", progress=False)
    for who in ("student", "teacher"):
        for key, value in metrics[who].items():
            monitor.writer.add_scalar(f"eval/{who}/{key}", value, 0)
    monitor.image("eval/student_samples", img, 0)
    monitor.image("eval/teacher_samples", img_teacher, 0)
    monitor.close()
    mark_stage_complete(stage_dir, [metrics_path, png_student, png_teacher, os.path.join(stage_dir, "tb")])
    barrier()
    return metrics
