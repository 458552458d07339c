"""The recipe's stages: `teacher` (toy only: train the teacher), `distill` (the method), `evaluate`.

Each stage writes into <run_dir>/<stage>/ and is skipped on rerun once its output exists; an unfinished stage resumes
from its last complete checkpoint. So rerunning the same command is how a run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from data.toy import ToyStream
from parallel.backend import build_backend
from parallel.distributed import barrier
from trainer.denoiser import Denoiser
from trainer.families import build_family
from trainer.methods import Nets, build_method
from trainer.methods.denoise import DenoisePretrain
from trainer.randomness import derive_seed
from trainer.schedules import build_schedule
from trainer.trainer import DistillTrainer, LoopConfig

TEACHER_FILE = "teacher.safetensors"
STUDENT_FILE = "student.safetensors"        # EMA of the generator: what evaluation, sampling and export use
GENERATOR_FILE = "generator.safetensors"    # the raw generator weights


def build_denoiser(recipe) -> Denoiser:
    s = recipe.schedule
    return Denoiser(build_schedule(s.prediction, s.beta_start, s.beta_end, s.snr_shift, s.zero_terminal_snr,
                                   s.shift), s.prediction)


def loop_config(train, seed: int) -> LoopConfig:
    return LoopConfig(steps=train.steps, batch_size=train.batch_size, micro_batch_size=train.micro_batch_size,
                      seed=seed, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                      keep_last=train.keep_last, bf16=train.bf16, sample_every=train.sample_every)


def save_atomic(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_fingerprint(path: str) -> str:
    """A cheap identity of a pretrained folder (config files' bytes, weight files' names and sizes): hashing every
    byte of a 16 GB teacher at each start would cost minutes."""
    if not os.path.isdir(path):
        return f"hub:{path}"
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            if name.endswith(".json"):
                with open(full, "rb") as f:
                    h.update(f.read())
            else:
                h.update(str(os.path.getsize(full)).encode())
    return h.hexdigest()


def teacher_path(recipe, run_dir: str) -> str:
    return recipe.teacher.pretrained or os.path.join(run_dir, "teacher", TEACHER_FILE)


def run_teacher_stage(recipe, run_dir: str, dist_info, log) -> None:
    stage_dir = os.path.join(run_dir, "teacher")
    out_path = os.path.join(stage_dir, TEACHER_FILE)
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
    trainer = DistillTrainer(stage_dir=stage_dir, stage_name="teacher", method=DenoisePretrain(recipe.teacher, family),
                             nets=Nets(generator=net), backend=backend, denoiser=build_denoiser(recipe),
                             family=family, loop=loop_config(train, seed), dist_info=dist_info, student_timesteps=[],
                             real_stream=ToyStream(family.dataset, seed), guards_cfg=recipe.guards)
    trainer.run()
    ema = backend.full_state("ema")   # a collective under sharded backends: every rank calls it
    if dist_info.is_main:
        save_atomic(ema, out_path)
    barrier()
    log(f"[teacher] wrote {out_path}")


def build_distill_nets(recipe, run_dir: str, backend, family, method) -> Nets:
    """Teacher (frozen) from its file; generator and fake score initialised from the teacher's weights; fresh
    heads (seeded). One optimizer per trainable role, and the generator's fp32 EMA."""
    seed = recipe.run.seed
    nets = {}
    with family.teacher_source(teacher_path(recipe, run_dir)) as source:   # read slice by slice, per rank
        for role in ("teacher",) + tuple(r for r in ("generator", "fake_score") if r in method.trains):
            nets[role] = backend.build_role(role, family.build_denoiser, source, trainable=role != "teacher")
    if "heads" in method.trains:
        torch.manual_seed(derive_seed(seed, "init_heads"))
        nets["heads"] = backend.build_role("heads", family.build_heads)
    for role in method.trains:   # optimizers on the placed (possibly sharded) parameters, before any forward
        backend.setup_optimizer(role, recipe.distill.optimizer[role])
    backend.setup_ema()
    backend.warm_up(family.example_inputs(2, backend.dist.device))
    return Nets(**{role: backend.modules[role] for role in nets})


def build_distill_trainer(recipe, run_dir: str, dist_info) -> DistillTrainer:
    stage_dir = os.path.join(run_dir, "distill")
    os.makedirs(stage_dir, exist_ok=True)
    family = build_family(recipe)
    denoiser = build_denoiser(recipe)
    method = build_method(recipe.distill.method)
    train = recipe.distill.train
    backend = build_backend(recipe.parallel, dist_info, family, train.grad_clip, train.ema_decay)
    nets = build_distill_nets(recipe, run_dir, backend, family, method)
    generator_cfg = recipe.distill.generator
    return DistillTrainer(stage_dir=stage_dir, stage_name=f"distill:{recipe.distill.method.name}", method=method,
                          nets=nets, backend=backend, denoiser=denoiser, family=family,
                          loop=loop_config(train, recipe.run.seed), dist_info=dist_info,
                          student_timesteps=denoiser.schedule.student_timesteps(generator_cfg.num_steps),
                          conditioning_timestep=generator_cfg.conditioning_timestep,
                          real_stream=real_data(recipe, family, dist_info, train.batch_size) if method.needs_real_data
                          else None, guards_cfg=recipe.guards)


