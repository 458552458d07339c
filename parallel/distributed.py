"""Process-group start-up: single process, or under torchrun (env:// rendezvous, gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import atexit
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp: int = 1              # sequence-parallel degree: consecutive ranks of one SP group hold the same samples

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel slot this rank reads: the SP axis is the mesh's innermost (parallel/dims.py)."""
        return self.rank // self.sp

    @property
    def dp_size(self) -> int:
        """Ranks that see different samples."""
        return self.world_size // self.sp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_seconds: int = 600, need_group: bool = False) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1. need_group: sharded backends need a process group (and a
    device mesh) even for one process; without torchrun a one-rank group on a free loopback port is made.
    The timeout makes a dead peer fail the group instead of hanging it forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if (world_size > 1 or need_group) and not dist.is_initialized():
        # destroyed at exit whatever the exit path: a gloo group left to the interpreter's teardown can abort the
        # process ("terminate called without an active exception", seen on workers with several groups: DCP's mesh)
        atexit.register(shutdown)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
            # what torchrun would have set: DeepSpeed reads these
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
    return DistInfo(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank0_value(value):
    """Rank 0's `value` on every rank (start-up decisions only: one small pickled broadcast)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
