"""The memory planner: predicted bytes per GPU for a recipe, a backend and a number of ranks, without weights.

`python -m trainer.main RECIPE --dry-run [--world-size N]` prints it (docs/parallelism.md "The memory planner").
The roles are assembled by trainer/stages/roles.py and parallelized by parallel/parallelize.py, as in a run. Two parts:

1. Model states per role and rank, from the roles' parameter counts (every role built on the meta device):
   - fsdp2: fp32 parameter shards (the frozen teacher in the compute dtype), fp32 gradient shards and AdamW's two fp32 moments for
     trainable roles, the generator's fp32 EMA shard; each divided by dp_shard (HSDP replicates across
     dp_replicate).
   - zero3: trainable roles from DeepSpeed's own estimator (`estimate_zero3_model_states_mem_needs`, 18 bytes per
     parameter over the ranks + the largest layer, for bf16 mixed precision); for fp32 training, whose layout that
     estimator does not cover, 20 bytes per parameter (fp32 parameter, fp32 gradient and fp32 master partitions,
     two AdamW moments) + the largest layer. The frozen teacher: its parameter partitions (2 bytes bf16 / 4 fp32).
     Parameters below `zero3_persistence_threshold` elements and a kept role's (`keep_gathered`) are counted whole.
     DeepSpeed's contiguous reduce bucket per trainable engine and every engine's parameter prefetch bucket (each
     sized by parallel/zero3.py: the role's size, at most 5e7 elements) are added: prefetched parameters are
     gathered ahead of their module, which the FSDP2 trace does not see (measured on the tiny SDXL twin: 10.7 MiB
     of its 76.6 MiB peak).
   - data_parallel: everything whole on every rank.
2. Activations and transients (all-gathered units, autograd buffers, temporaries): one real method step traced
   under fake tensors (`FakeTensorMode`: shapes only, no memory, no compute) on a fake process group of N ranks,
   with torch's `MemTracker` (torch.distributed._tools) counting live tensor bytes op by op, under FSDP2 (or plain
   data parallel) with the recipe's mixed precision and activation checkpointing; with sp > 1 the Ulysses
   all-to-alls run on the fake group too, so the trace holds this rank's token shard. Two steps are traced so that the
   optimizer's moments exist. For ZeRO-3 the traced peak minus FSDP2's own model states is added to ZeRO-3's model
   states (the activations are the same tensors).

The trace runs in this process on a fake process group: call it from a fresh process (the CLI does).
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import CLIPModel, Dinov2Model

from parallel.backend import Backend
from parallel.backends import build_backend
from parallel.dims import ParallelDims
from parallel.distributed import DistInfo
from parallel.loading import resolve_model_dir
from parallel.zero3 import bucket_elements
from trainer.families import build_family
from trainer.methods import build_method
from trainer.stages.roles import assemble_roles, build_denoiser, build_generator_module
from trainer.trainer import StageTrainer, loop_config

GIB = 1 << 30


@dataclass
class RoleStates:
    role: str
    numel: int
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    buffers: float = 0.0     # backend buffers (ZeRO-3 buckets)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.buffers


@dataclass
class MemoryPlan:
    backend: str
    world_size: int
    local_batch: int
    roles: list[RoleStates]
    activations: float                 # traced step peak above the model states (activations + transients)
    traced_peak: float                 # the traced peak itself (fsdp2 / data_parallel: the prediction)
    gpu_memory_gib: float | None = None
    notes: list[str] = field(default_factory=list)
    micro_batch: int | None = None     # samples per backward when gradients accumulate (activations scale with it)
    stage: str = "distill"

    @property
    def model_states(self) -> float:
        return sum(r.total for r in self.roles)

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    def format(self) -> str:
        micro = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        lines = [f"memory plan of the {self.stage} stage: backend {self.backend}, {self.world_size} ranks, local batch "
                 f"{self.local_batch}{micro} (bytes per rank, GiB)",
                 f"{'role':<14} {'parameters':>14} {'param GiB':>10} {'grad GiB':>9} {'optim GiB':>10} "
                 f"{'ema GiB':>8} {'buf GiB':>8} {'total GiB':>10}"]
        for r in self.roles:
            lines.append(f"{r.role:<14} {r.numel:>14,} {r.params / GIB:>10.3f} {r.grads / GIB:>9.3f} "
                         f"{r.optimizer / GIB:>10.3f} {r.ema / GIB:>8.3f} {r.buffers / GIB:>8.3f} {r.total / GIB:>10.3f}")
        lines.append(f"{'activations and transients (traced step)':<84} {self.activations / GIB:>10.3f}")
        lines.append(f"{'total per GPU':<84} {self.total / GIB:>10.3f}  ({int(self.total)} bytes)")
        lines += [f"note: {n}" for n in self.notes]
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.total <= self.gpu_memory_gib * GIB else "DOES NOT FIT"
            lines.append(f"{verdict}: {self.total / GIB:.2f} GiB of the declared {self.gpu_memory_gib:g} GiB per GPU")
        return "\n".join(lines)


def _largest_layer_numel(module) -> int:
    """DeepSpeed's 'largest layer' (its `model_to_params`): the most parameters one module owns directly; ZeRO-3
    gathers parameters module by module."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def model_states(recipe, world_size: int, roles: dict) -> list[RoleStates]:
    """roles: name -> module (meta tensors are fine). Bytes per rank per role (see the module docstring)."""
    p = recipe.parallel
    trainable = set(roles) - {"teacher", "pixel_backbone"}   # the frozen roles
    out = []
    if p.backend == "fsdp2":
        dims = ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.sp)
        shards = dims.dp_shard * dims.sp     # sequence-parallel ranks hold shards too (parallel/dims.py)
    for role, module in roles.items():
        numel = sum(t.numel() for t in module.parameters())
        # a LoRA generator trains its adapters only: gradients and moments for those (its frozen base weights are
        # held like the trainable ones, fp32 shards)
        trained = sum(t.numel() for t in module.parameters() if t.requires_grad) if role in trainable else 0
        r = RoleStates(role, numel)
        if p.backend == "fsdp2":
            # fp32 master shards; a frozen role is held in the compute dtype (parallel/fsdp.py)
            frozen_bytes = 2 if p.mixed_precision == "bf16" else 4
            r.params = (4 if role in trainable else frozen_bytes) * numel / shards
            if role in trainable:
                r.grads, r.optimizer = 4 * trained / shards, 8 * trained / shards
        elif p.backend == "zero3":
            # parameters below the persistence threshold, and a kept role's (persistent), stay whole on every rank
            small = (numel if role in p.keep_gathered else
                     sum(t.numel() for t in module.parameters() if t.numel() < p.zero3_persistence_threshold))
            big = numel - small
            largest = _largest_layer_numel(module)
            bf16 = p.mixed_precision == "bf16"
            param_bytes = 2 if bf16 else 4
            # + one gathered layer (DeepSpeed's estimator counts it at 4 bytes per parameter)
            r.params = param_bytes * (big / world_size + small) + 4 * largest
            if role in trainable and trained < numel:   # LoRA: fp32 master + moments of the adapters alone
                r.grads = param_bytes * trained / world_size
                r.optimizer = 12 * trained / world_size
                r.buffers = param_bytes * bucket_elements(trained)
            elif role in trainable:
                if bf16:
                    # DeepSpeed's own estimator; imported here because importing deepspeed costs seconds and
                    # only ZeRO-3 plans need it
                    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
                    _, total, _ = estimate_zero3_model_states_mem_needs(
                        big, largest, num_gpus_per_node=world_size, num_nodes=1, cpu_offload=False,
                        cpu_offload_params=False)
                else:   # fp32 parameter, fp32 gradient, fp32 master copy, two AdamW moments
                    total = 4 * largest + 20 * big / world_size
                r.grads = param_bytes * big / world_size
                r.optimizer = total - 4 * largest - r.grads - param_bytes * big / world_size
                # DeepSpeed preallocates a trainable engine's contiguous reduce bucket (parallel/zero3.py sizes
                # it), in the gradients' dtype
                r.buffers = param_bytes * bucket_elements(numel)
            # parameters prefetched ahead of their module, gathered whole (every engine, frozen ones too)
            r.buffers += param_bytes * bucket_elements(numel)
        else:
            r.params = 4 * numel
            if role in trainable:
                r.grads, r.optimizer = 4 * trained, 8 * trained
        if role == "generator":
            r.ema = r.params if p.backend != "zero3" else 4 * numel / world_size
        out.append(r)
    return out


