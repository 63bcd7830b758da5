"""Soak: concurrent clients insert rollouts and take and return branch points on 2 real Ray shards for a while.

The memory bound is small, so trees are evicted all the time; a tiny replay
log forces recovery snapshots; one shard is killed by pid halfway. Asserts no
errors, the bound at every observation, every handed-out branch point back,
and stored tokens = tokens the clients added - tokens evicted.
"""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from omegaconf import OmegaConf

from launch.config import StoreConfig
from prefix_store.store import PrefixStore
from tests.prefix_store.test_store_faults import kill_shard
from tests.prefix_store.workload import LENGTH, VOCAB, from_branch_point, fresh, max_tree_tokens

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SOAK_S = float(os.environ.get("GRAFTRL_SOAK_S", "15"))
CLIENTS, K, PROMPTS, SAMPLES, N_ROOTS, LOG = 4, 3, 3, 2, 400, 1000
# Trees with handed-out branch points cannot be evicted: the bound must hold even if all of them sit on one shard.
MAX_TOKENS = CLIENTS * K * max_tree_tokens() + 200


def client(store: PrefixStore, seed: int, stop: threading.Event) -> dict:
    """The driver's cycle: select, serve most branch points and some fresh prompts, insert, release the rest."""
    rng = np.random.default_rng(seed)
    n = {"loops": 0, "added": 0, "rollouts": 0, "handed": 0, "served": 0, "released": 0}
    while not stop.is_set():
        bps = store.select(K)
        served = [bp for bp in bps if rng.random() < 0.8]
        unserved = [bp for bp in bps if bp not in served]
        rs = [r for bp in served for r in from_branch_point(rng, bp, SAMPLES, n["loops"])]
        rs += fresh(rng, N_ROOTS, PROMPTS, SAMPLES, n["loops"])
        n["added"] += store.insert(rs)
        store.release([(bp.root_id, bp.ref) for bp in unserved])
        n["loops"] += 1
        n["rollouts"] += len(rs)
        n["handed"] += len(bps)
        n["served"] += len(served)
        n["released"] += len(unserved)
    return n


@pytest.mark.timeout(SOAK_S + 180)  # a lost wakeup or a deadlock fails the test instead of hanging the suite
def test_soak_concurrent_clients_bound_counts_and_a_killed_shard(tmp_path):
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        cfg = OmegaConf.structured(StoreConfig(num_shards=2, beta=0.5, max_tokens=MAX_TOKENS))
        store = PrefixStore(store_cfg=cfg, vocab_size=VOCAB, seed=0, replay_log_tokens=LOG, recovery_dir=str(tmp_path))
        stop = threading.Event()
        observations, killed = 0, False
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, store, 100 + c, stop) for c in range(CLIENTS)]
            t0 = time.time()
            while time.time() - t0 < SOAK_S and not any(f.done() for f in futures):  # a client that stops raised
                per_shard = store.shard_stats()
                assert all(s["tokens"] <= MAX_TOKENS for s in per_shard), per_shard
                assert sum(s["outstanding"] for s in per_shard) <= CLIENTS * K, per_shard
                assert store.stats()["replay_log_tokens"] <= 2 * (LOG + (K + PROMPTS) * SAMPLES * LENGTH)
                observations += 1
                if not killed and time.time() - t0 > SOAK_S / 2:
                    kill_shard(store, 0)
                    killed = True
                time.sleep(0.05)
            stop.set()
            counts = [f.result() for f in futures]  # re-raises any client error
        per_shard, total = store.shard_stats(), store.stats()
        added = sum(c["added"] for c in counts)
        print(f"soak {SOAK_S:.0f} s: {sum(c['loops'] for c in counts)} client cycles, "
              f"{sum(c['rollouts'] for c in counts)} rollouts, {added} tokens added, {observations} observations, "
              f"{total}")
        assert killed and total["shard_restarts"] == 1 and total["recovery_snapshots"] > 0
        assert all(c["loops"] > 10 and c["handed"] == c["served"] + c["released"] for c in counts), counts
        assert all(s["tokens"] <= MAX_TOKENS and s["outstanding"] == 0 for s in per_shard), per_shard
        assert total["evicted_trees"] > 0 and total["roots"] <= N_ROOTS
        assert total["tokens"] == added - total["evicted_tokens"]
        assert sum(c["served"] for c in counts) > 0 and sum(c["released"] for c in counts) > 0
    finally:
        ray.shutdown()
