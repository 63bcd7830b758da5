"""A prefix-store shard killed by pid (SIGKILL) comes back as the last snapshot plus the replayed log: nothing lost.

Every test drives two stores with the same calls: real Ray shards that get
killed, and an in-process reference that never is. After the kills both must
agree on shard stats, on the branch points they hand out (refs included) and
on their snapshot files, array by array.
"""
import json
import os
import signal
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from launch.config import StoreConfig
from prefix_store.store import PrefixStore, shard_of
from tests.prefix_store.workload import VOCAB, from_branch_point, fresh

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]  # a hung revival fails instead of blocking the suite
N_ROOTS, PROMPTS, SAMPLES, BRANCHES = 12, 4, 2, 3


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    yield ray
    ray.shutdown()


def make_store(remote: bool, branch_action: str = "resample", **kw) -> PrefixStore:
    cfg = OmegaConf.structured(StoreConfig(num_shards=2, scorer="outcome_uncertainty", beta=0.5,
                                           branch_action=branch_action, max_tokens=120))
    return PrefixStore(store_cfg=cfg, vocab_size=VOCAB, seed=0, remote=remote, **kw)


class Pair:
    """The store under test and its never-killed reference, fed the same calls."""

    def __init__(self, branch_action="resample", seed=0, **kw):
        self.live, self.ref = make_store(True, branch_action, **kw), make_store(False, branch_action)
        self.rng = np.random.default_rng(seed)
        self.inserted = []  # every rollout inserted, in order

    def select(self, k=BRANCHES):
        got, want = self.live.select(k), self.ref.select(k)
        assert got == want  # same positions, scores and refs
        return got

    def serve(self, bps, version=0):
        """Serve all branch points but the last (released unserved, as after a failed request), plus fresh prompts."""
        self.live.release([(bp.root_id, bp.ref) for bp in bps[-1:]])
        self.ref.release([(bp.root_id, bp.ref) for bp in bps[-1:]])
        rs = [r for bp in bps[:-1] for r in from_branch_point(self.rng, bp, SAMPLES, version)]
        rs += fresh(self.rng, N_ROOTS, PROMPTS, SAMPLES, version)
        assert self.live.insert(rs) == self.ref.insert(rs)
        self.inserted += rs

    def step(self, version=0):
        self.serve(self.select(), version)

    def assert_equal(self, tmp_path):
        assert self.live.shard_stats() == self.ref.shard_stats()
        assert self.live.soft_values(self.inserted[-8:]) == self.ref.soft_values(self.inserted[-8:])
        for name, store in (("live", self.live), ("ref", self.ref)):
            store.snapshot(str(tmp_path / name))
        for i in range(2):
            with np.load(tmp_path / f"live.shard{i}.npz") as a, np.load(tmp_path / f"ref.shard{i}.npz") as b:
                assert a.files == b.files
                for k in a.files:
                    if k != "meta":
                        np.testing.assert_array_equal(a[k], b[k], err_msg=f"shard {i} column {k}")
                assert json.loads(bytes(a["meta"])) == json.loads(bytes(b["meta"]))
        self.select(2 * BRANCHES)  # and they keep handing out the same points


def kill_shard(store: PrefixStore, i: int) -> int:
    """SIGKILL shard i's process and wait until it is gone; returns its pid."""
    import ray

    pid = ray.get(store.shards[i].pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"shard process {pid} still alive 10 s after SIGKILL")
    return pid


def test_killed_shard_is_snapshot_plus_replay_and_loses_nothing(ray_session, tmp_path):
    p = Pair()
    for v in range(4):
        p.step(v)
    p.live.snapshot(str(tmp_path / "snap"))
    assert p.live.stats()["replay_log_tokens"] == 0
    since = len(p.inserted)
    for v in range(4, 7):
        p.step(v)
    held = p.select()  # handed out, not yet returned when the shard dies
    assert any(shard_of(bp.root_id, 2) == 0 for bp in held)
    old_pid = kill_shard(p.live, 0)
    before_kill = len(p.inserted)
    p.serve(held, 7)  # the first call after the kill finds the shard dead, revives it and retries
    assert ray_session.get(p.live.shards[0].pid.remote()) != old_pid
    s = p.live.stats()
    assert s["shard_restarts"] == 1
    assert s["replayed_inserts"] == sum(shard_of(r.root_id, 2) == 0 for r in p.inserted[since:before_kill]) > 0
    assert s["evicted_trees"] > 0  # the bound was exercised before and after the kill
    for v in range(8, 10):
        p.step(v)
    p.assert_equal(tmp_path)


def test_kill_without_any_snapshot_replays_from_empty_with_forced_branches(ray_session, tmp_path):
    p = Pair(branch_action="force", seed=1)
    for v in range(3):
        p.step(v)
    held = p.select()
    kill_shard(p.live, 1)
    p.serve(held, 3)  # forced rollouts need their claims: the replay restored them with the same refs
    p.step(4)
    kill_shard(p.live, 0)
    kill_shard(p.live, 1)
    p.step(5)  # select() meets both dead shards in one call
    s = p.live.stats()
    assert s["shard_restarts"] == 3 and s["replayed_inserts"] > 0
    p.assert_equal(tmp_path)


def test_full_replay_log_snapshots_the_shard_instead_of_dropping(ray_session, tmp_path):
    p = Pair(replay_log_tokens=40, recovery_dir=str(tmp_path / "recovery"))
    for v in range(6):
        p.step(v)
        assert p.live.stats()["replay_log_tokens"] <= 2 * 40  # bound per shard
    assert p.live.stats()["recovery_snapshots"] > 0
    assert sorted(os.listdir(tmp_path / "recovery")) == ["recovery.shard0.npz", "recovery.shard1.npz"]
    kill_shard(p.live, 0)
    p.step(6)
    assert p.live.stats()["shard_restarts"] == 1
    p.assert_equal(tmp_path)


def test_rejected_batch_on_one_shard_keeps_the_other_shards_part_logged(ray_session, tmp_path):
    """A bad rollout rejects its shard's part only; the part another shard stored must survive that shard's death."""
    from prefix_store.tree import StoreInputError

    p = Pair(seed=2)
    p.step()
    good = fresh(p.rng, N_ROOTS, PROMPTS, SAMPLES)
    on0 = [r for r in good if shard_of(r.root_id, 2) == 0]
    bad = next(r for r in fresh(p.rng, N_ROOTS, N_ROOTS, 1) if shard_of(r.root_id, 2) == 1)
    bad.token_ids[0] = VOCAB + 3
    with pytest.raises(StoreInputError, match="outside the vocabulary"):
        p.live.insert(on0 + [bad])
    p.ref.insert(on0)
    before = p.live.shard_stats()
    kill_shard(p.live, 0)
    assert p.live.shard_stats() == before == p.ref.shard_stats()
    p.assert_equal(tmp_path)
