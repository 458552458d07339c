"""The recipe's stages, in order: `teacher` (toy only: train the teacher), `collect` (teacher ODE pairs), `pretrain`
(regression or ADP on the pairs), `distill` (DMD / DMD2 / ADM), `evaluate`. DMDX = collect -> ADP -> ADM.

Each stage writes into <run_dir>/<stage>/ and is skipped on rerun once its output exists; an unfinished stage resumes
from its last complete checkpoint. So rerunning the same command is how a run resumes.
"""
from __future__ import annotations

import hashlib
import dataclasses
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
PIXEL_BACKBONE_FILE = "pixel_backbone.safetensors"   # the toy's ADP pixel-discriminator backbone (teacher stage)
STUDENT_FILE = "student.safetensors"        # EMA of the generator: what evaluation, sampling and export use
GENERATOR_FILE = "generator.safetensors"    # the raw generator weights


def build_denoiser(recipe) -> Denoiser:
    s = recipe.schedule
    return Denoiser(build_schedule(s.prediction, s.beta_start, s.beta_end, s.snr_shift, s.zero_terminal_snr,
                                   s.shift), s.prediction)


def build_generator_denoiser(recipe) -> Denoiser:
    """The student's own parameterisation (§10.7): the teacher's unless distill.generator.prediction says otherwise;
    an RF-velocity student of a DDPM teacher gets the plain (unshifted) straight path, as ADP trains it."""
    from trainer.config import generator_prediction
    prediction = generator_prediction(recipe)
    if prediction == recipe.schedule.prediction:
        return build_denoiser(recipe)
    s = recipe.schedule
    return Denoiser(build_schedule(prediction, s.beta_start, s.beta_end, 1.0, False, 1.0), prediction)


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


def pixel_backbone_path(recipe, run_dir: str) -> str:
    return os.path.join(run_dir, "teacher", PIXEL_BACKBONE_FILE)


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


def run_teacher_stage(recipe, run_dir: str, dist_info, log) -> None:
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


def build_stage_nets(recipe, run_dir: str, backend, family, method, optimizers: dict,
                     generator_init: str | None = None) -> Nets:
    """Frozen roles from their files (teacher; ADP's pixel backbone); the generator from `generator_init` (the
    pretrain stage's student) or the teacher's weights; the fake score from the teacher's weights (always fresh);
    fresh heads (seeded). One optimizer per trainable role, and the generator's fp32 EMA."""
    from trainer.attention import apply_attention
    seed = recipe.run.seed
    nets = {}
    build_denoiser = lambda: apply_attention(family.build_denoiser(), recipe.parallel.attention,  # noqa: E731
                                             backend.sequence)
    big_roles = tuple(r for r in ("teacher",) if r in method.frozen_roles) + tuple(
        r for r in ("generator", "fake_score") if r in method.trains and not (r == "generator" and generator_init))
    lora = recipe.distill.generator.lora
    with family.teacher_source(teacher_path(recipe, run_dir)) as source:   # read slice by slice, per rank
        for role in big_roles:
            if role == "generator" and lora is not None:
                from trainer.lora import add_lora, lora_source
                build_adapted = lambda: add_lora(build_denoiser(), lora)  # noqa: E731
                adapted = lora_source(source, build_adapted, derive_seed(seed, "init_lora"))
                nets[role] = backend.build_role(role, build_adapted, adapted, trainable=True)
                continue
            nets[role] = backend.build_role(role, build_denoiser, source, trainable=role != "teacher")
    if generator_init:
        from parallel.loading import StateSource
        with StateSource(generator_init) as source:
            nets["generator"] = backend.build_role("generator", build_denoiser, source, trainable=True)
    if "pixel_backbone" in method.frozen_roles:
        with family.pixel_backbone_source(pixel_backbone_path(recipe, run_dir)) as source:
            nets["pixel_backbone"] = backend.build_role("pixel_backbone", family.build_pixel_backbone, source,
                                                        trainable=False)
    if "heads" in method.trains:
        torch.manual_seed(derive_seed(seed, "init_heads"))
        nets["heads"] = backend.build_role("heads", lambda: method.build_heads(family))
    for role in method.trains:   # optimizers on the placed (possibly sharded) parameters, before any forward
        backend.setup_optimizer(role, optimizers[role])
    backend.setup_ema()
    backend.warm_up(family.example_inputs(2, backend.dist.device))
    return Nets(**{role: backend.modules[role] for role in nets})


def build_generator_module(recipe, family):
    """The generator's network as its stage trains it: the family's denoiser, with LoRA adapters when configured."""
    module = family.build_denoiser()
    if getattr(recipe.distill.generator, "lora", None) is not None:
        from trainer.lora import add_lora
        module = add_lora(module, recipe.distill.generator.lora)
    return module


