"""FSDP2 backend: `fully_shard` per block then the root, for every role (the frozen teacher too).

- Sharding over the mesh's dp_shard axis; HSDP when dp_replicate > 1 (2-D mesh: shard within, replicate across).
- MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction, fp32 master shards (parallel.mixed_precision: bf16).
- Optimizers are built on the DTensor shards BEFORE any forward (docs/testing.md pitfall 5); with bf16, one no_grad forward
  of each trainable role while it is trainable records the reduce dtype (pitfall 4), then every unit is resharded.
- The generator's EMA is fp32 and sharded like the generator: a list of local shards updated with
  `torch._foreach_lerp_` from the fp32 master shards: no collective, no full-parameter gather.
- Gradient norm: torch's `get_total_norm` over DTensor gradients, made full once (`full_tensor`, one all-reduce
  of a scalar) and applied with `clip_grads_with_norm_` (torchtitan does the same).
- Checkpoints go through torch.distributed.checkpoint, so a checkpoint written on N ranks loads on M ranks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from parallel import safe_dcp
from parallel.backend import Backend, restore_schedule, skip_flag
from parallel.loading import check_keys
from parallel.parallelize import ParallelizePlan, prepare_role
from parallel.sequence import SequenceShards


def load_local_shards(module: nn.Module, source) -> None:
    """Copy each parameter's local shard (dim-0 rows: FSDP2 shards dim 0) from the source; nothing else is read."""
    check_keys(module, source)
    with torch.no_grad():
        for name, param in module.named_parameters():
            local = param.to_local()
            if param.dim() == 0:
                local.copy_(source.full(name))
                continue
            local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                         param.placements)
            local.copy_(source.rows(name, offset[0], offset[0] + local_shape[0]).view(local_shape))


def fsdp_groups(blocks: list[nn.Module], min_params: int) -> list:
    """The FSDP2 units of a role's blocks: each block alone (min_params 0), or runs of consecutive blocks holding at
    least `min_params` parameters together (a list is one unit: one all-gather, one reduce-scatter). Small blocks
    cost FSDP2's per-unit bookkeeping (hooks, record_function markers, copy-in / copy-out) for little memory saved.
    A trailing run below the threshold joins the previous unit."""
    if min_params <= 0:
        return blocks
    groups, current, count = [], [], 0
    for block in blocks:
        current.append(block)
        count += sum(p.numel() for p in block.parameters())
        if count >= min_params:
            groups.append(current)
            current, count = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return [g[0] if len(g) == 1 else g for g in groups]


