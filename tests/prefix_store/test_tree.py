import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.messages import Rollout
from prefix_store.tree import PrefixShard, StoreInputError, top_m

V = 16


def shard(**kw):
    args = dict(scorer="entropy", beta=0.5, max_branches_per_position=2, max_tokens=100_000, vocab_size=V, seed=0)
    args.update(kw)
    return PrefixShard(**args)


def rollout(root, tokens, reward=0.0, prefix=(), ent=None, rid=0, ref=-1, forced=False, alt=None):
    n = len(tokens)
    return Rollout(request_id=rid, root_id=root, prompt_ids=[1, 2], prefix_ids=list(prefix), token_ids=list(tokens),
                   logprobs=[-1.0] * n, entropy=list(ent) if ent else [0.5] * n, top1_logprobs=[-0.5] * n,
                   alt_token_ids=list(alt) if alt else [15] * n, alt_logprobs=[-2.0] * n,
                   reward=reward, policy_version=0, actor_id=0, branch_ref=ref, forced=forced)


def test_shared_prefix_splits_edge_and_counts_outcomes():
    s = shard()
    s.insert([rollout("a", [3, 5, 8, 2], 1.0), rollout("a", [3, 5, 9, 1], 0.0)])
    assert s.trajectories("a") == [[3, 5, 8, 2], [3, 5, 9, 1]]
    shared = s.node_stats("a", [3, 5])
    assert shared["visits"] == 2 and shared["reward_sum"] == 1.0
    assert s.node_stats("a", [3, 5, 8])["visits"] == 1
    st = s.stats()  # root -> [3 5] -> {[8 2], [9 1]}: 3 edges out of 2 branching nodes
    assert (st["edges"], st["branching_nodes"], st["tokens"]) == (3, 2, 6)
    # soft value V = beta * log mean exp(r/beta) over the two continuations
    assert shared["soft_value"] == pytest.approx(0.5 * math.log((math.exp(2.0) + 1.0) / 2))


def test_select_prefers_high_entropy_and_respects_branch_limit():
    s = shard(max_branches_per_position=1)
    s.insert([rollout("a", [3, 5, 8], ent=[0.1, 0.9, 0.2])])
    first = s.select(1)[0]
    assert first.prefix_ids == [3] and first.token_id == 5  # the high-entropy token is resampled
    second = s.select(1)[0]
    assert second.prefix_ids == [3, 5]  # position 1 was used up; next best is position 2
    assert s.select(5) == []  # position 0 is a root start, the rest are used up


def test_global_topk_dedupes_sibling_prefixes():
    s = shard()
    s.insert([rollout("a", [3, 5], ent=[0.1, 0.9]), rollout("a", [3, 6], ent=[0.1, 0.9])])
    bps = s.select(5)
    assert [bp.prefix_ids for bp in bps] == [[3]]  # [3,5] and [3,6] branch from the same prefix [3]


def test_branch_insert_extends_existing_prefix():
    s = shard()
    s.insert([rollout("a", [3, 5, 8], 0.0)])
    bp = s.select(1)[0]
    s.insert([rollout("a", [7, 7], 1.0, prefix=bp.prefix_ids, ref=bp.ref)])
    assert bp.prefix_ids + [7, 7] in s.trajectories("a")
    assert s.outstanding == {}


def test_force_action_inserts_the_alternative_with_its_logprob():
    s = shard(branch_action="force")
    s.insert([rollout("a", [3, 5, 8], 0.0, ent=[0.1, 0.9, 0.2], alt=[4, 9, 4])])
    bp = s.select(1)[0]
    assert bp.prefix_ids == [3] and bp.forced_token == 9
    s.insert([rollout("a", [2], 1.0, prefix=bp.prefix_ids + [9], ref=bp.ref, forced=True)])
    assert [3, 9, 2] in s.trajectories("a")
    i = s.pool["tok"][: s.pool.n].tolist().index(9)
    assert s.pool["logprob"][i] == pytest.approx(-2.0)  # the alternative's logprob, not a sampled one


