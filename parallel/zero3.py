"""DeepSpeed ZeRO-3 backend: one engine per trainable role, the frozen teacher partitioned too.

- Every role is built under `deepspeed.zero.Init`, so it is partitioned as it is constructed; pretrained weights are
  then copied into each rank's partition straight from the safetensors file (parallel/loading.py reads only the
  partition's bytes; no collective, no full gather).
- Trainable roles (generator, fake score, heads) get an engine with a client torch AdamW (no FusedAdam JIT build,
  docs/testing.md) and our warm-up LambdaLR (stepped here, not by DeepSpeed). The teacher gets an optimizer-less ZeRO-3
  inference engine: it installs the hooks that gather each submodule's parameters for its forward and again for its
  backward, so input gradients flow through the frozen teacher (ADM's generator phase).
- Methods call every role's raw (partitioned) module; ZeRO-3's module hooks fetch parameters. `backward` enters
  each updated engine's optimizer into backward and runs one `loss.backward()`: one loss may update two engines
  (DMD2's critic: fake score + heads), which `engine.backward(loss)` cannot express. Frozen roles' parameters do
  not require grad, so their engines see nothing.
- Gradient clipping is DeepSpeed's (`gradient_clipping` in the engine config); the pre-clip norm comes back as
  a device tensor from `get_global_grad_norm()`.
- The generator's fp32 EMA is a list of local fp32 partitions, updated from the optimizer's fp32 master partitions
  (`safe_get_local_fp32_param`): no collective, no gather.
- Checkpoints: torch.distributed.checkpoint (as FSDP2), never DeepSpeed's `save_checkpoint` (its files are loaded
  with `torch.load(weights_only=False)`: a replaced file runs code on resume). Each parameter's fp32 master,
  Adam moments and EMA are saved as one flat 1-D DTensor whose Shard(0) pieces are exactly ZeRO-3's partitions, so
  a checkpoint written on W ranks resumes on any other world size and is read back safely (parallel/safe_dcp.py).
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from parallel import safe_dcp
from parallel.backend import Backend, restore_schedule, warmup_lambda
from parallel.loading import check_keys
from parallel.parallelize import ParallelizePlan, prepare_role
from parallel.runtime_env import pin_mmap_threshold
from parallel.sequence import SequenceShards


def import_deepspeed():
    """Import deepspeed, skipping the ~2.5 min JIT build of its CPU shared-memory op (docs/testing.md pitfall 3): gloo
    collectives do not need it. Patched through sys.modules: `import deepspeed.comm.torch as m` binds the real
    module's parent attribute and patching through it silently does nothing."""
    import deepspeed  # imported on first ZeRO-3 use only: seconds of start-up and accelerator probing
    import deepspeed.comm.torch  # noqa: F401  (the module patched below)
    if not torch.cuda.is_available():
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    # The parameter coordinator re-checks, at every root forward while its prefetch trace is not complete, that all
    # ranks recorded the same submodule order: one broadcast plus one host read (.item()) per recorded submodule.
    # Our roles are called several times per step with and without backward, so the trace never completes and the
    # check ran at every call (10,652 host reads in 3 tiny SDXL steps). Every rank runs the same method code and
    # the same shared draws (parallel/randomness.py), so the order cannot differ; the check is dropped. Its cost:
    # a rank that did diverge would hang in a collective instead of raising here.
    sys.modules["deepspeed.runtime.zero.partitioned_param_coordinator"].assert_ints_same_as_other_ranks = \
        lambda ints: None
    return deepspeed


@contextlib.contextmanager
def norm_check_on_device(found_inf: torch.Tensor):
    """During one ZeRO-3 `engine.step()`: DeepSpeed's check of the gradient norm (`is_invalid_grad_norm`, a host
    read of a device flag to decide on the host whether to skip) becomes a device-side update of `found_inf`, the
    0/1 flag the fused client AdamW reads, so a non-finite norm still skips the update (the kernel leaves
    weights, moments and step count as they were) with no host sync, as under FSDP2 (parallel/backend.py
    step_role). DeepSpeed then unscales the gradients by the NaN norm and copies the unchanged fp32 partitions to
    the compute weights: nothing moves. Scoped to the call: the module attribute is restored after."""
    stage3 = sys.modules["deepspeed.runtime.zero.stage3"]
    host_check = stage3.is_invalid_grad_norm

    def flag_on_device(norm: torch.Tensor) -> bool:
        bad = (~torch.isfinite(norm) | (norm < 0)).any().float().reshape(()).to(found_inf.device)
        torch.maximum(found_inf, bad, out=found_inf)
        return False

    stage3.is_invalid_grad_norm = flag_on_device
    try:
        yield
    finally:
        stage3.is_invalid_grad_norm = host_check


