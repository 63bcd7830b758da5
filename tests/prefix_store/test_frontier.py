"""The `frontier` scorer: per root the deepest first-surprise position, one branch point per root, resampled."""
import numpy as np

from prefix_store.frontier import frontier_positions
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
