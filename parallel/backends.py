"""`build_backend`: the backend named by `parallel.backend` (docs/parallelism.md "Backends")."""
from __future__ import annotations

from parallel.backend import Backend
from parallel.data_parallel import DataParallelBackend
from parallel.dims import ParallelDims
from parallel.fsdp import FSDP2Backend
from parallel.parallelize import ParallelizePlan
from parallel.zero3 import Zero3Backend


def compile_enabled(parallel_cfg, device_type: str) -> bool:
    """`parallel.compile`, with its default resolved: on with CUDA except under ZeRO-3 (validated: an explicit
    true with zero3 is refused before start)."""
    if parallel_cfg.compile is not None:
        return parallel_cfg.compile
    return device_type == "cuda" and parallel_cfg.backend != "zero3"


def parallelize_plan(parallel_cfg, family, device_type: str = "cpu") -> ParallelizePlan:
    """The recipe's and the family's part of every role's transforms (parallel/parallelize.py)."""
    compiled = compile_enabled(parallel_cfg, device_type)
    return ParallelizePlan(attention=parallel_cfg.attention,
                           checkpoint_roles=frozenset(parallel_cfg.activation_checkpointing),
                           blocks=family.shard_units,
                           compile_backend=parallel_cfg.compile_backend if compiled else None)


def build_backend(parallel_cfg, dist_info, family, grad_clip: float, ema_decay: float,
                  gathered_roles: tuple[str, ...] = ()) -> Backend:
    """The backend named by `parallel.backend`, for this process group and model family. gathered_roles: the
    method's roles kept whole (Method.gathered_roles). Both they and `parallel.keep_gathered` are kept gathered:
    FSDP2 keeps their units gathered between calls, ZeRO-3 makes their parameters persistent."""
    kept = frozenset(parallel_cfg.keep_gathered) | frozenset(gathered_roles)
    plan = parallelize_plan(parallel_cfg, family, dist_info.device.type)
    if parallel_cfg.backend == "data_parallel":
        return DataParallelBackend(dist_info, grad_clip=grad_clip, ema_decay=ema_decay, plan=plan)
    if parallel_cfg.backend == "zero3":
        return Zero3Backend(dist_info, grad_clip=grad_clip, ema_decay=ema_decay, sp=parallel_cfg.sp,
                            mixed_precision=parallel_cfg.mixed_precision,
                            persistence_threshold=parallel_cfg.zero3_persistence_threshold, plan=plan,
                            gathered_roles=kept)
    if parallel_cfg.backend == "fsdp2":
        dims = ParallelDims.resolve(dist_info.world_size, parallel_cfg.dp_replicate, parallel_cfg.dp_shard,
                                    parallel_cfg.sp)
        return FSDP2Backend(dist_info, dims, grad_clip=grad_clip, ema_decay=ema_decay,
                            mixed_precision=parallel_cfg.mixed_precision,
                            reshard_after_forward=parallel_cfg.reshard_after_forward,
                            cpu_offload=parallel_cfg.cpu_offload, plan=plan,
                            keep_gathered=kept,
                            min_unit_params=parallel_cfg.fsdp_min_unit_params)
    raise ValueError(f"unknown parallel backend '{parallel_cfg.backend}'")