class _StepTracker:
    """torch's MemTracker without module-wise statistics: it refuses a module called twice in one iteration (the
    fake score and the teacher are called several times per step); the per-op accounting of live tensors that gives
    the peak is unchanged."""

    def __new__(cls):
        class StepTracker(MemTracker):
            def _pre_fw_hook(self, *args, **kwargs):
                pass

            def _post_fw_hook(self, *args, **kwargs):
                pass

            def _pre_bw_hook(self, *args, **kwargs):
                pass

            def _post_bw_hook(self, *args, **kwargs):
                pass

        return StepTracker()


def build_trainer(recipe, dist_info, family, backend=None, stage: str = "distill") -> StageTrainer:
    """A StageTrainer of a training stage (`distill` or `pretrain`) over freshly initialised roles (no weight files),
    assembled exactly as a run assembles them (trainer/stages/roles.py): what the planner and the benchmarks trace."""
    section = getattr(recipe, stage)
    method = build_method(section.method)
    train = section.train
    backend = backend or build_backend(recipe.parallel, dist_info, family, train.grad_clip, train.ema_decay,
                                       method.gathered_roles)
    nets = assemble_roles(recipe, None, backend, family, method, section.optimizer, fresh=True)
    denoiser = build_denoiser(recipe)
    g = recipe.distill.generator
    data = SyntheticPairs(family) if method.needs_pairs else SyntheticReal(family) if method.needs_real_data else None
    return StageTrainer(stage_dir="/nonexistent/plan", stage_name="plan", method=method, nets=nets, backend=backend,
                        denoiser=denoiser, family=family, loop=loop_config(train, recipe.run.seed),
                        dist_info=dist_info, student_timesteps=denoiser.schedule.student_timesteps(g.num_steps),
                        conditioning_timestep=g.conditioning_timestep, data_source=data)


