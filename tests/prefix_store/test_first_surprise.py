"""The `first_surprise` scorer and the per-row path surprise it reads from the shard."""
import numpy as np
from hypothesis import given, settings, strategies as st

from protocol.messages import Rollout
from prefix_store.tree import PoolCandidates, PrefixShard

V = 8


def shard(scorer="first_surprise", **kw):
    return PrefixShard(scorer=scorer, beta=0.5, max_branches_per_position=4, max_tokens=100_000, vocab_size=V,
                       seed=0, **kw)


def rollout(root, tokens, surprise, prefix=(), reward=0.0, rid=0):
    """A rollout whose token t was sampled with surprise[t] = top1_logprob - logprob."""
    n = len(tokens)
    top1 = [-0.5] * n
    return Rollout(request_id=rid, root_id=root, prompt_ids=[1, 2], prefix_ids=list(prefix), token_ids=list(tokens),
                   logprobs=[t - s for t, s in zip(top1, surprise)], entropy=[1.0] * n, top1_logprobs=top1,
                   alt_token_ids=[7] * n, alt_logprobs=[-1.0] * n, reward=reward, policy_version=0, actor_id=0)


def brute_force_path_surprise(s: PrefixShard) -> np.ndarray:
    """For each pool row: walk up its node ancestry and take the max surprise of the earlier rows."""
    p, c = s.pool, s.nodes
    surprise = p["top1"][: p.n].astype(np.float64) - p["logprob"][: p.n].astype(np.float64)
    out = np.zeros(p.n)
    for t in range(p.n):
        node = int(p["owner"][t])
        rows = list(range(int(c["off"][node]), t))
        parent = int(c["parent"][node])
        while parent >= 0:
            off = int(c["off"][parent])
            rows += range(off, off + int(c["length"][parent]))
            parent = int(c["parent"][parent])
        out[t] = max([0.0] + [max(0.0, surprise[u]) for u in rows])
    return out


def test_first_wrong_turn_is_chosen_not_the_largest_surprise():
    s = shard()
    # confident, confident, first surprise (1.5), then a larger surprise below it (3.0)
    s.insert([rollout("a", [3, 4, 5, 6, 2], [0.0, 0.0, 1.5, 3.0, 0.0])])
    bp = s.select(1)[0]
    assert bp.prefix_ids == [3, 4] and bp.token_id == 5
    plain = shard(scorer="surprise")
    plain.insert([rollout("a", [3, 4, 5, 6, 2], [0.0, 0.0, 1.5, 3.0, 0.0])])
    assert plain.select(1)[0].token_id == 6  # plain surprise goes below the wrong turn


def test_path_surprise_follows_branches():
    s = shard()
    s.insert([rollout("a", [3, 4, 5], [0.0, 2.0, 0.0])])
    s.insert([rollout("a", [1, 6], [0.0, 0.5], prefix=[3])])  # a sibling under [3]: never saw the 2.0 surprise
    ps = PoolCandidates(s).path_surprise
    assert np.allclose(ps, brute_force_path_surprise(s), atol=1e-2)
    rows = {tuple(s.path_tokens(int(s.pool["owner"][t]))): t for t in range(s.pool.n)}
    assert ps[rows[(3, 1, 6)]] < 0.1  # under [3, 1] the path was confident
    assert ps[rows[(3, 4, 5)]] > 1.9  # under [3, 4] it was not


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, V - 1), min_size=1, max_size=6),
                          st.lists(st.floats(0.0, 5.0), min_size=6, max_size=6)), min_size=1, max_size=12))
def test_property_path_surprise_equals_brute_force(trajectories):
    s = shard()
    for i, (tokens, surprise) in enumerate(trajectories):
        s.insert([rollout("r", tokens, surprise[: len(tokens)], rid=i)])
    assert np.allclose(PoolCandidates(s).path_surprise, brute_force_path_surprise(s), atol=1e-2)
