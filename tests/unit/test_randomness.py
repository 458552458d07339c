"""Draws are pure functions of (seed, step, global sample index, purpose): rank layout does not change them."""
import torch

from data.toy import ToyStream, load_toy
from parallel.randomness import StepRandom, _mix32, counter_normal, derive_seed, sample_indices


def test_two_ranks_draw_what_one_rank_draws():
    one = StepRandom(5, 3, sample_indices(3, 8, 0, 1))
    halves = [StepRandom(5, 3, sample_indices(3, 8, r, 2)) for r in range(2)]
    for purpose in ("noise", "t"):
        full = one.normal(purpose, (4,))
        for rank, half in enumerate(halves):   # rank r holds global positions r, r + 2, ... (streaming's layout)
            assert torch.equal(half.normal(purpose, (4,)), full[rank::2])
    for rank, half in enumerate(halves):
        assert torch.equal(half.uniform("u"), one.uniform("u")[rank::2])


def test_ranks_and_micro_batches_partition_the_global_batch():
    from data.streaming_import import import_streaming
    import_streaming()
    from streaming.base.partition import get_partitions
    for world_size in (1, 2, 4):
        held = [sample_indices(3, 8, r, world_size) for r in range(world_size)]
        assert sorted(i for r in held for i in r) == list(range(24, 32))
        # streaming's own partition of a 64-sample epoch, batch 8 / world_size per rank: the same positions
        ids = get_partitions("orig", 64, 1, 1, world_size, 1, 8 // world_size, 0)[0, :, 0, 3]   # [ranks, local]
        assert [list(r) for r in held] == [[int(i) for i in row] for row in ids]


def test_draws_differ_by_purpose_step_seed_and_sample():
    base = StepRandom(0, 0, [0, 1]).normal("a", (3,))
    assert not torch.equal(base[0], base[1])
    for other in (StepRandom(0, 0, [0, 1]).normal("b", (3,)), StepRandom(0, 1, [0, 1]).normal("a", (3,)),
                  StepRandom(1, 0, [0, 1]).normal("a", (3,))):
        assert not torch.equal(base, other)
    assert torch.equal(base, StepRandom(0, 0, [0, 1]).normal("a", (3,)))


def test_shared_draw_ignores_sample_indices():
    ks = {StepRandom(0, 9, range(r * 4, r * 4 + 4)).shared_randint("k", 4) for r in range(8)}
    assert len(ks) == 1


def test_derive_seed_is_stable():
    # a fixed value: a change here silently changes every run's randomness, so it must be deliberate
    assert derive_seed(0, 1, "x") == 7004349269625516065
    assert derive_seed(0, 1, "x") != derive_seed(1, 0, "x")
    assert 0 <= derive_seed(2**40, -1, "purpose") < 2**63


def test_the_tensor_hash_is_lowbias32_exactly():
    """The device hash equals lowbias32 computed on Python integers (its published definition: multiply mod 2^32)
    over the edges of [0, 2^32) and random words: changing how the tensor ops reach it changes no draw."""
    mask = 0xFFFFFFFF

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    words = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1,
             *torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(0)).tolist()]
    assert _mix32(torch.tensor(words, dtype=torch.int64)).tolist() == [lowbias32(w) for w in words]


def test_toy_stream_is_a_pure_function_of_sample_index():
    stream = ToyStream(load_toy("digits"), seed=0)
    n = len(stream.dataset.train_x)
    x_all, _ = stream.batch(range(0, n))
    # one epoch is a permutation: every training sample exactly once
    assert torch.equal(torch.sort(x_all.sum(1)).values, torch.sort(stream.dataset.train_x.sum(1)).values)
    x_a, _ = ToyStream(load_toy("digits"), seed=0).batch(range(n - 3, n + 3))   # across the epoch boundary
    x_b = torch.cat([stream.batch(range(n - 3, n))[0], stream.batch(range(n, n + 3))[0]])
    assert torch.equal(x_a, x_b)


def test_counter_draws_have_the_moments_of_their_law_and_regenerate_from_their_key():
    rand = StepRandom(7, 2, range(0, 4))
    x = rand.normal("noise", (250_000,)).double()                       # [4, 250000]
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert abs((x ** 4).mean() - 3) < 0.05                               # kurtosis: the tails are Gaussian
    assert abs(((x > 1.96).double().mean()) - 0.025) < 0.002
    assert torch.corrcoef(x).triu(1).abs().max() < 0.01                  # samples are independent
    u = StepRandom(7, 2, range(0, 200_000)).uniform("t").double()
    assert 0.0 <= u.min() and u.max() < 1.0
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi_square = ((counts - len(u) / 16) ** 2 / (len(u) / 16)).sum()
    assert chi_square < 40                                               # 15 dof: p ~ 5e-4 at 40
    assert torch.equal(counter_normal(rand.key("noise"), torch.tensor([2]), (250_000,))[0], x[2].float())


def test_the_cached_toy_data_is_on_the_cpu_whoever_loads_it_first():
    """A first load under torch.device("meta") (a network shell being built) used to cache meta tensors for the
    whole process: every later toy test in that pytest process failed on them."""
    load_toy.cache_clear()
    with torch.device("meta"):
        dataset = load_toy("digits")
    assert dataset.train_x.device.type == "cpu" and load_toy("digits").train_x.device.type == "cpu"
