"""The `frontier` scorer: per root the deepest first-surprise position, one branch point per root, resampled."""
import numpy as np

from prefix_store.frontier import frontier_positions
from protocol.messages import Rollout
from prefix_store.tree import PoolCandidates, PrefixShard
from tests.prefix_store.test_first_surprise import rollout

V = 8


def shard(**kw):
    return PrefixShard(scorer="frontier", beta=0.5, max_branches_per_position=4, max_tokens=100_000, vocab_size=V,
                       seed=0, **kw)


def test_frontier_positions_on_plain_arrays():
    root = np.array([0, 0, 0, 0, 1, 1, 2])
    depth = np.array([1, 2, 3, 4, 0, 2, 1])
    surprise = np.array([0.5, 0.0, 1.0, 2.0, 0.0, 0.7, 0.0])
    before = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # row 3 lies below an earlier surprise: not a first one
    got = frontier_positions(root, depth, surprise, before)
    assert got.tolist() == [False, False, True, False, False, True, False]  # root 0: depth 3 beats 1; root 2: none


def test_one_branch_point_per_root_at_its_deepest_first_wrong_turn():
    s = shard()
    s.insert([rollout("a", [3, 4, 5, 6, 2], [0.0, 1.2, 0.0, 3.0, 0.0]),  # first surprise at depth 1
              rollout("a", [3, 5, 4, 1, 2], [0.0, 0.0, 0.0, 0.9, 0.0], rid=1),  # deeper: depth 3
              rollout("b", [6, 6, 2], [0.0, 0.4, 0.0], rid=2),  # depth 1
              rollout("c", [1, 2], [0.0, 0.0], rid=3)])  # never surprised: no frontier
    bps = s.select(5)
    assert [(bp.root_id, bp.prefix_ids, bp.token_id) for bp in bps] == [("a", [3, 5, 4], 1), ("b", [6], 6)]
    assert all(bp.forced_token == -1 for bp in bps)  # resampled, not forced
    c = PoolCandidates(s)
    rows = {tuple(s.path_tokens(int(s.pool["owner"][t]))[: int(d) + 1]): int(d) for t, d in enumerate(c.depth)}
    assert rows[(3, 5, 4, 1)] == 3 and rows[(6,)] == 0  # depth counts continuation tokens before the position


def test_other_scorers_still_fill_every_slot():
    s = PrefixShard(scorer="first_surprise", beta=0.5, max_branches_per_position=4, max_tokens=100_000, vocab_size=V)
    s.insert([rollout("a", [3, 4, 5, 6, 2], [0.0, 1.2, 0.0, 3.0, 0.0])])
    assert len(s.select(3)) == 3  # finite scores everywhere: no position is skipped


def test_frontier_cannot_be_weighted_in_the_combined_scorer():
    import pytest

    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="store.scorer_weights names frontier, not scorers that can be combined"):
        load_config(None, ["store.scorer=combined", "store.scorer_weights.frontier=1.0"])
    assert load_config(None, ["store.scorer=frontier"]).store.scorer == "frontier"


def test_top1_tokens_at_logprobs_float16_rounds_up_are_not_surprises():
    """The top-1 column is float16, the sampled logprob float32: a top-1 token sampled at a logprob that float16
    rounds toward 0 must still have surprise 0, or every such right step would count as a first wrong turn."""
    lp = -0.69986  # float16 rounds it up to -0.69971: the raw difference of the columns is +1.5e-4
    assert float(np.float16(lp)) - lp > 1e-6
    s = shard()
    # path 1 leaves the chain at depth 1; path 2 at depth 4, its earlier (right) steps sampled at `lp` as top-1
    s.insert([rollout("a", [3, 4, 5, 6, 2], [0.0, 2.2, 0.0, 0.0, 0.0]),
              Rollout(request_id=1, root_id="a", prompt_ids=[1, 2], prefix_ids=[], token_ids=[3, 5, 6, 1, 4, 2],
                      logprobs=[lp, lp, lp, lp, -2.9, lp], entropy=[1.0] * 6, top1_logprobs=[lp, lp, lp, lp, lp, lp],
                      alt_token_ids=[7] * 6, alt_logprobs=[-1.0] * 6, reward=0.0, policy_version=0, actor_id=0)])
    bps = s.select(3)
    assert [(bp.root_id, bp.prefix_ids, bp.token_id) for bp in bps] == [("a", [3, 5, 6, 1], 4)]
    c = PoolCandidates(s)
    right = c.surprise < 1.0
    assert (c.surprise[right] == 0.0).all() and right.sum() == 8  # all but the two wrong turns