def load_student_weights(module, path_or_state) -> None:
    """A stage's student file (or a state dict read from a checkpoint) into `module`. They hold parameters only (the
    EMA is kept for parameters), so buffers the constructor computed (SD3's position table) keep their values; any
    other difference is an error."""
    state = load_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    path = path_or_state if isinstance(path_or_state, str) else "the checkpoint"
    missing, unexpected = module.load_state_dict(state, strict=False)
    buffers = {name for name, _ in module.named_buffers()}
    wrong = [k for k in missing if k not in buffers] + list(unexpected)
    if wrong:
        raise KeyError(f"{path}: the weights do not fit the model (first keys: {wrong[:3]})")


def stage_student_path(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, stage, STUDENT_FILE)


def generator_init_path(recipe, run_dir: str, stage: str) -> str | None:
    """Where the distill stage's generator starts: distill.init_generator, else the pretrain stage's student when
    that stage is listed (DMDX: ADM starts from ADP's generator), else the teacher."""
    if stage != "distill":
        return None
    if recipe.distill.init_generator:
        return recipe.distill.init_generator
    return stage_student_path(run_dir, "pretrain") if "pretrain" in recipe.stages else None


def build_stage_trainer(recipe, run_dir: str, dist_info, stage: str = "distill") -> DistillTrainer:
    """The trainer of a training stage: `pretrain` (recipe.pretrain) or `distill` (recipe.distill)."""
    stage_dir = os.path.join(run_dir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    dist_info = dataclasses.replace(dist_info, sp=recipe.parallel.sp)   # data ranks: dp_rank, dp_size
    section = getattr(recipe, stage)
    family = build_family(recipe)
    denoiser, generator_denoiser = build_denoiser(recipe), build_generator_denoiser(recipe)
    method = build_method(section.method)
    train = section.train
    backend = build_backend(recipe.parallel, dist_info, family, train.grad_clip, train.ema_decay)
    nets = build_stage_nets(recipe, run_dir, backend, family, method, section.optimizer,
                            generator_init_path(recipe, run_dir, stage))
    generator_cfg = recipe.distill.generator
    if method.needs_pairs:
        data = pairs_data(recipe, run_dir, dist_info, train.batch_size)
    elif method.needs_real_data:
        data = real_data(recipe, family, dist_info, train.batch_size)
    else:
        data = None
    return DistillTrainer(stage_dir=stage_dir, stage_name=f"{stage}:{section.method.name}", method=method,
                          nets=nets, backend=backend, denoiser=denoiser, family=family,
                          loop=loop_config(train, recipe.run.seed), dist_info=dist_info,
                          student_timesteps=generator_denoiser.schedule.student_timesteps(generator_cfg.num_steps),
                          conditioning_timestep=generator_cfg.conditioning_timestep, real_stream=data,
                          guards_cfg=recipe.guards, generator_denoiser=generator_denoiser)


def build_distill_trainer(recipe, run_dir: str, dist_info) -> DistillTrainer:
    return build_stage_trainer(recipe, run_dir, dist_info, "distill")


def pairs_path(recipe, run_dir: str) -> str:
    return recipe.data.pairs_remote or recipe.collect.out or os.path.join(run_dir, "ode_pairs")


def pairs_data(recipe, run_dir: str, dist_info, global_batch: int):
    """The teacher ODE pairs (an `ode_pairs` MDS stream) as the trainer's `batch(indices) -> (noise, x0, labels)`."""
    from data.streams import TrainingStream
    d = recipe.data
    stream = TrainingStream("ode_pairs", pairs_path(recipe, run_dir), d.pairs_local,
                            global_batch // dist_info.dp_size, recipe.run.seed,
                            num_canonical_nodes=d.num_canonical_nodes, replication=replication(dist_info),
                            check_hashes=d.check_hashes,
                            workers=d.loader_workers)
    return StreamAdapter(stream, lambda b: (b.noise.float(), b.outputs.float(), b.labels))


def real_data(recipe, family, dist_info, global_batch: int):
    """The real-data source: an MDS `real_latents` stream when `data.real_remote` is set, else the bundled toy data."""
    d = recipe.data
    if d.real_remote is None:
        return ToyStream(family.dataset, recipe.run.seed)
    from data.streams import TrainingStream
    stream = TrainingStream("real_latents", d.real_remote, d.real_local, global_batch // dist_info.dp_size,
                            recipe.run.seed, num_canonical_nodes=d.num_canonical_nodes,
                            replication=replication(dist_info), check_hashes=d.check_hashes,
                            workers=d.loader_workers)
    return StreamAdapter(stream, lambda b: (b.latents.float(), b.labels))


def replication(dist_info) -> int | None:
    """Streaming's `replication`: the ranks of one sequence-parallel group read the same samples."""
    return dist_info.sp if dist_info.sp > 1 else None


class StreamAdapter:
    """Gives a stream the trainer's `batch(indices) -> tuple of [B, ...] tensors` interface (`fields` picks them from
    the typed batch); the stream owns the data position (checkpointed through state_dict)."""

    def __init__(self, stream, fields):
        self.stream, self.fields = stream, fields

    def batch(self, indices):
        b = self.stream.next_batch()
        if len(b.ids) != len(indices):
            raise ValueError(f"stream batch of {len(b.ids)} samples, the step needs {len(indices)}")
        return self.fields(b)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def prepare_prompts(recipe, run_dir: str, dist_info, log) -> None:
    """Encode family.prompts with the teacher's text encoders once, before any stage (rank 0; the rest wait)."""
    if getattr(recipe.family, "prompts", None) is None:
        return
    if dist_info.is_main:
        from trainer.families.prompts import encode_prompt_file
        encode_prompt_file(recipe, run_dir, log)
    barrier()


def run_collect_stage(recipe, run_dir: str, dist_info, log) -> None:
    """Teacher ODE pairs into <run_dir>/ode_pairs (or collect.out); a rerun writes only the missing parts."""
    from data.collect import collect_pairs
    out = pairs_path(recipe, run_dir)
    if os.path.isfile(os.path.join(out, "index.json")):
        log(f"[collect] done already: {out}")
        return
    message = collect_pairs(recipe, dist_info)
    log(f"[collect] wrote {message}")


def run_distill_stage(recipe, run_dir: str, dist_info, log, stage: str = "distill") -> None:
    """A training stage (`pretrain` or `distill`): resumes from its last checkpoint; writes the raw generator and
    its EMA (the student)."""
    stage_dir = os.path.join(run_dir, stage)
    out_path = os.path.join(stage_dir, STUDENT_FILE)
    if os.path.isfile(out_path):
        log(f"[{stage}] done already: {out_path}")
        return
    method = getattr(recipe, stage).method
    if stage == "pretrain" and getattr(method, "pixel_weight", 0) > 0:
        ensure_pixel_backbone(recipe, run_dir, dist_info, log)
    init = generator_init_path(recipe, run_dir, stage)
    if init and not os.path.isfile(init):
        raise FileNotFoundError(f"[{stage}] the generator's starting point {init} does not exist")
    trainer = build_stage_trainer(recipe, run_dir, dist_info, stage)
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
    log(f"[{stage}] wrote {out_path}")


# ------------------------------------------------------------------------------------------------ sampling
def final_stage(recipe) -> str | None:
    """The last training stage of the recipe: its student is the run's student."""
    return "distill" if "distill" in recipe.stages else "pretrain" if "pretrain" in recipe.stages else None


def method_label(recipe) -> str:
    """What produced the student: e.g. `adm`, `adp`, `adp+adm` (DMDX)."""
    names = [getattr(recipe, st).method.name for st in ("pretrain", "distill") if st in recipe.stages]
    if "distill" in recipe.stages and recipe.distill.init_generator:
        names.insert(0, "init")
    return "+".join(names)


def load_student(run_dir: str, recipe=None):
    """(recipe, family, generator denoiser, generator) of a finished run's last training stage, EMA weights, on
    the CPU."""
    from trainer.config import load_recipe
    recipe = recipe or load_recipe(os.path.join(run_dir, "config.yaml"))
    family = build_family(recipe)
    generator = build_generator_module(recipe, family)
    load_student_weights(generator, stage_student_path(run_dir, final_stage(recipe) or "distill"))
    return recipe, family, build_generator_denoiser(recipe), generator.eval().requires_grad_(False)


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


def load_teacher(recipe, run_dir: str, family):
    """The frozen teacher, whole, on the CPU (sampling, collection): the toy's file or a diffusers folder / hub id."""
    from parallel.loading import load_full_state
    teacher = family.build_denoiser()
    with family.teacher_source(teacher_path(recipe, run_dir)) as source:
        load_full_state(teacher, source)
    return teacher.eval().requires_grad_(False)


def draw_teacher_samples(recipe, run_dir, family, labels: torch.Tensor, seed: int, guidance_scale: float):
    from trainer.evaluation import eval_noise
    from trainer.sampling import teacher_sample
    denoiser = build_denoiser(recipe)
    teacher = load_teacher(recipe, run_dir, family)
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
    barrier()
    return metrics
