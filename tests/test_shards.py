"""Properties of the pure sample-assignment functions in etsdm_dist.data.order, over a grid."""
from __future__ import annotations

import collections
import itertools

import pytest

from etsdm_dist.data import order as S

SHARD_LAYOUTS = [
    [7],                 # one shard
    [4, 4],
    [5, 1, 3],           # uneven
    [6, 0, 2, 9],        # an empty shard
    [3, 3, 3, 3, 2],
    [1, 1, 1, 1, 1],
]
GEOMETRIES = [  # (B, W, b): A = B / (W b)
    (4, 1, 4), (6, 1, 2), (6, 2, 3), (8, 2, 2), (6, 3, 1), (12, 3, 2), (8, 4, 1), (16, 4, 2),
]


def expand(plan: S.ShardPlan, positions: range) -> list[tuple[int, int, int]]:
    """(epoch, shard, sample) per position, through spans (the code under test)."""
    out = []
    for sp in plan.spans(positions):
        assert sp.count > 0
        assert 0 <= sp.first and sp.first + sp.count <= plan.shard_samples[sp.shard]
        out += [(sp.epoch, sp.shard, sp.first + i) for i in range(sp.count)]
    assert len(out) == len(positions)
    return out


def rank_stream(start, micro_batches, B, W, r, b, K):
    """A rank's micro-batches as its DataLoader yields them: workers polled round-robin."""
    gens = [S.worker_micro_batches(w, K) for w in range(max(1, K))]
    order = [next(gens[i % len(gens)]) for i in range(micro_batches)]
    return [S.rank_micro_batch_positions(start, j, B, W, r, b) for j in order]


@pytest.mark.parametrize("layout", SHARD_LAYOUTS, ids=str)
def test_every_sample_exactly_once_per_epoch(layout):
    plan = S.ShardPlan(layout, seed=3)
    n = plan.epoch_samples
    for epoch in range(4):
        got = expand(plan, range(epoch * n, (epoch + 1) * n))
        assert {e for e, _, _ in got} == {epoch}
        samples = [(s, i) for _, s, i in got]
        assert sorted(samples) == [(s, i) for s in range(len(layout)) for i in range(layout[s])]
        # shards visited in the epoch's permutation, each in stored order
        shard_seq = [s for s, _ in itertools.groupby(x for x, _ in samples)]
        assert shard_seq == [s for s in plan.order(epoch) if layout[s] > 0]
        for s in set(shard_seq):
            assert [i for x, i in samples if x == s] == list(range(layout[s]))


@pytest.mark.parametrize("layout", SHARD_LAYOUTS, ids=str)
def test_locate_agrees_with_spans_for_any_split(layout):
    plan = S.ShardPlan(layout, seed=11)
    whole = expand(plan, range(0, 3 * plan.epoch_samples + 5))
    assert [plan.locate(p) for p in range(len(whole))] == whole
    for cut in range(1, 7):  # the same positions through differently sized ranges
        pieces = []
        for p in range(0, len(whole), cut):
            pieces += expand(plan, range(p, min(p + cut, len(whole))))
        assert pieces == whole