BUCKET_CAP = 50_000_000


def bucket_elements(role_numel: int) -> int:
    """Reduce / prefetch bucket of a role's engine, in elements."""
    return int(max(1, min(role_numel, BUCKET_CAP)))


class Zero3Backend(Backend):
    def __init__(self, dist_info, grad_clip: float = 10.0, ema_decay: float = 0.999, mixed_precision: str = "fp32",
                 persistence_threshold: int = 0, sp: int = 1, plan: ParallelizePlan = ParallelizePlan(),
                 gathered_roles: frozenset = frozenset()):
        super().__init__(plan)
        if dist_info.device.type == "cpu":
            pin_mmap_threshold()   # else freed whole-module init tensors stay resident (see its docstring)
        self.ds = import_deepspeed()
        self.ds.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
        self.dist = dist_info
        if sp > 1:
            # SP groups of consecutive ranks (the same layout as FSDP2's mesh). Every role stays partitioned over ALL
            # ranks and DeepSpeed averages gradients over all of them: the SP ranks' partial gradients sum to SP x the
            # sample's gradient (parallel/sequence.py), so that mean is the data-parallel mean, with no SP scaling
            mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size // sp, sp),
                                    mesh_dim_names=("dp", "sp"))
            self.sequence = SequenceShards.of_group(mesh["sp"].get_group())
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        self.bf16 = mixed_precision == "bf16"
        # parameters below this many elements stay replicated (DeepSpeed's default 1e5); tests use 0 so that every
        # parameter is partitioned and per-rank bytes are exactly comparable
        self.persistence_threshold = persistence_threshold
        # roles whose every parameter stays whole (persistent): a double backward (ADM's R1 through the heads) reads
        # weights that a partitioned role would have released after the first one; `parallel.keep_gathered:
        # [teacher]` gathers the frozen teacher once instead of per submodule call (an ADM step calls it 2-3 times,
        # each call a gather of every submodule for forward and again for backward). Cost: its full weights on
        # every rank, which the planner counts (trainer/memory_plan.py)
        self.gathered_roles = frozenset(gathered_roles)
        self.raw: dict[str, nn.Module] = {}
        self.engines: dict = {}
        self.ema_shards: list[torch.Tensor] = []
        self.ema_sources: list[torch.Tensor] = []
        self._flat_mesh = None   # 1-D mesh over every rank: the checkpoints' flat DTensors (built on first save/load)

    def ds_config(self, trainable: bool, numel: int = BUCKET_CAP, persistent: bool = False) -> dict:
        # DeepSpeed's default reduce bucket is 5e8 elements: a 2 GB fp32 buffer per engine, whatever the role's
        # size (measured: 5.7 GB of temporaries for three tiny engines). Buckets are capped at the role's size and
        # at BUCKET_CAP elements (200 MB fp32); parallel/plan.py counts them.
        bucket = bucket_elements(numel)
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
                # memory_efficient_linear off: DeepSpeed would replace torch.nn.functional.linear process-wide with
                # matmul + add, which rounds differently from torch's addmm (the equality test saw 1e-7 forward and
                # 1.4e-5 DMD gradient differences) and changes every other module's linear too; ZeRO-3's hooks
                # re-gather the weight for backward either way
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold":
                                          1 << 62 if persistent else self.persistence_threshold,
                                      "memory_efficient_linear": False,
                                      "contiguous_gradients": True, "overlap_comm": False,
                                      "reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket},
                "bf16": {"enabled": self.bf16},
                "gradient_clipping": self.grad_clip if trainable else 0.0}

    # --- placement -------------------------------------------------------------------------------------------
    def build_role(self, role: str, build, source=None, trainable: bool = True) -> nn.Module:
        with self.ds.zero.Init(config_dict_or_path=self.ds_config(trainable, persistent=role in self.gathered_roles)):
            module = build()
        # attention and activation checkpointing (parallel/parallelize.py); the role is partitioned already, and
        # ZeRO-3's hooks gather each submodule's parameters for its forward, its recompute and its backward
        prepare_role(role, module, self.plan, self.sequence)
        if source is not None:
            load_partitions(module, source)
        if not trainable:
            module.requires_grad_(False).eval()
        # methods call the raw partitioned module (see backward); engines hold the optimizer and gradient hooks
        self.raw[role] = self.modules[role] = module
        if not trainable:
            numel = sum(p.ds_numel for p in module.parameters())
            engine, *_ = self.ds.initialize(model=module, config=self.ds_config(False, numel,
                                                                                role in self.gathered_roles))
            engine.eval()
            self.engines[role] = engine
        return module

    def wrap(self, role: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        raise NotImplementedError("ZeRO-3 roles are built partitioned: use build_role(role, build_fn, source)")

    def setup_optimizer(self, role: str, cfg) -> None:
        module = self.raw[role]
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=True)   # fused: takes found_inf; LoRA: the adapters only
        numel = sum(p.ds_numel for p in module.parameters())
        engine, *_ = self.ds.initialize(model=module, optimizer=optimizer,
                                        config=self.ds_config(True, numel, role in self.gathered_roles))
        self.engines[role] = engine
        # the warm-up schedule sets lr in the client optimizer's param groups; DeepSpeed's ZeRO-3 optimizer steps
        # that same optimizer on its fp32 partitions
        self.optimizers[role] = optimizer
        self.schedulers[role] = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.warmup_steps))

    def compute_context(self):
        if not self.bf16:
            return super().compute_context()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    # --- steps -----------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, roles: tuple[str, ...]) -> None:
        """One backward updating one or more engines (DMD2's critic: fake score + heads). Each updated engine's
        optimizer is entered into backward as `engine.backward` would do; its gradient hooks reduce-scatter into
        the fp32 partitions and queue its epilogue (flush of the last bucket) for the end of the autograd graph.
        Roles are called as raw modules (never `engine(...)`): engine forwards would hook frozen roles into
        backwards they take no part in."""
        optimizers = [self.engines[role].optimizer for role in roles]
        for optimizer in optimizers:
            optimizer.clear_backward_seen_flag()   # what engine.forward does at the start of a micro-step
            optimizer.enter_backward()
        loss.backward()
        for role, optimizer in zip(roles, optimizers):
            if optimizer._backward_active_depth:   # the queued epilogue did not run: gradients not reduced
                raise RuntimeError(f"ZeRO-3 {role}: backward finished without its gradient epilogue")

    def clip_and_step(self, roles: tuple[str, ...], skip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """skip: the guards' flag. The fused client AdamW gets found_inf = skip or a non-finite gradient norm, the
        norm's part set inside DeepSpeed's step on the device (norm_check_on_device): no host sync."""
        norms = {}
        for role in roles:
            engine, optimizer = self.engines[role], self.optimizers[role]
            found_inf = (torch.zeros((), device=self.dist.device) if skip is None
                         else skip.detach().float().reshape(()).to(self.dist.device).clone())
            optimizer.found_inf = found_inf
            try:
                with norm_check_on_device(found_inf):
                    engine.step()             # clip (gradient_clipping) + AdamW on the fp32 partitions + zero grads
            finally:
                optimizer.__dict__.pop("found_inf", None)
            norm = engine.get_global_grad_norm()
            norms[role] = norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
            self.schedulers[role].step()
        return norms

    def full_grads(self, role: str) -> dict[str, torch.Tensor]:
        """Full fp32 gradients of a role after backward, before the step (tests). Collective."""
        from deepspeed.utils import safe_get_full_grad  # deepspeed loads through parallel/zero3.py import_deepspeed (seconds; skips a JIT build): ZeRO-3 paths only
        grads = {n: safe_get_full_grad(p) for n, p in self.raw[role].named_parameters()}
        return {n: g.detach().float().cpu().clone() for n, g in grads.items() if g is not None}

    def local_param_bytes(self, role: str) -> int:
        """This rank's partitions (ds_tensor: padded to equal sizes; persistent small parameters whole)."""
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.raw[role].parameters())

    # --- EMA -------------------------------------------------------------------------------------------------
    def _local_fp32(self, role: str) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param  # deepspeed loads through parallel/zero3.py import_deepspeed (seconds; skips a JIT build): ZeRO-3 paths only
        # a frozen parameter of a trained role (LoRA's base weights) has no fp32 master: its own partition
        return [safe_get_local_fp32_param(p) if p.requires_grad else p.ds_tensor for p in self.raw[role].parameters()]

    def setup_ema(self, role: str = "generator") -> None:
        self.ema_role = role
        # views into DeepSpeed's flat fp32 partitions, taken once: the optimizer updates and load_state restores
        # those buffers in place. Asked per step, DeepSpeed's accessor synchronises its reduce stream with the host
        # once per parameter on CUDA (_get_fp32_opt_state_partition) and dispatches ~10 view ops per parameter.
        self.ema_sources = self._local_fp32(role)
        self.ema_shards = [t.detach().float().clone() for t in self.ema_sources]

    @torch.no_grad()
    def ema_update(self, role: str = "generator") -> None:
        torch._foreach_lerp_(self.ema_shards, [t.float() for t in self.ema_sources], 1.0 - self.ema_decay)

    # --- state -----------------------------------------------------------------------------------------------
    def full_state(self, role: str) -> dict[str, torch.Tensor]:
        """Full tensors on every rank (collective: call on all ranks)."""
        if role == "ema":
            return self._gather_partitions(self.ema_role, self.ema_shards)
        from deepspeed.utils import safe_get_full_fp32_param  # deepspeed loads through parallel/zero3.py import_deepspeed (seconds; skips a JIT build): ZeRO-3 paths only
        module = self.raw[role]
        if role in self.optimizers:   # the fp32 master weights (frozen ones of a LoRA role: gathered)
            frozen = [p for p in module.parameters() if not p.requires_grad]
            with self.ds.zero.GatheredParameters(frozen, modifier_rank=None):
                return {n: (safe_get_full_fp32_param(p) if p.requires_grad else p.data.float()).detach().cpu().clone()
                        for n, p in module.named_parameters()}
        with self.ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}

    def _gather_partitions(self, role: str, partitions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        world = dist.get_world_size()
        for (name, param), local in zip(self.raw[role].named_parameters(), partitions):
            pieces = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(pieces, local.contiguous())
            out[name] = torch.cat(pieces)[:param.ds_numel].view(param.ds_shape).cpu()
        return out

    def _flat_dtensor(self, param: nn.Parameter, partition: torch.Tensor) -> DTensor:
        """This rank's ZeRO-3 partition of `param` ([P] elements, P = ceil(numel / world), zero padded at the end) as
        the matching piece of a 1-D DTensor of the parameter's numel: DCP then stores each parameter once, whole,
        and a checkpoint written on W ranks loads on any other number (the pieces are re-cut on load)."""
        if self._flat_mesh is None:
            self._flat_mesh = init_device_mesh(self.dist.device.type, (dist.get_world_size(),))
        numel, size = param.ds_numel, partition.numel()
        start, stop = min(dist.get_rank() * size, numel), min((dist.get_rank() + 1) * size, numel)
        # ZeRO-3's ceil-sized partitions are exactly DTensor's Shard(0) chunks (torch.chunk); checked, not assumed
        local_shape, offset = compute_local_shape_and_global_offset((numel,), self._flat_mesh, [Shard(0)])
        if local_shape[0] != stop - start or (stop > start and offset[0] != start):
            raise RuntimeError(f"ZeRO-3 partition [{start}, {stop}) of a {numel}-element parameter does not match "
                               f"DTensor's Shard(0) piece at {offset[0]} of {local_shape[0]}")
        return DTensor.from_local(partition[: stop - start], self._flat_mesh, [Shard(0)], shape=torch.Size((numel,)),
                                  stride=(1,), run_check=False)

    def _dcp_state(self, fresh: bool) -> dict:
        """The checkpoint's tensors, per parameter and flat (layout: docs/parallelism.md "Checkpoints"):
        roles.<role>.model.<name> (fp32 master weights; a LoRA role's frozen base: its own partition),
        roles.<role>.zero3_optim.<name>.{exp_avg, exp_avg_sq}, roles.<role>.{adam_step, scheduler_steps},
        ema.<name>, torch_rng. fresh=False: views of the live partitions (save); fresh=True: zeroed buffers of this
        world size's partitions for DCP to fill (load_state then hands them to DeepSpeed)."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state  # deepspeed loads through parallel/zero3.py import_deepspeed (seconds; skips a JIT build): ZeRO-3 paths only

        def piece(param, tensor):
            return self._flat_dtensor(param, torch.zeros(param.ds_tensor.numel(), dtype=torch.float32,
                                                         device=param.ds_tensor.device) if fresh else tensor)

        state = {"roles": {}, "ema": {}, "torch_rng": torch.get_rng_state()}
        for role in self.optimizers:
            engine, model, moments = self.engines[role], {}, {}
            for name, param in self.raw[role].named_parameters():
                if not param.requires_grad:
                    model[name] = piece(param, None if fresh else param.ds_tensor.float())
                    continue
                model[name] = piece(param, None if fresh else safe_get_local_fp32_param(param))
                moments[name] = {key: piece(param, None if fresh else safe_get_local_optimizer_state(param, key))
                                 for key in ADAM_STATE}
            state["roles"][role] = {"model": model, "zero3_optim": moments,
                                    "adam_step": torch.tensor(0 if fresh else self._adam_step(engine)),
                                    "scheduler_steps": torch.tensor(self.schedulers[role].last_epoch)}
        for (name, param), shard in zip(self.raw[self.ema_role].named_parameters(), self.ema_shards):
            state["ema"][name] = self._flat_dtensor(param, shard)   # in place: DCP loads straight into the EMA
        return state

    @staticmethod
    def _adam_step(engine) -> int:
        """The client AdamW's step count (one per fp32 sub-group, all equal: every step steps every group)."""
        steps = {int(engine.optimizer.optimizer.state[flat]["step"])
                 for flat in engine.optimizer.fp32_partitioned_groups_flat}
        if len(steps) != 1:
            raise RuntimeError(f"ZeRO-3 sub-groups at different Adam steps {sorted(steps)}")
        return steps.pop()

    def save_state(self, directory: str) -> None:
        self._ensure_optimizer_state()
        dcp.save(self._dcp_state(fresh=False), checkpoint_id=directory)

    def _ensure_optimizer_state(self) -> None:
        """Adam's moments exist only after a first step: a checkpoint before any step (step 0) still saves them."""
        for role in self.optimizers:
            optimizer = self.engines[role].optimizer
            for flat in optimizer.fp32_partitioned_groups_flat:
                inner = optimizer.optimizer.state[flat]
                if not inner:
                    inner["step"] = torch.tensor(0.0)
                    for key in ADAM_STATE:
                        inner[key] = torch.zeros_like(flat)

    def load_state(self, directory: str) -> None:
        """Loads a checkpoint written on any world size (DCP re-cuts each flat parameter into this run's pieces)."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state  # deepspeed loads through parallel/zero3.py import_deepspeed (seconds; skips a JIT build): ZeRO-3 paths only
        self._ensure_optimizer_state()
        state = self._dcp_state(fresh=True)
        safe_dcp.load(state, directory)
        with torch.no_grad():
            for role in self.optimizers:
                entry, engine = state["roles"][role], self.engines[role]
                for name, param in self.raw[role].named_parameters():
                    master = _padded(entry["model"][name], param)
                    if param.requires_grad:
                        safe_set_local_fp32_param(param, master)
                        for key in ADAM_STATE:
                            safe_set_local_optimizer_state(param, _padded(entry["zero3_optim"][name][key], param), key)
                    param.ds_tensor.copy_(master.to(param.ds_tensor.dtype))   # the compute copy follows the master
                for flat in engine.optimizer.fp32_partitioned_groups_flat:
                    inner = engine.optimizer.optimizer.state[flat]
                    inner["step"] = torch.full_like(inner["step"], float(entry["adam_step"]))
                restore_schedule(self.schedulers[role], int(entry["scheduler_steps"]))
        torch.set_rng_state(state["torch_rng"])


ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _padded(piece: DTensor, param) -> torch.Tensor:
    """A loaded flat piece back to ZeRO-3's padded partition length."""
    local = piece.to_local()
    out = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32, device=param.ds_tensor.device)
    out[: local.numel()].copy_(local)
    return out


def load_partitions(module: nn.Module, source) -> None:
    """Copy each ZeRO-3 parameter's local partition (a contiguous range of the flattened tensor, padded at the
    end) from the source; nothing else is read and nothing is communicated."""
    check_keys(module, source)
    rank = dist.get_rank()
    with torch.no_grad():
        for name, param in module.named_parameters():
            local = param.ds_tensor          # [partition_numel], this rank's slice (zero padded past ds_numel)
            size = local.numel()
            start, stop = rank * size, min((rank + 1) * size, param.ds_numel)
            local.zero_()
            if stop > start:
                local[: stop - start].copy_(source.flat_range(name, start, stop).to(local.dtype))
