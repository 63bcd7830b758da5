"""The sharded store: routing by stable hash, global top-k merged from shards, per-shard snapshots."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from protocol.messages import Rollout
from launch.config import StoreConfig
from prefix_store.store import PrefixStore, shard_of


def rollouts(n_roots=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_roots):
        for j in range(3):
            toks = rng.integers(4, 14, 6).tolist()
            out.append(Rollout(request_id=i * 3 + j, root_id=f"root{i}", prompt_ids=[1, i], prefix_ids=[], token_ids=toks,
                               logprobs=(-rng.random(6)).tolist(), entropy=rng.random(6).tolist(),
                               top1_logprobs=(-rng.random(6) / 10).tolist(), alt_token_ids=[4] * 6,
                               alt_logprobs=[-3.0] * 6, reward=float(j == 0), policy_version=0, actor_id=0))
    return out


def store(num_shards, remote=False, scorer="entropy"):
    cfg = OmegaConf.structured(StoreConfig(num_shards=num_shards, scorer=scorer, beta=0.1))
    return PrefixStore(store_cfg=cfg, vocab_size=16, seed=0, remote=remote)


def test_shard_of_is_stable_and_spreads():
    assert shard_of("root7", 4) == shard_of("root7", 4)
    assert len({shard_of(f"root{i}", 4) for i in range(50)}) == 4


def test_global_topk_equals_single_shard_topk():
    one, many = store(1), store(3)
    rs = rollouts()
    one.insert(rs)
    many.insert(rs)
    a, b = one.select(10), many.select(10)
    assert [round(x.score, 3) for x in a] == [round(x.score, 3) for x in b]
    assert {(x.root_id, tuple(x.prefix_ids)) for x in a} == {(x.root_id, tuple(x.prefix_ids)) for x in b}
    assert many.stats()["outstanding"] == 10


@pytest.mark.ray
def test_remote_shards_snapshot_and_restore(tmp_path):
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        s = store(2, remote=True)
        s.insert(rollouts())
        before = s.shard_stats()
        s.snapshot(str(tmp_path / "store"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store.shard0.npz", "store.shard1.npz"]
        fresh = store(2, remote=True)
        fresh.restore(str(tmp_path / "store"))
        assert fresh.shard_stats() == before
        assert [x.prefix_ids for x in fresh.select(4)] == [x.prefix_ids for x in s.select(4)]
    finally:
        ray.shutdown()