def reshard(module: nn.Module) -> None:
    """Drop the gathered copy of every FSDP2 unit in `module` (a no-op for units already sharded)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def fsdp_params(module: nn.Module) -> list:
    """FSDP2's per-parameter records (FSDPParam) of every unit in `module`: each holds the sharded DTensor and, while
    its unit is gathered, the gathered copy. Private in torch 2.13 (`FSDPParamGroup.fsdp_params`; requirements.txt
    pins torch): FSDP2 has no public way to reach the copy that is not registered on the module."""
    records = []
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            group = sub._get_fsdp_state()._fsdp_param_group
            records.extend(group.fsdp_params if group is not None else ())
    return records


def set_requires_grad(fsdp_param, flag: bool) -> None:
    """On both copies: FSDP2 copies the shards' flag onto the gathered copy when it gathers and registers the shards
    again when it reshards, so a flag set on the registered copy alone is lost at the next reshard or gather."""
    fsdp_param.sharded_param.requires_grad_(flag)
    if fsdp_param.sharded_state == ShardedState.UNSHARDED:
        fsdp_param.unsharded_param.requires_grad_(flag)


class FSDP2Backend(Backend):
    def __init__(self, dist_info, dims, grad_clip: float = 10.0, ema_decay: float = 0.999,
                 mixed_precision: str = "fp32", reshard_after_forward: bool = True, cpu_offload: bool = False,
                 plan: ParallelizePlan = ParallelizePlan(), keep_gathered: frozenset = frozenset(),
                 min_unit_params: int = 0):
        super().__init__(plan)
        self.dist, self.dims = dist_info, dims
        self.grad_clip, self.ema_decay = grad_clip, ema_decay
        self.mesh = dims.build_mesh(dist_info.device.type)
        self.shard_mesh = dims.fsdp_mesh(self.mesh)
        if dims.sp > 1:
            self.sequence = SequenceShards.of_group(dims.sequence_group(self.mesh))
        self.mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                          if mixed_precision == "bf16" else MixedPrecisionPolicy())
        self.offload = CPUOffloadPolicy() if cpu_offload else None
        self.reshard_after_forward = reshard_after_forward
        self.keep_gathered = frozenset(keep_gathered)   # roles whose weights stay gathered between calls (below)
        self.min_unit_params = min_unit_params          # blocks grouped into units of at least this many (fsdp_groups)
        self.ema_shards: list[torch.Tensor] = []
        self.ema_sources: list[torch.Tensor] = []
        self.ema_names: list[str] = []

    # --- placement -------------------------------------------------------------------------------------------
    def wrap(self, role: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        if any(p.device != self.dist.device for p in module.parameters()):   # (fake tensors refuse a no-op move)
            module = module.to(self.dist.device)
        return self._shard(role, module, trainable)

    def build_role(self, role: str, build, source=None, trainable: bool = True) -> nn.Module:
        """With a source: build on the meta device (no memory), shard, allocate only the local shards, and read
        each shard's rows from the source (parallel/loading.py). A rank's memory grows by its shards only."""
        if source is None:
            return self.wrap(role, build(), trainable)
        # parameters on the meta device, buffers real: buffers are computed by the constructors (SD3's sincos
        # position table, CogVideoX's) and are not always in the checkpoint (non-persistent), so they are kept
        # from the build and restored after to_empty, which reallocates every tensor uninitialised
        with init_empty_weights(include_buffers=False):
            module = build()
        buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
        module = self._shard(role, module, trainable)
        module.to_empty(device="cpu" if self.offload is not None else self.dist.device)
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
        load_local_shards(module, source)
        return module

    def _shard(self, role: str, module: nn.Module, trainable: bool) -> nn.Module:
        if not trainable:
            module.requires_grad_(False).eval()
            dtype = self.mp_policy.param_dtype
            if dtype is not None and any(p.dtype != dtype for p in module.parameters()):
                # a frozen role needs no fp32 master: held in the compute dtype it takes half the memory and its
                # all-gathers need no cast (docs/design.md: frozen roles are held in bf16)
                module.to(dtype)
        kept = role in self.keep_gathered
        kwargs = dict(mesh=self.shard_mesh, mp_policy=self.mp_policy,
                      reshard_after_forward=False if kept else self.reshard_after_forward)
        if self.offload is not None:
            kwargs["offload_policy"] = self.offload
        # the fixed order of parallel/parallelize.py: attention -> activation checkpointing -> FSDP per block -> root
        # (the root holds what no block owns: embeddings, output layers)
        for unit in fsdp_groups(prepare_role(role, module, self.plan, self.sequence), self.min_unit_params):
            fully_shard(unit, **kwargs)
        fully_shard(module, **kwargs)
        if kept:
            for unit in module.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_reshard_after_backward(False)
        self.modules[role] = module
        return module

    # --- gathered weights --------------------------------------------------------------------------------------
    # `parallel.keep_gathered`: a role's units are resharded only when their gathered copy would be wrong, not after
    # every forward and backward: at the role's optimizer step (its gradients live on the shards, and the copy would
    # go stale) and before any state dict or checkpoint (a gathered module's state_dict holds the full tensors, not
    # the shards). A phase boundary does not reshard: `frozen` sets the flags on both copies (set_requires_grad). The
    # teacher, never updated, is then gathered once and kept; the fake score (trained, then frozen for the two
    # later phases of an ADM step) and the heads (frozen, then trained) are gathered once per step each, as FSDP2
    # must after an update. Cost: the role's full weights stay on every rank between calls (the planner traces the
    # same backend, so its plan includes them).
    def reshard_role(self, role: str) -> None:
        reshard(self.modules[role])

    def reshard_gathered(self) -> None:
        for module in self.modules.values():
            reshard(module)

    @contextlib.contextmanager
    def frozen(self, modules: list[nn.Module]) -> Iterator[None]:
        """Backend.frozen on both copies of each parameter (set_requires_grad), so a gathered role stays gathered
        across a phase boundary: setting only the registered copy would lose the flag at the next reshard (the
        shards keep theirs) or at the next gather (FSDP2 copies the shards' flags onto the gathered copy)."""
        saved = [(record, record.sharded_param.requires_grad) for m in modules for record in fsdp_params(m)]
        for record, _ in saved:
            set_requires_grad(record, False)
        try:
            yield
        finally:
            # a unit gathered inside the context has a gathered copy now: set_requires_grad reaches it too
            for record, flag in saved:
                set_requires_grad(record, flag)

    def setup_ema(self, role: str = "generator") -> None:
        named = list(self.modules[role].named_parameters())
        self.ema_names = [n for n, _ in named]
        self.ema_params = [p for _, p in named]
        self.ema_shards = [p.detach().to_local().float().clone() for p in self.ema_params]
        self.ema_sources = []   # the fp32 master shards, as plain tensors: taken at the first update (ema_update)

    def warm_up(self, example_inputs: dict) -> None:
        """bf16 only: a no_grad forward of each trainable role while trainable, so FSDP2's lazy init records the
        fp32 reduce dtype before roles are frozen between phases (docs/testing.md pitfall 4). example_inputs: role -> args."""
        if self.mp_policy.param_dtype is None:
            return
        with torch.no_grad():
            for role, args in example_inputs.items():
                if role in self.optimizers:
                    self.modules[role](*args)
        self.reshard_gathered()

    # --- steps -----------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, roles: tuple[str, ...]) -> None:
        loss.backward()   # FSDP2 reduce-scatters each unit's gradients during backward

    def clip_and_step(self, roles: tuple[str, ...], skip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        norms = {}
        for role in roles:
            # sharded parameters (their gradients); the gathered copy would be stale after the step anyway, so the
            # next forward gathers the updated weights
            self.reshard_role(role)
            params = [p for p in self.modules[role].parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if isinstance(total, DTensor):
                total = total.full_tensor()   # one scalar all-reduce; stays on the device (no host sync)
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total, foreach=True)
            norms[role] = total
            self.step_role(role, skip_flag(total, skip))
        return norms

    @torch.no_grad()
    def ema_update(self, role: str = "generator") -> None:
        # The masters' local shards are taken once, after the first forward (FSDP2's lazy init may re-pad a shard),
        # and again after a load; the optimizer updates them in place. `to_local()` per parameter per step cost two
        # view ops each (292 dispatched ops a step on the tiny SDXL twin). Trainable roles keep fp32 masters, so
        # they are the same dtype as the EMA (a mismatch would make the foreach lerp raise, not drift).
        if not self.ema_sources:
            self.ema_sources = [p.to_local() for p in self.ema_params]
        torch._foreach_lerp_(self.ema_shards, self.ema_sources, 1.0 - self.ema_decay)

    def full_grads(self, role: str) -> dict[str, torch.Tensor]:
        self.reshard_role(role)
        return {n: p.grad.full_tensor().float().cpu() for n, p in self.modules[role].named_parameters()
                if p.grad is not None}

    def local_param_bytes(self, role: str) -> int:
        return sum(p.to_local().numel() * p.element_size() for p in self.modules[role].parameters())

    # --- state -----------------------------------------------------------------------------------------------
    def _ema_dtensors(self) -> dict[str, DTensor]:
        """Views of the EMA shards as DTensors laid out like the generator (no copy: DCP loads into them in place)."""
        return {name: DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                         run_check=False)
                for name, shard, p in zip(self.ema_names, self.ema_shards, self.ema_params)}

    def full_state(self, role: str) -> dict[str, torch.Tensor]:
        """Full tensors on every rank (collective: call on all ranks)."""
        self.reshard_gathered()
        if role == "ema":
            return {k: v.full_tensor().cpu() for k, v in self._ema_dtensors().items()}
        sd = get_model_state_dict(self.modules[role], options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() for k, v in sd.items()}

    def _dcp_state(self) -> dict:
        state = {"roles": {}, "ema": self._ema_dtensors(), "torch_rng": torch.get_rng_state()}
        for role, opt in self.optimizers.items():
            model_sd, optim_sd = get_state_dict(self.modules[role], opt)
            state["roles"][role] = {"model": model_sd, "optim": optim_sd,
                                    "scheduler_steps": torch.tensor(self.schedulers[role].last_epoch)}
        return state

    def save_state(self, directory: str) -> None:
        self.reshard_gathered()
        dcp.save(self._dcp_state(), checkpoint_id=directory)

    def load_state(self, directory: str) -> None:
        self.reshard_gathered()
        state = self._dcp_state()           # current layout (also materialises empty optimizer state)
        safe_dcp.load(state, directory)   # metadata through the allow-list (parallel/safe_dcp.py)
        for role, opt in self.optimizers.items():
            entry = state["roles"][role]
            set_state_dict(self.modules[role], opt, model_state_dict=entry["model"], optim_state_dict=entry["optim"])
            restore_schedule(self.schedulers[role], int(entry["scheduler_steps"]))
        torch.set_rng_state(state["torch_rng"])
        self.ema_sources = []   # DCP may have replaced a master shard: take them again at the next update

