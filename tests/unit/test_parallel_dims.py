"""ParallelDims: validated without building a mesh."""
import pytest

from parallel.dims import ParallelDims, ParallelDimsError


def test_resolves_the_remaining_shard_degree():
    dims = ParallelDims.resolve(8, dp_replicate=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.sp, dims.dp_degree) == (2, 4, 1, 8)
    assert ParallelDims.resolve(8, dp_shard=4, sp=2).dp_degree == 4


@pytest.mark.parametrize("world,kwargs,fragment", [
    (8, dict(dp_replicate=3), "not divisible"),
    (8, dict(dp_replicate=2, dp_shard=2), "= 4, but the world size is 8"),
    (4, dict(sp=0), "parallel.sp must be >= 1"),
    (4, dict(dp_shard=0), "parallel.dp_shard must be >= 1 or -1"),
])
def test_products_that_do_not_match_the_world_size(world, kwargs, fragment):
    with pytest.raises(ParallelDimsError, match=fragment):
        ParallelDims.resolve(world, **kwargs)