@pytest.mark.parametrize("B,W,b", GEOMETRIES)
@pytest.mark.parametrize("layout", [[5, 1, 3], [3, 3, 3, 3, 2], [7]], ids=str)
def test_ranks_disjoint_complete_equal_and_same_global_order(layout, B, W, b):
    plan = S.ShardPlan(layout, seed=5)
    A = S.check_batch_geometry(B, W, b)
    start = 3  # a resume cursor that is not epoch aligned
    global_batches = 4
    micro = global_batches * A
    for K in range(4):
        per_rank = [rank_stream(start, micro, B, W, r, b, K) for r in range(W)]
        # equal sizes: every rank yields the same number of full micro-batches
        assert all(len(x) == micro and all(len(m) == b for m in x) for x in per_rank)
        # the training step order: for each global batch, micro-step a, then rank r
        seq = []
        for j in range(micro):
            for r in range(W):
                seq += list(per_rank[r][j])
        # any W, A, K: the concatenation is exactly the global sequence (disjoint and complete)
        assert seq == list(range(start, start + global_batches * B))
        # each global batch consists of the positions of that batch only
        for k in range(global_batches):
            batch = [p for r in range(W) for m in per_rank[r][k * A:(k + 1) * A] for p in m]
            assert sorted(batch) == list(range(start + k * B, start + (k + 1) * B))
    # and the samples: epochs covered completely, each sample once per epoch
    n = plan.epoch_samples
    seen = collections.Counter(expand(plan, range(0, (global_batches * B // n) * n)))
    assert all(c == 1 for c in seen.values())


def test_resume_with_different_world_size_sees_the_rest_once():
    layout = [5, 1, 3, 6]
    plan = S.ShardPlan(layout, seed=9)
    n = plan.epoch_samples
    B = 6
    # 2 ranks for 1 global batch, then resume at the cursor with 3 ranks
    first = [p for r in range(2) for p in S.rank_micro_batch_positions(0, 0, B, 2, r, 3)]
    cursor = S.position_after(0, 1, B, 2, 3)
    assert cursor == B == len(first)
    rest = []
    for j in range(3 * 2):  # 3 global batches of A = 6 / (3 * 1) = 2 micro-steps
        for r in range(3):
            rest += list(S.rank_micro_batch_positions(cursor, j, B, 3, r, 1))
    assert sorted(first + rest) == list(range(0, cursor + 3 * B))
    assert len(first + rest) == 4 * B
    # positions [0, n) are the whole epoch: the old and the new ranks together see it once
    got = [plan.locate(p) for p in first + rest if p < n]
    assert sorted(got) == sorted(set(got)) and len(got) == n


def test_position_after_counts_only_complete_global_batches():
    # B=8, W=2, b=2 -> A=2 micro-batches per rank per global batch
    assert S.position_after(10, 0, 8, 2, 2) == 10
    assert S.position_after(10, 1, 8, 2, 2) == 10
    assert S.position_after(10, 2, 8, 2, 2) == 18
    assert S.position_after(10, 5, 8, 2, 2) == 26


def test_permutation_deterministic_and_depends_on_seed_and_epoch():
    perms = {(seed, e): S.epoch_permutation(5, seed, e) for seed in range(3) for e in range(6)}
    for p in perms.values():
        assert sorted(p) == list(range(5))
    assert perms == {(seed, e): S.epoch_permutation(5, seed, e) for seed in range(3) for e in range(6)}
    assert len({tuple(perms[0, e]) for e in range(6)}) > 1  # changes with the epoch
    assert [perms[0, e] for e in range(6)] != [perms[1, e] for e in range(6)]  # and with the seed
    # a large permutation is not the identity and is roughly uniform in its first element
    assert S.epoch_permutation(100, 0, 0) != list(range(100))
    firsts = collections.Counter(S.epoch_permutation(4, 0, e)[0] for e in range(400))
    assert all(60 < firsts[i] < 140 for i in range(4))
    # pinned values: a change here silently changes the data order of resumed runs
    assert S.epoch_permutation(6, 0, 0) == [1, 4, 3, 2, 0, 5]


def test_hflip_deterministic_and_balanced():
    flips = [S.hflip(1, p) for p in range(2000)]
    assert flips == [S.hflip(1, p) for p in range(2000)]
    assert 900 < sum(flips) < 1100
    assert flips != [S.hflip(2, p) for p in range(2000)]


def test_geometry_errors_name_the_fields():
    with pytest.raises(ValueError, match="batch_images=10.*2 \\* 4"):
        S.check_batch_geometry(10, 2, 4)
    with pytest.raises(ValueError, match="rank 2"):
        S.rank_micro_batch_positions(0, 0, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="no samples"):
        S.ShardPlan([0, 0], 0)


@pytest.mark.parametrize("K,G", [(0, 3), (1, 2), (2, 2), (3, 4)])
def test_grouped_workers_yield_every_micro_batch_in_order(K, G):
    """Items of G consecutive micro-batches, workers polled round-robin: j = 0, 1, 2, ..."""
    gens = [S.worker_micro_batches(w, K, G) for w in range(max(1, K))]
    items = [[next(gens[i % len(gens)]) for _ in range(G)] for i in range(20)]
    assert [j for item in items for j in item] == list(range(20 * G))
    assert all(item == list(range(item[0], item[0] + G)) for item in items)