class SyntheticReal:
    """Zero 'real' batches of the family's data shape (planning and benchmarks only: memory and time do not depend
    on the values); prompt id 0 each."""

    def __init__(self, family):
        self.family = family

    def batch(self, indices):
        n = len(indices)
        return torch.zeros(n, *self.family.data_shape), torch.zeros(n, dtype=torch.int64)


class SyntheticPairs(SyntheticReal):
    """Zero ODE pairs (noise, teacher output, prompt id 0) for planning the pretrain stage."""

    def batch(self, indices):
        x, prompts = super().batch(indices)
        return x, x.clone(), prompts


def single_tensor_optimizers(backend) -> None:
    """Trace AdamW's single-tensor path. Under FakeTensorMode the fused and foreach AdamW steps over FSDP2's DTensor
    shards are counted at the parameters' GLOBAL size (measured: 4 Linear(4096, 4096) on 8 fake ranks, 1088 MiB of
    optimizer state fused, 864 MiB foreach, 64 MiB single-tensor; real tensors give 64 MiB on every path), which
    inflated every multi-rank plan by about (1 - 1/N) x the trained roles' moments. The single-tensor path holds the
    same state. It takes no found_inf, so the trace steps without the guards' skip flag (memory is the same)."""
    for optimizer in backend.optimizers.values():
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = False, False
    backend.step_role = lambda role, skip=None: Backend.step_role(backend, role, None)


def _pack_whole_weights(tensor):
    """saved_tensors_hooks pack for ZeRO-3 plans: a gathered weight that autograd saves for backward stays alive whole
    until that backward (a copy here), as it does under ZeRO-3 with torch's F.linear; FSDP2 instead frees the
    gathered storage after forward and gathers it again in backward (measured on the tiny SDXL twin, 2 ranks: ZeRO-3
    held 14.5 MiB more activations than the FSDP2 trace without checkpointing, as much as these copies). Inside
    checkpointed blocks the checkpoint's own hooks take precedence: nothing is saved there, as in a ZeRO-3 run."""
    return tensor.detach().clone() if isinstance(tensor, torch.nn.Parameter) else tensor


