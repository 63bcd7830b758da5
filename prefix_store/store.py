"""PrefixStore: PrefixShard actors behind one client; roots map to shards by a stable hash.

`remote=False` keeps the shards in-process (same API), for tests and debugging.
Global top-k = merge of per-shard top-k by score, then each shard claims its winners
(under every shard's lock, so no other client thread's insert evicts a peeked tree first).

Dead shards (issue #9). The client keeps, per shard, the path of its last
snapshot (its *base*) and a *replay log* of every state-changing call made
since (insert, claim, release, in the order the shard ran them). When a call
finds its shard dead (`RayActorError`: the process was killed, the node
went away), the client starts a new actor, restores the base (or starts
empty if there is none), replays the log and retries the call, so the new
shard equals the one that died, down to the refs of handed-out branch points
(so their continuations can still be inserted and released), and selects the
same positions with per-position scorers. Peeks are not logged, and a
restored shard's pool is compacted: the `random` scorer draws from the
snapshot's generator state and the `combined` scorer standardises over every
pool row, dead rows of evicted trees included, so those two may pick
differently after a revival (as after any restore); no stored data differs.

Why not Ray's `max_restarts`: a restarted actor comes back *empty* (its
constructor runs again) under the same handle, so the client would have to
notice each new incarnation and still restore and replay before any other
call reaches it. Creating the replacement here keeps one path: detect,
replace, replay, retry.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from collections import defaultdict
from contextlib import ExitStack

import ray
from ray.exceptions import RayActorError

from protocol.messages import BranchPoint, Rollout
from prefix_store.tree import PrefixShard

REPLAYED = ("insert", "claim", "release")
"""Shard methods that change its state; each is logged (after it ran) until the next snapshot."""
REPLAY_LOG_TOKENS = 1_000_000
"""Default bound of one shard's replay log: new tokens of logged rollouts, plus one per claimed or released branch
point. A logged rollout costs the driver ~150 bytes per new token (its per-token lists), so ~150 MB per shard."""
REVIVE_ATTEMPTS = 3


def shard_of(root_id: str, num_shards: int) -> int:
    """Stable across processes and runs (unlike Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(root_id.encode(), digest_size=8).digest(), "little") % num_shards


class ShardActor(PrefixShard):
    """A PrefixShard as a Ray actor; `pid` lets fault tests kill exactly this process."""

    def pid(self) -> int:
        return os.getpid()