def real_data(recipe, family, dist_info, global_batch: int):
    """The real-data source: an MDS `real_latents` stream when `data.real_remote` is set, else the bundled toy data."""
    d = recipe.data
    if d.real_remote is None:
        return ToyStream(family.dataset, recipe.run.seed)
    from data.streams import TrainingStream
    stream = TrainingStream("real_latents", d.real_remote, d.real_local, global_batch // dist_info.world_size,
                            recipe.run.seed, num_canonical_nodes=d.num_canonical_nodes, check_hashes=d.check_hashes)
    return StreamAdapter(stream)


class StreamAdapter:
    """Gives a real_latents stream the trainer's `batch(indices) -> (x, labels)` interface; the stream owns the
    data position (checkpointed through state_dict)."""

    def __init__(self, stream):
        self.stream = stream

    def batch(self, indices):
        b = self.stream.next_batch()
        if len(b.ids) != len(indices):
            raise ValueError(f"stream batch of {len(b.ids)} samples, the step needs {len(indices)}")
        return b.latents.float(), b.labels

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def run_distill_stage(recipe, run_dir: str, dist_info, log) -> None:
    stage_dir = os.path.join(run_dir, "distill")
    out_path = os.path.join(stage_dir, STUDENT_FILE)
    if os.path.isfile(out_path):
        log(f"[distill] done already: {out_path}")
        return
    trainer = build_distill_trainer(recipe, run_dir, dist_info)
    if dist_info.is_main:
        # frozen roles are recorded by path and hash, not copied into checkpoints
        t_path = teacher_path(recipe, run_dir)
        with open(os.path.join(stage_dir, "teacher_ref.json"), "w") as f:
            json.dump({"path": os.path.abspath(t_path) if os.path.exists(t_path) else t_path,
                       "sha256": file_sha256(t_path) if os.path.isfile(t_path) else folder_fingerprint(t_path)},
                      f, indent=1)
    trainer.run()
    generator, ema = trainer.backend.full_state("generator"), trainer.backend.full_state("ema")   # collectives
    if dist_info.is_main:
        save_atomic(generator, os.path.join(stage_dir, GENERATOR_FILE))
        save_atomic(ema, out_path)
    barrier()
    log(f"[distill] wrote {out_path}")


# ------------------------------------------------------------------------------------------------ sampling
def load_student(run_dir: str, recipe=None):
    """(recipe, family, denoiser, generator) of a finished distill stage, EMA weights, on the CPU."""
    from trainer.config import load_recipe
    recipe = recipe or load_recipe(os.path.join(run_dir, "config.yaml"))
    family = build_family(recipe)
    generator = family.build_denoiser()
    generator.load_state_dict(load_file(os.path.join(run_dir, "distill", STUDENT_FILE)))
    return recipe, family, build_denoiser(recipe), generator.eval().requires_grad_(False)


def draw_student_samples(recipe, family, denoiser, generator, labels: torch.Tensor, seed: int,
                         num_steps: int | None = None, batch: int = 1000) -> torch.Tensor:
    """[N, *data_shape] student samples with the student's own K-step sampler; noise keyed by (seed, sample index)."""
    from trainer.evaluation import eval_noise
    from trainer.sampling import student_sample
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


def draw_teacher_samples(recipe, run_dir, family, denoiser, labels: torch.Tensor, seed: int, guidance_scale: float):
    from trainer.evaluation import eval_noise
    from trainer.sampling import teacher_sample
    teacher = family.build_denoiser()
    teacher.load_state_dict(load_file(teacher_path(recipe, run_dir)))
    teacher.eval().requires_grad_(False)
    noise = eval_noise(len(labels), seed, family.data_shape, "teacher_noise")
    return teacher_sample(denoiser, teacher, noise, family.condition(labels),
                          family.null_condition(len(labels), "cpu"), guidance_scale, recipe.teacher.sampler_steps)


def run_evaluate_stage(recipe, run_dir: str, dist_info, log) -> dict | None:
    """Rank 0 evaluates (the toy is small); other ranks wait. Returns the metrics dict on rank 0."""
    from trainer.evaluation import (eval_labels, metrics_for, sample_grid_png, train_classifier, write_metrics)
    from trainer.monitor import Monitor
    stage_dir = os.path.join(run_dir, "evaluate")
    metrics_path = os.path.join(stage_dir, "metrics.json")
    if not dist_info.is_main:
        barrier()
        return None
    os.makedirs(stage_dir, exist_ok=True)
    if os.path.isfile(metrics_path):
        log(f"[evaluate] done already: {metrics_path}")
        barrier()
        return json.load(open(metrics_path))
    recipe, family, denoiser, generator = load_student(run_dir, recipe)
    dataset, ev = family.dataset, recipe.eval
    classifier = train_classifier(dataset)
    labels = eval_labels(ev.num_samples, dataset)
    w = recipe.distill.method.guidance_scale
    t0 = time.perf_counter()
    student = draw_student_samples(recipe, family, denoiser, generator, labels, ev.sample_seed)
    student_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = draw_teacher_samples(recipe, run_dir, family, denoiser, labels, ev.sample_seed, w)
    teacher_seconds = time.perf_counter() - t0
    # the real data's own figures (held-out vs a same-size draw of training data) calibrate the scale
    real_idx = torch.arange(min(len(dataset.train_x), ev.num_samples))
    metrics = {
        "dataset": dataset.name, "method": recipe.distill.method.name, "guidance_scale": w,
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
    grid_teacher = draw_teacher_samples(recipe, run_dir, family, denoiser, grid_labels, ev.sample_seed, w)
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
    barrier()
    return metrics