def trace_step(recipe, world_size: int, steps: int = 2, stage: str = "distill") -> tuple[float, dict]:
    """(peak bytes, peak by category) of `steps` method steps of rank 0 of `world_size`, under fake tensors. ZeRO-3 is
    traced under FSDP2 (the same activations), with the weights autograd saves held whole (`_pack_whole_weights`)."""
    traced = recipe.model_copy(deep=True)
    zero3 = traced.parallel.backend == "zero3"
    if zero3:
        traced.parallel.backend = "fsdp2"
        traced.parallel.keep_gathered = []   # a ZeRO-3 role kept whole is counted in its model states
    saved_weights = (torch.autograd.graph.saved_tensors_hooks(_pack_whole_weights, lambda tensor: tensor) if zero3
                     else contextlib.nullcontext())
    need_group = traced.parallel.backend != "data_parallel" or world_size > 1
    if need_group:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        info = DistInfo(0, world_size, 0, torch.device("cpu"), sp=traced.parallel.sp)
        family = build_family(traced, planning=True)
        train = getattr(traced, stage).train
        # the backend (and its device mesh) is built outside fake mode: mesh set-up reads real tensors
        backend = build_backend(traced.parallel, info, family, train.grad_clip, train.ema_decay,
                                build_method(getattr(traced, stage).method).gathered_roles)
        with FakeTensorMode(allow_non_fake_inputs=True):
            trainer = build_trainer(traced, info, family, backend, stage)
            single_tensor_optimizers(backend)
            tracker = _StepTracker()
            tracker.track_external(*trainer.nets.present().values(), *backend.optimizers.values(),
                                   *getattr(backend, "ema_shards", []))
            with tracker, saved_weights:
                for step in range(steps):
                    trainer.train_step(step, defaultdict(list))
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        if need_group:
            dist.destroy_process_group()
    by_category = {str(getattr(k, "value", k)): v for k, v in peak.items()}
    return float(by_category.pop("Total")), by_category


def plan_memory(recipe, world_size: int, trace: bool = True, traced_peak: float | None = None,
                stage: str = "distill") -> MemoryPlan:
    """The plan of one training stage (`distill`, or `pretrain`: ADP with its VAE-decode + vision backbone).
    traced_peak: reuse the peak of an earlier trace of the same recipe, stage, backend and world size."""
    family = build_family(recipe, planning=True)
    section = getattr(recipe, stage)
    method = build_method(section.method)
    with torch.device("meta"):
        roles = {"teacher": family.build_denoiser()} if "teacher" in method.frozen_roles else {}
        for role in ("generator", "fake_score"):
            if role in method.trains:
                roles[role] = build_generator_module(recipe, family) if role == "generator" else \
                    family.build_denoiser()
        if "pixel_backbone" in method.frozen_roles:
            roles["pixel_backbone"] = family.build_pixel_backbone()
        if "heads" in method.trains:
            roles["heads"] = method.build_heads(family)
    states = model_states(recipe, world_size, roles)
    local_batch = section.train.batch_size // (world_size // recipe.parallel.sp)   # per data-parallel rank
    plan = MemoryPlan(recipe.parallel.backend, world_size, local_batch, states, 0.0, 0.0,
                      recipe.parallel.gpu_memory_gib, micro_batch=section.train.micro_batch_size, stage=stage)
    if stage == "distill" and recipe.eval.every and recipe.family.name != "toy":
        add_in_loop_evaluation(plan, recipe, family, roles["generator"])
    if trace:
        peak = traced_peak if traced_peak is not None else trace_step(recipe, world_size, stage=stage)[0]
        plan.traced_peak = peak
        if recipe.parallel.backend == "zero3":
            fsdp = recipe.model_copy(deep=True)
            fsdp.parallel.backend = "fsdp2"
            reference = sum(r.total for r in model_states(fsdp, world_size, roles))
        else:
            reference = plan.model_states
        plan.activations = max(peak - reference, 0.0)
        plan.notes.append("activations traced under FSDP2 for zero3 (same tensors); ZeRO-3's prefetch "
                          "and reduce buckets are counted as buffers" if recipe.parallel.backend == "zero3" else
                          f"traced peak {peak / GIB:.3f} GiB")
    else:
        plan.notes.append("activations not traced (--no-trace)")
    suggest_keeping_the_teacher(plan, recipe, roles.get("teacher"))
    return plan


