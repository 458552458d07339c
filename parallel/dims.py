"""Named parallel axes: dp_replicate x dp_shard x sp = world size, validated before any mesh is built.

dp_replicate: HSDP replicas (gradients all-reduced between them); dp_shard: FSDP / ZeRO-3 shards within a replica;
sp: sequence-parallel ranks that share one sample (Ulysses). A value of -1 for dp_shard means "whatever is left".
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh


class ParallelDimsError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    sp: int
    world_size: int

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, sp: int = 1) -> "ParallelDims":
        for name, value in (("dp_replicate", dp_replicate), ("sp", sp)):
            if value < 1:
                raise ParallelDimsError(f"parallel.{name} must be >= 1 (got {value})")
        if dp_shard == -1:
            if world_size % (dp_replicate * sp):
                raise ParallelDimsError(f"world size {world_size} is not divisible by parallel.dp_replicate "
                                        f"({dp_replicate}) x parallel.sp ({sp})")
            dp_shard = world_size // (dp_replicate * sp)
        if dp_shard < 1:
            raise ParallelDimsError(f"parallel.dp_shard must be >= 1 or -1 (got {dp_shard})")
        product = dp_replicate * dp_shard * sp
        if product != world_size:
            raise ParallelDimsError(f"parallel.dp_replicate x dp_shard x sp = {dp_replicate} x {dp_shard} x {sp} = "
                                    f"{product}, but the world size is {world_size}")
        return cls(dp_replicate, dp_shard, sp, world_size)

    @property
    def dp_degree(self) -> int:
        """Ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str):
        """DeviceMesh with named dims; FSDP shards over 'dp_shard' (HSDP adds 'dp_replicate')."""
        return init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.sp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "sp"))

    def fsdp_mesh(self, mesh):
        """The mesh FSDP2 shards over: dp_shard, or with sp > 1 dp_shard x sp as one axis (the SP ranks of a sample
        hold different shards, and their partial gradients are reduced with the data-parallel ones:
        parallel/sequence.py says why a mean over dp_shard x sp is the right reduction); 2-D (dp_replicate, that)
        for HSDP. The merged axis is a mesh of its own over the same row-major rank layout (slicing a `_flatten`ed
        dim from the root mesh is deprecated in torch 2.13): its process groups are new, the ranks in them the same."""
        if self.sp == 1:
            return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
        merged = init_device_mesh(mesh.device_type, (self.dp_replicate, self.dp_shard * self.sp),
                                  mesh_dim_names=("dp_replicate", "dp_shard_sp"))
        return merged if self.dp_replicate > 1 else merged["dp_shard_sp"]

    def sequence_group(self, mesh):
        """This rank's sequence-parallel process group."""
        return mesh["sp"].get_group()
