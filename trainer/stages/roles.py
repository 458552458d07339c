"""The one role assembly: which roles a stage builds, from which weights, in which order (docs/design.md "Roles").

The training stages call `assemble_roles` with the run's weight files; the memory planner (trainer/memory_plan.py)
and the benchmarks call it with `fresh=True` (seeded random weights, no files). Both go through the backend's
`build_role`, and so through parallel/parallelize.py: the plan traces exactly the roles and transforms a run uses.
"""
from __future__ import annotations

import contextlib

import torch
from safetensors.torch import load_file

from parallel.loading import StateSource
from parallel.randomness import derive_seed
from trainer.denoiser import Denoiser
from trainer.lora import add_lora, lora_source
from trainer.methods import Nets
from trainer.schedules import build_schedule
from trainer.stages.artifacts import pixel_backbone_path, teacher_path
from trainer.validate import generator_prediction


def build_denoiser(recipe) -> Denoiser:
    """The teacher's schedule and parameterisation (docs/algorithms.md "One denoiser")."""
    s = recipe.schedule
    return Denoiser(build_schedule(s.prediction, s.beta_start, s.beta_end, s.snr_shift, s.zero_terminal_snr,
                                   s.shift), s.prediction)


def build_generator_denoiser(recipe) -> Denoiser:
    """The student's own parameterisation (docs/algorithms.md "The student's parameterisation"): the teacher's
    unless distill.generator.prediction says otherwise; an RF-velocity student of a DDPM teacher gets the plain
    (unshifted) straight path, as ADP trains it."""
    prediction = generator_prediction(recipe)
    if prediction == recipe.schedule.prediction:
        return build_denoiser(recipe)
    s = recipe.schedule
    return Denoiser(build_schedule(prediction, s.beta_start, s.beta_end, 1.0, False, 1.0), prediction)


def build_generator_module(recipe, family):
    """The generator's network as its stage trains it: the family's denoiser, with LoRA adapters when configured."""
    module = family.build_denoiser()
    if recipe.distill.generator.lora is not None:
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


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def assemble_roles(recipe, run_dir: str | None, backend, family, method, optimizers: dict,
                   generator_init: str | None = None, fresh: bool = False) -> Nets:
    """Build, place and load every role `method` uses, then one optimizer per trainable role and the EMA.

    - teacher (frozen): the teacher's weights, read slice by slice per rank;
    - generator: `generator_init` (the pretrain stage's student), else the teacher's weights (LoRA: the teacher's
      weights under fresh adapters);
    - fake_score: the teacher's weights, always fresh;
    - pixel_backbone (frozen, ADP): the family's backbone file;
    - heads: seeded fresh.
    fresh: seeded random weights for every role and no file (the planner traces this under fake tensors, where a
    frozen role is built directly in the dtype the backend holds it in: fake tensors cannot be cast)."""
    seed = recipe.run.seed
    nets = {}
    bf16_frozen = fresh and recipe.parallel.mixed_precision == "bf16" and recipe.parallel.backend == "fsdp2"
    lora = recipe.distill.generator.lora
    big_roles = tuple(r for r in ("teacher",) if r in method.frozen_roles) + tuple(
        r for r in ("generator", "fake_score") if r in method.trains and not (r == "generator" and generator_init))
    source_context = contextlib.nullcontext(None) if fresh else family.teacher_source(teacher_path(recipe, run_dir))
    with source_context as source:   # read slice by slice, per rank
        for role in big_roles:
            if role == "generator":
                build = lambda: build_generator_module(recipe, family)  # noqa: E731
                adapted = lora_source(source, build, derive_seed(seed, "init_lora")) if (
                    lora is not None and source is not None) else source
                nets[role] = backend.build_role(role, build, adapted, trainable=True)
                continue
            dtype = torch.bfloat16 if role == "teacher" and bf16_frozen else torch.get_default_dtype()
            with _default_dtype(dtype):
                nets[role] = backend.build_role(role, family.build_denoiser, source, trainable=role != "teacher")
    if generator_init:
        with StateSource(generator_init) as source:
            nets["generator"] = backend.build_role("generator", family.build_denoiser, source, trainable=True)
    if "pixel_backbone" in method.frozen_roles:
        source_context = contextlib.nullcontext(None) if fresh else family.pixel_backbone_source(
            pixel_backbone_path(recipe, run_dir))
        with source_context as source:
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