@pytest.mark.parametrize("bad", [
    dict(tokens=[3, 99]), dict(tokens=[]), dict(tokens=[3], reward=float("nan")), dict(tokens=[3], prefix=[4, 4]),
    dict(tokens=[3], ent=[float("nan")]), dict(tokens=[3], forced=True, prefix=[3]),
])
def test_bad_input_rejected_and_store_unchanged(bad, tmp_path):
    s = shard()
    s.insert([rollout("a", [3, 5], 1.0)])
    s.snapshot(str(tmp_path / "before.npz"))
    kw = dict(reward=0.0)
    kw.update(bad)
    with pytest.raises(StoreInputError):
        s.insert([rollout("b", [4], 1.0), rollout("a", **kw)])
    s.snapshot(str(tmp_path / "after.npz"))
    assert (tmp_path / "before.npz").read_bytes() == (tmp_path / "after.npz").read_bytes()


def test_unknown_root_is_a_clear_error():
    with pytest.raises(StoreInputError, match="unknown root 'zz'"):
        shard().trajectories("zz")


def test_rebalance_step_statistics():
    s = shard(step_delimiter=7)
    r = rollout("a", [3, 7, 4, 5, 7])
    r.top1_logprobs = np.log([0.9, 0.7, 0.5, 0.3, 0.1]).tolist()
    s.insert([r])
    conf = s.pool["step_conf"][: s.pool.n].astype(float)
    var = s.pool["step_var"][: s.pool.n].astype(float)
    assert np.allclose(conf, [0.8, 0.8, 0.3, 0.3, 0.3], atol=1e-3)
    assert np.allclose(var, [0, 0, 0.0625, 0.0625, 0.0625], atol=1e-3)


trajectories = st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.integers(4, 7), min_size=1, max_size=6),
                                  st.sampled_from([0.0, 1.0])), min_size=1, max_size=25)


def fill(s, trajs):
    for root, toks, r in trajs:
        s.insert([rollout(root, toks, r)])


@settings(max_examples=60, deadline=None)
@given(trajectories)
def test_property_exact_readback_and_statistics(trajs):
    s = shard()
    fill(s, trajs)
    for root in {t[0] for t in trajs}:
        mine = [(toks, r) for rt, toks, r in trajs if rt == root]
        assert s.trajectories(root) == sorted(toks for toks, _ in mine)
        # statistics at every prefix = sums over the trajectories through it
        for toks, _ in mine:
            for d in range(1, len(toks) + 1):
                through = [r for t2, r in mine if t2[:d] == toks[:d]]
                st_ = s.node_stats(root, toks[:d])
                assert st_["visits"] == len(through)
                assert st_["reward_sum"] == pytest.approx(sum(through))
                assert st_["reward_sq"] == pytest.approx(sum(r * r for r in through))


@settings(max_examples=40, deadline=None)
@given(trajectories, st.integers(1, 30), st.lists(st.integers(0, 2), max_size=5))
def test_property_eviction_respects_bound_and_pins(trajs, bound, picks):
    s = shard(max_tokens=10**6)
    fill(s, trajs)
    handed = [bp for k in picks for bp in s.select(k + 1)]
    s.max_tokens = bound
    s.evict()
    pinned = {bp.root_id for bp in handed}
    pinned_tokens = sum(len(t) for r in pinned for t in s.trajectories(r))
    assert s.live_tokens <= max(bound, pinned_tokens) + sum(len(t) for _, t, _ in trajs)  # sanity
    unpinned_left = [r for r in s.roots if r not in pinned]
    assert s.live_tokens <= bound or not unpinned_left  # only pinned trees may keep it above the bound
    for bp in handed:  # every handed-out branch point still resolves
        s.claim([bp])


