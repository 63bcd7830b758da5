import math
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from actors.messages import Rollout
from prefix_store.tree import PrefixShard, StoreInputError

V = 16


def shard(**kw):
    args = dict(scorer="entropy", beta=0.5, max_branches_per_position=2, max_nodes=10_000, vocab_size=V, seed=0)
    args.update(kw)
    return PrefixShard(**args)


def rollout(root, tokens, reward=0.0, prefix=(), ent=None, rid=0, ref=-1):
    n = len(tokens)
    return Rollout(request_id=rid, root_id=root, prompt_ids=[1, 2], prefix_ids=list(prefix), token_ids=list(tokens),
                   logprobs=[-1.0] * n, entropy=list(ent) if ent else [0.5] * n, top1_logprobs=[-0.5] * n,
                   reward=reward, policy_version=0, actor_id=0, branch_ref=ref)


def test_shared_prefix_splits_edge_and_counts_outcomes():
    s = shard()
    s.insert([rollout("a", [3, 5, 8, 2], 1.0), rollout("a", [3, 5, 9, 1], 0.0)])
    assert sorted(s.trajectories("a")) == [[3, 5, 8, 2], [3, 5, 9, 1]]
    shared = s.node_at("a", [3, 5])
    assert shared.tokens == [3, 5] and shared.visits == 2 and shared.reward_sum == 1.0
    assert s.node_at("a", [3, 5, 8]).visits == 1
    # soft value V = beta * log mean exp(r/beta) over the two continuations
    assert shared.soft_value(0.5) == pytest.approx(0.5 * math.log((math.exp(2.0) + 1.0) / 2))


def test_select_prefers_high_entropy_and_respects_branch_limit():
    s = shard(max_branches_per_position=1)
    s.insert([rollout("a", [3, 5, 8], ent=[0.1, 0.9, 0.2])])
    first = s.select(1)[0]
    assert first.prefix_ids == [3] and first.token_id == 5  # the high-entropy token is resampled
    second = s.select(1)[0]
    assert second.prefix_ids == [3, 5]  # position 1 was used up; next best is position 2
    assert s.select(5) == []  # position 0 is a root start, the rest are used up


def test_branch_insert_extends_existing_prefix():
    s = shard()
    s.insert([rollout("a", [3, 5, 8], 0.0)])
    bp = s.select(1)[0]
    s.insert([rollout("a", [7, 7], 1.0, prefix=bp.prefix_ids, ref=bp.ref)])
    assert [bp.prefix_ids + [7, 7]] == [t for t in s.trajectories("a") if t[-1] == 7]
    assert s.outstanding == {}


@pytest.mark.parametrize("bad", [
    dict(tokens=[3, 99]), dict(tokens=[]), dict(tokens=[3], reward=float("nan")), dict(tokens=[3], prefix=[4, 4]),
])
def test_bad_input_rejected_and_store_unchanged(bad, tmp_path):
    s = shard()
    s.insert([rollout("a", [3, 5], 1.0)])
    s.snapshot(str(tmp_path / "before.gz"))
    kw = dict(reward=0.0)
    kw.update(bad)
    with pytest.raises(StoreInputError):
        s.insert([rollout("b", [4], 1.0), rollout("a", **kw)])
    s.snapshot(str(tmp_path / "after.gz"))
    import gzip
    assert gzip.open(tmp_path / "before.gz").read() == gzip.open(tmp_path / "after.gz").read()


def test_eviction_keeps_pinned_trees():
    s = shard(max_nodes=4)
    s.insert([rollout("a", [3, 5], 1.0)])
    bp = s.select(1)[0]
    assert bp.root_id == "a"
    for i in range(6):
        s.insert([rollout(f"r{i}", [3 + i % 5], 0.0)])
    assert "a" in s.trees and s.num_nodes <= 4 + 2


trajectories = st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.integers(4, 7), min_size=1, max_size=6),
                                  st.sampled_from([0.0, 1.0])), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(trajectories)
def test_property_readback_and_statistics(trajs):
    s = shard()
    for root, toks, r in trajs:
        s.insert([rollout(root, toks, r)])
    for root in {t[0] for t in trajs}:
        mine = [(toks, r) for rt, toks, r in trajs if rt == root]
        stored = s.trajectories(root)
        # every inserted trajectory is a stored leaf path or a prefix of one
        for toks, _ in mine:
            assert any(path[: len(toks)] == toks for path in stored)
        # statistics at every node = sums over the trajectories through its edge
        stack = list(s.trees[root].root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            path = s.path_tokens(node)
            through = [r for toks, r in mine if toks[: len(path)] == path]
            assert node.visits == len(through)
            assert node.reward_sum == pytest.approx(sum(through))


@settings(max_examples=30, deadline=None)
@given(trajectories)
def test_property_snapshot_restore_roundtrip(tmp_path_factory, trajs):
    s = shard()
    for root, toks, r in trajs:
        s.insert([rollout(root, toks, r)])
    s.select(2)
    p = str(tmp_path_factory.mktemp("snap") / "s.gz")
    s.snapshot(p)
    t = shard()
    t.restore(p)
    for root in s.trees:
        assert sorted(t.trajectories(root)) == sorted(s.trajectories(root))
    assert t.outstanding == s.outstanding
    p2 = p + "2"
    t.snapshot(p2)
    import gzip
    assert gzip.open(p).read() == gzip.open(p2).read()
