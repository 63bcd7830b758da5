"""PrefixStore: PrefixShard actors behind one client; roots map to shards by a stable hash.

`num_shards=0` keeps a single shard in-process (same API), for tests and debugging.
Global top-k = merge of per-shard top-k by score, then each shard claims its winners.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import ray

from actors.messages import BranchPoint, Rollout
from prefix_store.tree import PrefixShard


def shard_of(root_id: str, num_shards: int) -> int:
    """Stable across processes and runs (unlike Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(root_id.encode(), digest_size=8).digest(), "little") % num_shards


class PrefixStore:
    def __init__(self, *, store_cfg, vocab_size: int, seed: int, remote: bool = True):
        if store_cfg.beta is None:
            raise ValueError("store.beta is unresolved; load the config with launch.config.load_config (it sets beta)")
        kwargs = dict(scorer=store_cfg.scorer, beta=store_cfg.beta, max_tokens=store_cfg.max_tokens,
                      max_branches_per_position=store_cfg.max_branches_per_position, vocab_size=vocab_size,
                      branch_action=store_cfg.branch_action, step_delimiter=store_cfg.step_delimiter,
                      scorer_weights=dict(store_cfg.scorer_weights))
        self.remote = remote
        n = max(1, store_cfg.num_shards)
        if remote:
            cls = ray.remote(PrefixShard).options(num_cpus=0)
            self.shards = [cls.remote(seed=seed + i, **kwargs) for i in range(n)]
        else:
            self.shards = [PrefixShard(seed=seed + i, **kwargs) for i in range(n)]

    def _call(self, calls):
        """calls: list of (shard index, method name, args); runs them (in parallel when remote)."""
        if self.remote:
            return ray.get([getattr(self.shards[i], m).remote(*a) for i, m, a in calls])
        return [getattr(self.shards[i], m)(*a) for i, m, a in calls]

    def insert(self, rollouts: list[Rollout]) -> int:
        by_shard = defaultdict(list)
        for r in rollouts:
            by_shard[shard_of(r.root_id, len(self.shards))].append(r)
        return sum(self._call([(i, "insert", (rs,)) for i, rs in by_shard.items()]))

    def select(self, k: int) -> list[BranchPoint]:
        if k <= 0:
            return []
        tops = self._call([(i, "peek", (k,)) for i in range(len(self.shards))])
        best = sorted((bp for top in tops for bp in top), key=lambda bp: -bp.score)[:k]
        by_shard = defaultdict(list)
        for bp in best:
            by_shard[shard_of(bp.root_id, len(self.shards))].append(bp)
        claimed = [bp for part in self._call([(i, "claim", (bps,)) for i, bps in by_shard.items()]) for bp in part]
        return sorted(claimed, key=lambda bp: -bp.score)

    def soft_values(self, rollouts: list[Rollout]) -> list[list[float]]:
        """V(s_t) before each new token of each (inserted) rollout, from its shard's statistics."""
        by_shard = defaultdict(list)
        for k, r in enumerate(rollouts):
            by_shard[shard_of(r.root_id, len(self.shards))].append(k)
        out: list[list[float]] = [[] for _ in rollouts]
        calls = [(i, "soft_values", ([(rollouts[k].root_id, rollouts[k].continuation, len(rollouts[k].prefix_ids))
                                      for k in ks],)) for i, ks in by_shard.items()]
        for (_, ks), vals in zip(by_shard.items(), self._call(calls)):
            for k, v in zip(ks, vals):
                out[k] = v
        return out

    def release(self, handles: list[tuple[str, int]]) -> None:
        """Unpin branch points whose request was not served: (root_id, ref) pairs."""
        by_shard = defaultdict(list)
        for root_id, ref in handles:
            by_shard[shard_of(root_id, len(self.shards))].append(ref)
        self._call([(i, "release", (refs,)) for i, refs in by_shard.items()])

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = defaultdict(float)
        for s in self._call([(i, "stats", ()) for i in range(len(self.shards))]):
            for k, v in s.items():
                total[k] += v
        return dict(total)

    def snapshot(self, path_prefix: str) -> None:
        """One file per shard: <path_prefix>.shard<i>.npz."""
        self._call([(i, "snapshot", (f"{path_prefix}.shard{i}.npz",)) for i in range(len(self.shards))])

    def restore(self, path_prefix: str) -> None:
        self._call([(i, "restore", (f"{path_prefix}.shard{i}.npz",)) for i in range(len(self.shards))])