@settings(max_examples=30, deadline=None)
@given(trajectories, st.integers(0, 3))
def test_property_snapshot_restore_roundtrip(tmp_path_factory, trajs, k):
    s = shard()
    fill(s, trajs)
    s.select(k)
    p = str(tmp_path_factory.mktemp("snap") / "s.npz")
    s.snapshot(p)
    t = shard()
    t.restore(p)
    for root in s.roots:
        assert t.trajectories(root) == s.trajectories(root)
    assert t.outstanding == s.outstanding and t.stats() == s.stats()
    assert [bp.prefix_ids for bp in t.peek(5)] == [bp.prefix_ids for bp in s.peek(5)]
    p2 = p + "2.npz"
    t.snapshot(p2)
    a, b = np.load(p), np.load(p2)
    assert all(np.array_equal(a[f], b[f]) for f in a.files)


def test_compaction_keeps_content():
    s = shard(max_tokens=50)
    for i in range(200):
        s.insert([rollout(f"r{i}", [4 + i % 3, 5, 6], float(i % 2))])
    assert s.live_tokens <= 50 and s.pool.n < 1024 + 2 * 50 + 3
    last = f"r{199}"
    assert s.trajectories(last) == [[4 + 199 % 3, 5, 6]]


def test_soft_values_along_a_path():
    beta = 0.5
    s = shard(beta=beta)
    s.insert([rollout("a", [3, 5, 8], 1.0), rollout("a", [3, 5, 9], 0.0), rollout("a", [4], 0.0)])
    V = lambda rs: beta * math.log(sum(math.exp(r / beta) for r in rs) / len(rs))
    (vals,) = s.soft_values([("a", [3, 5, 8], 0)])
    # V(prompt) over all three; V([3]) and V([3,5]) over the two through them
    assert vals == pytest.approx([V([1, 0, 0]), V([1, 0]), V([1, 0])])
    (tail,) = s.soft_values([("a", [3, 5, 8], 2)])
    assert tail == pytest.approx([V([1, 0])])
    with pytest.raises(StoreInputError):
        s.soft_values([("a", [6], 0)])


def test_soft_values_at_beta_zero_are_the_max_reward_below_each_node():
    """beta -> 0 is the hard max (learner.kl_coef=0 derives store.beta=0): V(s) = max r over the rollouts through s."""
    s = shard(beta=0.0)
    s.insert([rollout("a", [3, 5, 8], 1.0), rollout("a", [3, 5, 9], 0.25), rollout("a", [4], 0.5)])
    (vals,) = s.soft_values([("a", [3, 5, 9], 0)])
    assert vals == pytest.approx([1.0, 1.0, 1.0])
    (other,) = s.soft_values([("a", [4], 0)])
    assert other == pytest.approx([1.0])  # only the prompt: the max over all three
    s.insert([rollout("b", [7, 7], 0.25), rollout("b", [7, 6], 0.0)])
    (b,) = s.soft_values([("b", [7, 6], 1)])
    assert b == pytest.approx([0.25]) and all(math.isfinite(v) for v in b)


def test_top_m_equals_sorting_by_score_then_index_whatever_dead_rows_sit_between():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = int(rng.integers(1, 40)), int(rng.integers(1, 45))
        scores = rng.integers(0, 4, n).astype(np.float32) / 4  # many ties
        want = sorted(range(n), key=lambda i: (-scores[i], i))[:m]
        assert top_m(scores, m).tolist() == want
        dead = rng.random(n) < 0.3  # the same live rows with dead (-inf) rows between: the same live picks
        padded = np.concatenate([np.where(dead, -np.inf, scores)[:, None], np.full((n, 1), -np.inf)], 1).ravel()
        live = sorted((i for i in range(n) if not dead[i]), key=lambda i: (-scores[i], i))[:m]
        if live:
            assert (top_m(padded, len(live)) // 2).tolist() == live