def suggest_keeping_the_teacher(plan: MemoryPlan, recipe, teacher_module) -> None:
    """A note pricing `parallel.keep_gathered: [teacher]` (a sharded teacher is gathered at every call, 2-3 per ADM
    step; kept, once per run): its whole weights per rank and, with `gpu_memory_gib`, whether the plan still fits."""
    if teacher_module is None or plan.backend == "data_parallel" or "teacher" in recipe.parallel.keep_gathered:
        return
    teacher = next(r for r in plan.roles if r.role == "teacher")
    if plan.backend == "zero3":   # its model states count a kept role whole (persistent parameters)
        kept = recipe.model_copy(deep=True)
        kept.parallel.keep_gathered = [*kept.parallel.keep_gathered, "teacher"]
        extra = model_states(kept, plan.world_size, {"teacher": teacher_module})[0].total - teacher.total
    else:   # FSDP2: the kept copy shows in the traced step, not in the model states
        extra = (2 if recipe.parallel.mixed_precision == "bf16" else 4) * teacher.numel - teacher.params
    if extra <= 0:
        return
    total, limit = plan.total + extra, plan.gpu_memory_gib
    fits = ("" if limit is None else f", {total / GIB:.2f} GiB in all: "
            f"{'fits' if total <= limit * GIB else 'does NOT fit'} in {limit:g} GiB")
    plan.notes.append(f"parallel.keep_gathered: [teacher] would gather the frozen teacher once instead of at every "
                      f"call, for +{extra / GIB:.3f} GiB per rank{fits}")


def add_in_loop_evaluation(plan: MemoryPlan, recipe, family, generator) -> None:
    """eval.every: a whole fp32 generator (the gathered EMA), the VAE and the feature models stay on every rank
    (trainer/latent_evaluation.py), counted as one `evaluation` row from their configs; a model whose config is not
    local (an uncached hub id) is left out, with a note. Sampling without gradients at eval.batch_size is not traced."""
    row = RoleStates("evaluation", sum(t.numel() for t in generator.parameters()))
    row.params = 4 * row.numel
    missing = []
    for name, count in (("vae", vae_parameters(recipe, family)), ("eval.dinov2", config_parameters(
            recipe.eval.dinov2, Dinov2Model)), ("eval.clip", config_parameters(recipe.eval.clip, CLIPModel))):
        if count is None:
            missing.append(name)
        else:
            row.numel += count
            row.params += 4 * count
    plan.roles.append(row)
    plan.notes.append("evaluation: the whole EMA generator, VAE and feature models of eval.every (their activations "
                      "at eval.batch_size without gradients not traced)" +
                      (f"; not local, not counted: {', '.join(missing)}" if missing else ""))


def config_parameters(path: str | None, cls) -> int | None:
    """Parameters of a transformers model from its config alone (built on the meta device); 0 without `path`,
    None when its config is not local."""
    if path is None:
        return 0
    try:
        folder = resolve_model_dir(path)
    except OSError:
        return None
    with torch.device("meta"):
        model = cls(cls.config_class.from_pretrained(folder))
    return sum(t.numel() for t in model.parameters())


def vae_parameters(recipe, family) -> int | None:
    pretrained = recipe.teacher.pretrained
    if not pretrained or not os.path.isdir(os.path.join(pretrained, "vae")):
        return None
    with torch.device("meta"):
        vae = family.vae_class.from_config(family.vae_class.load_config(os.path.join(pretrained, "vae")))
    return sum(t.numel() for t in vae.parameters())