class PrefixStore:
    def __init__(self, *, store_cfg, vocab_size: int, seed: int, remote: bool = True,
                 replay_log_tokens: int = REPLAY_LOG_TOKENS, recovery_dir: str | None = None):
        """replay_log_tokens: bound of each shard's replay log (see REPLAY_LOG_TOKENS). Past it the client
        snapshots that shard to `recovery_dir` (default: a temporary folder removed with the client) and empties
        its log, so nothing is ever dropped from a log; the bound costs one extra snapshot per
        `replay_log_tokens` when scheduled snapshots are rarer."""
        if store_cfg.beta is None:
            raise ValueError("store.beta is unresolved; load the config with launch.config.load_config (it sets beta)")
        if replay_log_tokens < 1:
            raise ValueError(f"replay_log_tokens={replay_log_tokens} must be at least 1")
        self._kwargs = dict(scorer=store_cfg.scorer, beta=store_cfg.beta, max_tokens=store_cfg.max_tokens,
                            max_branches_per_position=store_cfg.max_branches_per_position, vocab_size=vocab_size,
                            branch_action=store_cfg.branch_action, step_delimiter=store_cfg.step_delimiter,
                            scorer_weights=dict(store_cfg.scorer_weights))
        self.remote = remote
        self.seed = seed
        n = max(1, store_cfg.num_shards)
        self.shards = [self._new_shard(i) for i in range(n)]
        self.replay_log_tokens = replay_log_tokens
        self._recovery_dir = recovery_dir
        self._base: list[str | None] = [None] * n
        self._log: list[list[tuple[str, tuple]]] = [[] for _ in range(n)]
        self._log_tokens = [0] * n
        self._locks = [threading.RLock() for _ in range(n)]  # one call at a time per shard: the log keeps its order
        self.counters = {"shard_restarts": 0, "replayed_inserts": 0, "replayed_calls": 0, "recovery_snapshots": 0}
        self._client_lock = threading.Lock()  # client-wide state; shards revive under their own locks, maybe at once

    def _new_shard(self, i: int):
        if not self.remote:
            return ShardActor(seed=self.seed + i, **self._kwargs)
        return ray.remote(ShardActor).options(num_cpus=0, max_restarts=0).remote(seed=self.seed + i, **self._kwargs)

    # ---- calls, logging, revival ------------------------------------------------
    def _call(self, calls):
        """calls: list of (shard index, method name, args); runs them (in parallel when remote).

        A call whose shard died is retried on a revived shard; a call that raised
        (e.g. a rejected insert) left its shard unchanged, so the others are
        still logged before the first such error is raised.
        """
        if not self.remote:  # an in-process shard cannot die alone: nothing to log
            return [getattr(self.shards[i], m)(*a) for i, m, a in calls]
        with ExitStack() as held:
            for i in sorted({i for i, _, _ in calls}):
                held.enter_context(self._locks[i])
            refs = [getattr(self.shards[i], m).remote(*a) for i, m, a in calls]
            out, error = [], None
            for (i, m, a), ref in zip(calls, refs):
                try:
                    out.append(self._get_or_revive(i, m, a, ref))
                except RayActorError:
                    raise
                except Exception as e:  # the shard rejected this call; keep logging the calls that ran
                    error = error or e
                    out.append(None)
                    continue
                self._record(i, m, a)
            if error is not None:
                raise error
            return out

    def _get_or_revive(self, i: int, method: str, args: tuple, ref):
        for attempt in range(REVIVE_ATTEMPTS + 1):
            try:
                return ray.get(ref)
            except RayActorError:
                if attempt == REVIVE_ATTEMPTS:
                    raise
                self._revive(i)
                ref = getattr(self.shards[i], method).remote(*args)

    def _revive(self, i: int) -> None:
        """Replace dead shard i by a new actor holding its base snapshot plus its replayed log."""
        ray.kill(self.shards[i], no_restart=True)  # it may be unreachable rather than dead: never run two
        last = None
        for _ in range(REVIVE_ATTEMPTS):
            actor = self._new_shard(i)
            refs = [actor.restore.remote(self._base[i])] if self._base[i] else []
            refs += [getattr(actor, m).remote(*a) for m, a in self._log[i]]
            try:
                ray.get(refs)
            except RayActorError as e:
                last = e
                continue
            except BaseException:  # e.g. an unreadable snapshot: do not leave the half-restored actor running
                ray.kill(actor, no_restart=True)
                raise
            self.shards[i] = actor
            self._count(shard_restarts=1, replayed_calls=len(self._log[i]),
                        replayed_inserts=sum(len(a[0]) for m, a in self._log[i] if m == "insert"))
            return
        raise RuntimeError(f"prefix-store shard {i} died and {REVIVE_ATTEMPTS} replacements died while restoring "
                           f"{self._base[i] or 'an empty shard'} and replaying {len(self._log[i])} calls; "
                           f"check the Ray logs for why shard actors die") from last

    def _record(self, i: int, method: str, args: tuple) -> None:
        """After a call ran on shard i: a snapshot or restore becomes the new base; a change joins the log."""
        if method in ("snapshot", "restore"):
            self._base[i] = args[0]
            self._log[i], self._log_tokens[i] = [], 0
        elif method in REPLAYED:
            self._log[i].append((method, args))
            self._log_tokens[i] += sum(len(r.token_ids) for r in args[0]) if method == "insert" else len(args[0])
            if self._log_tokens[i] > self.replay_log_tokens:
                self._call([(i, "snapshot", (self._recovery_path(i),))])
                self._count(recovery_snapshots=1)

    def _count(self, **deltas: int) -> None:
        with self._client_lock:
            for k, v in deltas.items():
                self.counters[k] += v

    def _recovery_path(self, i: int) -> str:
        with self._client_lock:  # two shards may overflow at once: one folder
            if self._recovery_dir is None:
                self._recovery_dir = tempfile.mkdtemp(prefix="graftrl-store-")
                weakref.finalize(self, shutil.rmtree, self._recovery_dir, True)
        os.makedirs(self._recovery_dir, exist_ok=True)
        return os.path.join(self._recovery_dir, f"recovery.shard{i}.npz")

    # ---- API ---------------------------------------------------------------------
    def insert(self, rollouts: list[Rollout]) -> int:
        by_shard = defaultdict(list)
        for r in rollouts:
            by_shard[shard_of(r.root_id, len(self.shards))].append(r)
        return sum(self._call([(i, "insert", (rs,)) for i, rs in by_shard.items()]))

    def select(self, k: int) -> list[BranchPoint]:
        if k <= 0:
            return []
        # Peek and claim under every shard's lock: another client thread's insert could otherwise evict a peeked
        # tree (or use up a position) before it is claimed. The locks are re-entrant, so _call takes them again.
        with ExitStack() as held:
            for lock in self._locks:
                held.enter_context(lock)
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

    def pids(self) -> list[int]:
        """Process id of each shard now (fault tests, ops); a revived shard has a new one."""
        return [int(x) for x in self._call([(i, "pid", ()) for i in range(len(self.shards))])]

    def shard_stats(self) -> list[dict[str, float]]:
        return self._call([(i, "stats", ()) for i in range(len(self.shards))])

    def stats(self) -> dict[str, float]:
        """Sums over shards, plus the client's fault counters (shard_restarts, replayed_inserts, replayed_calls,
        recovery_snapshots) and replay_log_tokens, the size of the replay logs now (bounded per shard)."""
        total: dict[str, float] = defaultdict(float)
        for s in self.shard_stats():
            for k, v in s.items():
                total[k] += v
        return {**total, **self.counters, "replay_log_tokens": sum(self._log_tokens)}

    def snapshot(self, path_prefix: str) -> None:
        """One file per shard: <path_prefix>.shard<i>.npz. Each becomes its shard's base and empties its log,
        so the files must stay in place until the next snapshot (checkpoint rotation keeps the newest)."""
        self._call([(i, "snapshot", (f"{path_prefix}.shard{i}.npz",)) for i in range(len(self.shards))])

    def restore(self, path_prefix: str) -> None:
        self._call([(i, "restore", (f"{path_prefix}.shard{i}.npz",)) for i in range(len(self.shards))])
