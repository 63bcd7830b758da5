"""One shard of the prefix store: a radix tree of rollouts per root (prompt), stored column-wise.

Owns: the trees, per-token observations along edges, per-node outcome
statistics, branch-point selection and bookkeeping, eviction, snapshots.
Knows nothing of Ray, vLLM or the learner.

Layout of one tree (continuation tokens only; the prompt is the root key):

    root ──[3 5]──► n1 ──[8 2 <eos>]──► leaf   (trajectory A: 3 5 8 2 <eos>)
                     └──[9 1 <eos>]──► leaf   (trajectory B: 3 5 9 1 <eos>)

Storage. Every token of every edge lives in one *token pool* (parallel numpy
columns: token id, sampled logprob, entropy, top-1 logprob, best alternative
token and its logprob, ReBalance step confidence/variance, branch count, the
node that owns it and the node whose statistics describe the prefix before
it). An edge is a contiguous slice of the pool: splitting an edge only cuts
a slice, and selecting branch points is a vectorised pass over the pool.
Nodes are rows of parallel arrays too (parent, pool slice, depth of the
edge's first token, root, visits, reward sum and sum of squares, soft-value
accumulator, policy version and actor of the rollout that first stored
the edge, terminal count); `children` maps node * vocab + first token to the child.

A node's statistics count the trajectories whose continuation passes
through its *edge*; every token of one edge therefore shares them. A branch
point at pool index t re-enters the prefix that ends just before token t.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from protocol.messages import BranchPoint, Rollout
from protocol.registry import check
from prefix_store.scoring import get_scorer

BRANCH_ACTIONS = ("resample", "force")
"""How a branch point is re-entered: `resample` its position, or `force` the best top-k alternative there."""

# Per-token columns and their dtypes: 31 bytes per stored token.
TOKEN_COLUMNS = {
    "tok": np.int32, "logprob": np.float32, "entropy": np.float16, "top1": np.float16,
    "alt_tok": np.int32, "alt_lp": np.float16, "step_conf": np.float16, "step_var": np.float16,
    "branches": np.uint8, "owner": np.int32, "stats_node": np.int32,
}
CLOSED = 255  # `branches` value of a position that is never handed out (root start, evicted tree)
NODE_COLUMNS = {
    "parent": np.int32, "off": np.int64, "length": np.int32, "start": np.int32, "root": np.int32,
    "visits": np.int32, "terminal": np.int32, "reward_sum": np.float64, "reward_sq": np.float64,
    "soft_lse": np.float64, "version": np.int32, "actor": np.int32,
}


class StoreInputError(ValueError):
    """A rejected insert or lookup; the store is unchanged."""


class Columns:
    """Parallel growable numpy columns; `n` rows used."""

    def __init__(self, spec: dict, capacity: int = 1024):
        self.spec = spec
        self.n = 0
        self.cols = {k: np.zeros(capacity, dtype=dt) for k, dt in spec.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = len(self.cols["tok" if "tok" in self.cols else "parent"])
        if need > cap:
            new_cap = max(need, 2 * cap)
            for k, a in self.cols.items():
                b = np.zeros(new_cap, dtype=a.dtype)
                b[: self.n] = a[: self.n]
                self.cols[k] = b

    def append(self, count: int) -> int:
        """Allocate `count` rows at the end; returns the first row index."""
        self.reserve(count)
        first = self.n
        self.n += count
        return first

    def nbytes_used(self) -> int:
        return sum(a.dtype.itemsize * self.n for a in self.cols.values())


@dataclass
class Root:
    name: str
    index: int
    """Value of the node column `root` for this tree's nodes."""
    node: int
    prompt_ids: list[int]
    last_use: int = 0
    nodes: list[int] = field(default_factory=list)
    """Every node id of this tree (root node first)."""


@dataclass
class Claim:
    """What a handed-out branch point remembers until its continuations come back."""
    root_id: str
    entropy: float
    top1: float
    alt_lp: float


class PoolCandidates:
    """Candidates over every pool row, each column read (and widened to float32) only when a scorer asks."""

    def __init__(self, shard: "PrefixShard"):
        self._p, self._c, self._n = shard.pool, shard.nodes, shard.pool.n

    def _col(self, name: str) -> np.ndarray:
        return self._p[name][: self._n].astype(np.float32)

    def __len__(self) -> int:
        return self._n

    logprob = property(lambda self: self._col("logprob"))
    entropy = property(lambda self: self._col("entropy"))
    top1_logprob = property(lambda self: self._col("top1"))
    step_conf = property(lambda self: self._col("step_conf"))
    step_var = property(lambda self: self._col("step_var"))
    visits = property(lambda self: self._c["visits"][self._p["stats_node"][: self._n]].astype(np.float32))
    reward_sum = property(lambda self: self._c["reward_sum"][self._p["stats_node"][: self._n]].astype(np.float32))
    root = property(lambda self: self._c["root"][self._p["owner"][: self._n]])

    @property
    def surprise(self) -> np.ndarray:
        """(n,) max_a log pi(a) - log pi(y_t), at least 0, with the sampled logprob rounded to the top-1 column's
        float16 first. The two columns differ in precision (float32, float16), and a top-1 token sampled has equal
        logprobs: rounded alike they give exactly 0, where the raw difference is float16's rounding error (up to
        ~2e-4 at log pi = -0.7), which would count as a surprise at every other right token."""
        top1 = self._p["top1"][: self._n]
        rounded = self._p["logprob"][: self._n].astype(top1.dtype)
        return np.clip(top1.astype(np.float32) - rounded.astype(np.float32), 0.0, None)

    @property
    def depth(self) -> np.ndarray:
        """(n,) continuation position of each row: its node's start plus the row's offset inside the node's edge."""
        owner = self._p["owner"][: self._n]
        return (self._c["start"][owner] + np.arange(self._n) - self._c["off"][owner]).astype(np.int64)

    @property
    def path_surprise(self) -> np.ndarray:
        """(n,) max surprise of the earlier tokens on each row's path (0 at a path's first token).

        The rows of one node are a contiguous pool range, so: a running maximum
        inside each node's range (exclusive of the row itself), combined with
        M[node] = max(M[parent], max over the parent's range), computed level by
        level (as many passes as the trees are deep in nodes).
        """
        n, nodes = self._n, self._c
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        s = np.clip(self.surprise, 0.0, 100.0).astype(np.float64)
        owner = self._p["owner"][:n]
        starts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
        flags = np.zeros(n, dtype=np.int64)
        flags[starts] = 1
        seg = np.cumsum(flags) - 1  # (n,) segment index of each row
        key = seg * 256.0 + s  # segments ascend, so a running max never crosses a segment start
        inclusive = np.maximum.accumulate(key) - seg * 256.0
        exclusive = np.concatenate([[0.0], inclusive[:-1]])
        exclusive[starts] = 0.0
        n_nodes = nodes.n
        edge_max = np.zeros(n_nodes)
        edge_max[owner[starts]] = np.maximum.reduceat(s, starts)
        parent = nodes["parent"][:n_nodes].astype(np.int64)
        has_parent = parent >= 0
        safe_parent = np.where(has_parent, parent, 0)
        before = np.zeros(n_nodes)  # M: max surprise on the path above each node's range
        for _ in range(n_nodes):
            nxt = np.where(has_parent, np.maximum(before[safe_parent], edge_max[safe_parent]), 0.0)
            if np.array_equal(nxt, before):
                break
            before = nxt
        return np.maximum(before[owner], exclusive).astype(np.float32)


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest scores, by score then by index: ties go to the earlier row.

    Unlike a bare argpartition, the result does not depend on dead rows between
    live ones, so a shard rebuilt from a snapshot (compacted, same row order)
    selects the same positions as the shard it replaces.
    """
    n = len(scores)
    if m < n:
        thr = np.partition(scores, n - m)[n - m]  # the m-th largest score
        above = np.flatnonzero(scores > thr)
        top = np.sort(np.concatenate([above, np.flatnonzero(scores == thr)[: m - len(above)]]))
    else:
        top = np.arange(n)
    return top[np.argsort(-scores[top], kind="stable")]


class PrefixShard:
    """Radix trees for the roots assigned to this shard."""

    def __init__(self, *, scorer: str, beta: float, max_branches_per_position: int, max_tokens: int,
                 vocab_size: int, seed: int = 0, branch_action: str = "resample", step_delimiter: int = -1,
                 scorer_weights: dict[str, float] | None = None):
        check("branch action", BRANCH_ACTIONS, branch_action)
        self.scorer = get_scorer(scorer, scorer_weights)
        self.beta = beta
        self.max_branches = min(max_branches_per_position, CLOSED - 1)
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.branch_action = branch_action
        self.step_delimiter = step_delimiter
        self.rng = np.random.default_rng(seed)
        self.pool = Columns(TOKEN_COLUMNS)
        self.nodes = Columns(NODE_COLUMNS, capacity=256)
        self.children: dict[int, int] = {}
        self.roots: dict[str, Root] = {}
        self.root_by_index: dict[int, Root] = {}
        self.live_tokens = 0
        self.clock = 0
        self.outstanding: dict[int, Claim] = {}
        self.next_ref = 0
        self.evicted_trees = 0
        self.evicted_tokens = 0

    # ---- nodes -----------------------------------------------------------------
    def _new_node(self, parent: int, off: int, length: int, start: int, root: int) -> int:
        i = self.nodes.append(1)
        c = self.nodes
        c["parent"][i], c["off"][i], c["length"][i], c["start"][i], c["root"][i] = parent, off, length, start, root
        c["soft_lse"][i] = -np.inf
        c["version"][i] = c["actor"][i] = -1
        return i

    def _child(self, node: int, token: int) -> int:
        return self.children.get(node * self.vocab_size + token, -1)

    def _edge(self, node: int) -> np.ndarray:
        off, n = int(self.nodes["off"][node]), int(self.nodes["length"][node])
        return self.pool["tok"][off : off + n]

    def _split(self, node: int, k: int) -> int:
        """Cut `node`'s edge before its k-th token; returns the new upper node (tokens [0, k))."""
        c, p = self.nodes, self.pool
        off, parent = int(c["off"][node]), int(c["parent"][node])
        first = int(p["tok"][off])
        upper = self._new_node(parent, off, k, int(c["start"][node]), int(c["root"][node]))
        for name in ("visits", "terminal", "reward_sum", "reward_sq", "soft_lse", "version", "actor"):
            c[name][upper] = c[name][node]
        c["terminal"][upper] = 0  # trajectories ending at the old edge end still end below
        c["off"][node] += k
        c["length"][node] -= k
        c["start"][node] += k
        c["parent"][node] = upper
        self.children[parent * self.vocab_size + first] = upper
        self.children[upper * self.vocab_size + int(p["tok"][off + k])] = node
        p["owner"][off : off + k] = upper
        p["stats_node"][off + 1 : off + k + 1] = upper  # prefixes ending inside (or at the end of) the upper edge
        self.root_by_index[int(c["root"][node])].nodes.append(upper)
        return upper

    # ---- validation ------------------------------------------------------------
    def _locate(self, root_id: str, prefix: list[int]) -> tuple[int, int] | None:
        """(node, tokens of its edge used) where `prefix` ends; None if it is not stored."""
        root = self.roots.get(root_id)
        if root is None:
            return None
        node, i = root.node, 0
        while i < len(prefix):
            child = self._child(node, prefix[i])
            if child < 0:
                return None
            edge = self._edge(child)
            n = min(len(edge), len(prefix) - i)
            if not np.array_equal(edge[:n], prefix[i : i + n]):
                return None
            node, i = child, i + n
            if n < len(edge):
                return node, n
        return node, int(self.nodes["length"][node]) if node != root.node else 0

    def _check(self, r: Rollout) -> None:
        if not r.token_ids:
            raise StoreInputError(f"rollout {r.request_id} of root {r.root_id!r} has no new tokens; nothing to store")
        cont = np.asarray(r.continuation)
        alts = np.asarray(r.alt_token_ids)
        if cont.min() < 0 or cont.max() >= self.vocab_size or (alts.size and (alts.min() < -1 or alts.max() >= self.vocab_size)):
            bad = [int(t) for t in np.concatenate([cont, alts]) if not -1 <= t < self.vocab_size] or [int(cont.min())]
            raise StoreInputError(f"rollout {r.request_id} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        arrays = (r.logprobs, r.entropy, r.top1_logprobs, r.alt_token_ids, r.alt_logprobs)
        if any(len(a) != len(r.token_ids) for a in arrays):
            raise StoreInputError(f"rollout {r.request_id}: per-token arrays differ in length from its {len(r.token_ids)} tokens")
        if not np.isfinite(np.asarray(arrays[:3], dtype=np.float64)).all() or not math.isfinite(r.reward):
            raise StoreInputError(f"rollout {r.request_id} of root {r.root_id!r} carries NaN or infinite values")
        stored = r.prefix_ids[:-1] if r.forced else r.prefix_ids
        if r.prefix_ids and self._locate(r.root_id, stored) is None:
            raise StoreInputError(f"rollout {r.request_id}: its prefix is not stored under root {r.root_id!r}")
        if r.forced and (not r.prefix_ids or r.branch_ref not in self.outstanding):
            raise StoreInputError(f"rollout {r.request_id}: forced without an outstanding branch point")

    # ---- insert ----------------------------------------------------------------
    def insert(self, rollouts: list[Rollout]) -> int:
        """Add trajectories and their outcomes. All are validated first: one bad rollout rejects the batch.

        Returns the number of new tokens stored.
        """
        for r in rollouts:
            self._check(r)
        added = sum(self._insert_one(r) for r in rollouts)
        for r in rollouts:
            self.outstanding.pop(r.branch_ref, None)
        self.evict()
        return added

    def _token_observations(self, r: Rollout) -> dict[str, np.ndarray]:
        """Columns for every continuation position; prefix positions are filled from the tree when needed."""
        n_new = len(r.token_ids)
        obs = {"logprob": r.logprobs, "entropy": r.entropy, "top1": r.top1_logprobs,
               "alt_tok": r.alt_token_ids, "alt_lp": r.alt_logprobs}
        obs = {k: np.asarray(v, dtype=np.float64) for k, v in obs.items()}
        obs["alt_lp"] = np.maximum(obs["alt_lp"], -1e4)  # "no alternative" sentinel, kept finite in float16
        if r.forced:  # the forced token was drawn from the same distribution as the token it replaced
            claim = self.outstanding[r.branch_ref]
            head = {"logprob": claim.alt_lp, "entropy": claim.entropy, "top1": claim.top1, "alt_tok": -1, "alt_lp": -1e4}
            obs = {k: np.concatenate([[head[k]], v]) for k, v in obs.items()}
        conf, var = self._step_stats(r, np.exp(obs["top1"]))
        obs["step_conf"], obs["step_var"] = conf, var
        assert all(len(v) == n_new + int(r.forced) for v in obs.values())
        return obs

    def _step_stats(self, r: Rollout, max_prob_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ReBalance step statistics for the new tokens (arXiv 2603.12372).

        Steps are split after each `step_delimiter` token (every token is its own
        step when the delimiter is -1). Step confidence c_s = mean of max_a pi(a|.)
        over the step's tokens; confidence variance v_s = (c_s - c_{s-1})^2 / 4.
        Only new tokens are considered: a step straddling the branch point is
        measured on its new part.
        """
        toks = np.asarray(r.continuation[len(r.continuation) - len(max_prob_new):])
        if self.step_delimiter == -1:
            ends = np.arange(len(toks))
        else:
            ends = np.flatnonzero(toks == self.step_delimiter)
            if not ends.size or ends[-1] != len(toks) - 1:
                ends = np.append(ends, len(toks) - 1)
        starts = np.concatenate([[0], ends[:-1] + 1])
        counts = ends - starts + 1
        c = np.add.reduceat(max_prob_new, starts) / counts  # (steps,)
        v = np.concatenate([[0.0], (c[1:] - c[:-1]) ** 2 / 4])
        conf, var = np.repeat(c, counts), np.repeat(v, counts)
        return conf, var

    def _insert_one(self, r: Rollout) -> int:
        self.clock += 1
        root = self.roots.get(r.root_id)
        if root is None:
            index = max(self.root_by_index, default=-1) + 1
            node = self._new_node(-1, 0, 0, 0, index)
            root = Root(name=r.root_id, index=index, node=node, prompt_ids=list(r.prompt_ids), nodes=[node])
            self.roots[r.root_id] = self.root_by_index[index] = root
        root.last_use = self.clock
        cont = r.continuation
        n_old = len(cont) - len(r.token_ids) - int(r.forced)  # positions already observed in the tree
        obs = None
        c = self.nodes
        path = [root.node]
        node, i, added = root.node, 0, 0
        while i < len(cont):
            child = self._child(node, cont[i])
            if child < 0:  # a new leaf holds the rest of the continuation
                if obs is None:
                    obs = self._token_observations(r)
                count = len(cont) - i
                off = self.pool.append(count)
                leaf = self._new_node(node, off, count, i, root.index)
                p = self.pool
                sl = slice(off, off + count)
                p["tok"][sl] = cont[i:]
                for name in ("logprob", "entropy", "top1", "alt_tok", "alt_lp", "step_conf", "step_var"):
                    p[name][sl] = obs[name][i - n_old:]
                p["branches"][sl] = 0
                if i == 0:
                    p["branches"][off] = CLOSED  # an empty prefix is a root start, not a branch point
                p["owner"][sl] = leaf
                p["stats_node"][sl] = leaf
                p["stats_node"][off] = node
                c["version"][leaf], c["actor"][leaf] = r.policy_version, r.actor_id
                self.children[node * self.vocab_size + cont[i]] = leaf
                root.nodes.append(leaf)
                self.live_tokens += count
                added += count
                path.append(leaf)
                break
            edge = self._edge(child)
            n = min(len(edge), len(cont) - i)
            diff = np.flatnonzero(edge[:n] != np.asarray(cont[i : i + n]))
            k = int(diff[0]) if len(diff) else n
            if k < len(edge):  # diverges or ends inside the edge
                child = self._split(child, k)
            path.append(child)
            node, i = child, i + k
        for n_ in path:
            c["visits"][n_] += 1
            c["reward_sum"][n_] += r.reward
            c["reward_sq"][n_] += r.reward * r.reward
            # beta > 0: log sum exp(r / beta); beta = 0: the max reward (the limit of the soft value)
            c["soft_lse"][n_] = (np.logaddexp(c["soft_lse"][n_], r.reward / self.beta) if self.beta > 0
                                 else max(c["soft_lse"][n_], r.reward))
        c["terminal"][path[-1]] += 1
        return added

    # ---- select ----------------------------------------------------------------
    def _available(self) -> np.ndarray:
        """(n_pool,) bool: positions that may be handed out."""
        p = self.pool
        n = p.n
        return p["branches"][:n] < self.max_branches

    def peek(self, k: int) -> list[BranchPoint]:
        """The k best branch points by the configured scorer, one per distinct prefix; no side effects.

        Scores are computed over the whole pool (columns read lazily, only those
        the scorer uses) and unavailable positions masked to -inf.
        """
        if k <= 0 or self.pool.n == 0:
            return []
        avail = self._available()
        n_avail = int(avail.sum())
        if n_avail == 0:
            return []
        p, c = self.pool, self.nodes
        scores = np.asarray(self.scorer(PoolCandidates(self), self.rng), dtype=np.float32)  # (n_pool,)
        np.copyto(scores, -np.inf, where=~avail)
        # Sibling first tokens share a prefix: over-fetch, then keep one per prefix.
        m = min(n_avail, 4 * k)
        top = top_m(scores, m)
        out, seen = [], set()
        for t in top:
            t = int(t)
            if not avail[t] or scores[t] == -np.inf:  # -inf: the scorer never hands this position out
                continue
            owner = int(p["owner"][t])
            first_of_edge = t == int(c["off"][owner])
            key = ("node", int(p["stats_node"][t])) if first_of_edge else ("tok", t)
            if key in seen:
                continue
            seen.add(key)
            out.append(self._branch_point(t, float(scores[t])))
            if len(out) == k:
                break
        return out

    def _branch_point(self, t: int, score: float) -> BranchPoint:
        p, c = self.pool, self.nodes
        owner = int(p["owner"][t])
        root = self.root_by_index[int(c["root"][owner])]
        prefix = self.path_tokens(owner)[: int(c["start"][owner]) + t - int(c["off"][owner])]
        forced = int(p["alt_tok"][t]) if self.branch_action == "force" else -1
        return BranchPoint(root_id=root.name, prompt_ids=list(root.prompt_ids), prefix_ids=prefix,
                           token_id=int(p["tok"][t]), forced_token=forced, score=score, ref=-1,
                           entropy=float(p["entropy"][t]))

    def claim(self, points: list[BranchPoint]) -> list[BranchPoint]:
        """Hand out `points` (from peek): count the branch and pin the tree until released."""
        out = []
        for bp in points:
            where = self._locate(bp.root_id, bp.prefix_ids + [bp.token_id])
            if where is None:
                raise StoreInputError(f"branch point under root {bp.root_id!r} is no longer stored")
            node, used = where
            t = int(self.nodes["off"][node]) + used - 1
            self.pool["branches"][t] += 1
            ref = self.next_ref
            self.next_ref += 1
            self.outstanding[ref] = Claim(bp.root_id, float(self.pool["entropy"][t]), float(self.pool["top1"][t]),
                                          float(self.pool["alt_lp"][t]))
            out.append(dataclasses.replace(bp, ref=ref))
        return out

    def select(self, k: int) -> list[BranchPoint]:
        """peek + claim: the k best branch points, handed out."""
        return self.claim(self.peek(k))

    def release(self, refs: list[int]) -> None:
        for ref in refs:
            self.outstanding.pop(ref, None)

    # ---- read back -------------------------------------------------------------
    def path_tokens(self, node: int) -> list[int]:
        segs = []
        c = self.nodes
        while c["parent"][node] >= 0:
            segs.append(self._edge(node))
            node = int(c["parent"][node])
        return [int(t) for seg in reversed(segs) for t in seg]

    def trajectories(self, root_id: str) -> list[list[int]]:
        """Every stored continuation of a root, as a multiset (sorted), read back by walking the tree."""
        if root_id not in self.roots:
            raise StoreInputError(f"unknown root {root_id!r}; this shard holds {len(self.roots)} roots")
        out = []
        for node in self.roots[root_id].nodes:
            out += [self.path_tokens(node)] * int(self.nodes["terminal"][node])
        return sorted(out)

    def node_stats(self, root_id: str, prefix: list[int]) -> dict[str, float]:
        """Outcome statistics of the trajectories through `prefix` (a non-empty stored prefix)."""
        where = self._locate(root_id, prefix) if root_id in self.roots else None
        if where is None or not prefix:
            raise StoreInputError(f"prefix {prefix} is not stored under root {root_id!r}")
        node = where[0]
        c = self.nodes
        visits = int(c["visits"][node])
        return {"visits": visits, "reward_sum": float(c["reward_sum"][node]), "reward_sq": float(c["reward_sq"][node]),
                "soft_value": float(self._soft_value(c["soft_lse"][node], visits)),
                "version": int(c["version"][node]), "actor": int(c["actor"][node])}

    def _soft_value(self, lse, visits):
        """V = beta * (log sum exp(r / beta) - log visits) = beta log mean exp(r / beta); at beta = 0 its limit, the
        max reward (what `soft_lse` holds then)."""
        return self.beta * (lse - np.log(visits)) if self.beta > 0 else lse

    def soft_values(self, items: list[tuple[str, list[int], int]]) -> list[list[float]]:
        """For each (root_id, continuation, start): V(s_d) for d = start, ..., len(continuation) - 1.

        s_d is the prefix of the first d continuation tokens and
        V(s) = beta * log mean_{y through s} exp(r(y) / beta) over the stored
        continuations through s (s_0 = the prompt: every continuation of the root).
        """
        c = self.nodes
        out = []
        for root_id, cont, start in items:
            root = self.roots.get(root_id)
            if root is None:
                raise StoreInputError(f"unknown root {root_id!r}")
            owners, node, i = [], root.node, 0
            while i < len(cont):
                child = self._child(node, cont[i])
                if child < 0:
                    raise StoreInputError(f"continuation under root {root_id!r} is not stored")
                n = min(int(c["length"][child]), len(cont) - i)
                owners += [child] * n
                node, i = child, i + n
            ids = np.asarray([root.node] + owners[:-1], dtype=np.int64)[start:]  # node holding s_d's statistics
            v = self._soft_value(c["soft_lse"][ids], np.maximum(c["visits"][ids], 1))
            out.append(v.tolist())
        return out

    def stats(self) -> dict[str, float]:
        nodes = sum(len(r.nodes) for r in self.roots.values())
        parents = {k // self.vocab_size for k in self.children}  # nodes with at least one child (live trees only)
        return {"roots": len(self.roots), "tokens": self.live_tokens, "nodes": nodes, "outstanding": len(self.outstanding),
                "edges": len(self.children), "branching_nodes": len(parents), "evicted_trees": self.evicted_trees,
                "evicted_tokens": self.evicted_tokens}

    def bytes_used(self) -> int:
        """Column bytes of live rows (pool and nodes); excludes Python dict/object overhead."""
        return self.pool.nbytes_used() + self.nodes.nbytes_used()

    # ---- eviction --------------------------------------------------------------
    def evict(self) -> int:
        """Drop least recently used whole trees until at most max_tokens are stored; pinned trees stay.

        Freed pool rows are reclaimed by compaction once they outnumber live ones.
        """
        if self.live_tokens <= self.max_tokens:
            return 0
        pinned = {cl.root_id for cl in self.outstanding.values()}
        dropped = 0
        for name in sorted(self.roots, key=lambda r: self.roots[r].last_use):
            if self.live_tokens <= self.max_tokens:
                break
            if name in pinned:
                continue
            root = self.roots.pop(name)
            del self.root_by_index[root.index]
            for node in root.nodes:
                n = int(self.nodes["length"][node])
                off = int(self.nodes["off"][node])
                self.pool["branches"][off : off + n] = CLOSED
                self.live_tokens -= n
                self.evicted_tokens += n
                parent = int(self.nodes["parent"][node])
                if parent >= 0:
                    self.children.pop(parent * self.vocab_size + int(self.pool["tok"][off]), None)
            dropped += 1
        self.evicted_trees += dropped
        if self.pool.n > 2 * self.live_tokens + 1024:
            self._compact()
        return dropped

    def _compact(self) -> None:
        """Rebuild the columns from the live trees (a round trip through the snapshot format)."""
        self._load_state(self._state())

    # ---- snapshot --------------------------------------------------------------
    def _state(self) -> dict:
        """Live trees as flat arrays (nodes renumbered in tree order) plus JSON metadata."""
        p, c = self.pool, self.nodes
        # Order-preserving: live nodes and tokens keep their relative order, so a
        # store that never evicted restores to identical columns.
        order = sorted(n for root in self.roots.values() for n in root.nodes)
        new_id = {old: i for i, old in enumerate(order)}
        tok_idx = [np.arange(int(c["off"][n]), int(c["off"][n]) + int(c["length"][n])) for n in order]
        tok_idx = np.sort(np.concatenate(tok_idx)) if tok_idx else np.zeros(0, dtype=np.int64)
        remap = np.full(max(c.n, 1), -1, dtype=np.int64)
        remap[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        arrays = {f"pool_{k}": p[k][tok_idx] for k in TOKEN_COLUMNS}
        arrays["pool_owner"] = remap[arrays["pool_owner"]].astype(np.int32)
        arrays["pool_stats_node"] = remap[arrays["pool_stats_node"]].astype(np.int32)
        nodes = np.asarray(order, dtype=np.int64)
        arrays.update({f"node_{k}": c[k][nodes] for k in NODE_COLUMNS})
        parents = arrays["node_parent"].astype(np.int64)
        arrays["node_parent"] = np.where(parents >= 0, remap[np.maximum(parents, 0)], -1).astype(np.int32)
        arrays["node_off"] = np.searchsorted(tok_idx, arrays["node_off"]).astype(np.int64)
        new_root = {r.index: i for i, r in enumerate(self.roots.values())}
        arrays["node_root"] = np.asarray([new_root[int(r)] for r in c["root"][nodes]], dtype=np.int32)
        meta = {"clock": self.clock, "next_ref": self.next_ref, "live_tokens": self.live_tokens,
                "evicted": [self.evicted_trees, self.evicted_tokens], "rng": self.rng.bit_generator.state,
                "outstanding": {str(k): vars(v) for k, v in self.outstanding.items()},
                "roots": [{"name": name, "node": new_id[r.node], "prompt": r.prompt_ids, "last_use": r.last_use,
                           "nodes": [new_id[n] for n in r.nodes]} for name, r in self.roots.items()]}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    def _load_state(self, arrays: dict) -> None:
        meta = json.loads(bytes(arrays["meta"]).decode())
        n_tok = len(arrays["pool_tok"])
        n_node = len(arrays["node_parent"])
        self.pool = Columns(TOKEN_COLUMNS, capacity=max(1024, n_tok))
        self.nodes = Columns(NODE_COLUMNS, capacity=max(256, n_node))
        self.pool.n, self.nodes.n = n_tok, n_node
        for k in TOKEN_COLUMNS:
            self.pool[k][:n_tok] = arrays[f"pool_{k}"]
        for k in NODE_COLUMNS:
            self.nodes[k][:n_node] = arrays[f"node_{k}"]
        self.clock, self.next_ref, self.live_tokens = meta["clock"], meta["next_ref"], meta["live_tokens"]
        self.evicted_trees, self.evicted_tokens = meta.get("evicted", (0, 0))  # absent in older snapshots
        if "rng" in meta:  # the random scorer continues its stream after a restore
            self.rng.bit_generator.state = meta["rng"]
        self.outstanding = {int(k): Claim(**v) for k, v in meta["outstanding"].items()}
        self.roots, self.root_by_index = {}, {}
        for i, r in enumerate(meta["roots"]):
            root = Root(name=r["name"], index=i, node=r["node"], prompt_ids=r["prompt"], last_use=r["last_use"], nodes=r["nodes"])
            self.roots[root.name] = self.root_by_index[i] = root
        parents = self.nodes["parent"][:n_node]
        offs = self.nodes["off"][:n_node]
        self.children = {int(parents[i]) * self.vocab_size + int(self.pool["tok"][offs[i]]): i
                         for i in range(n_node) if parents[i] >= 0}

    def snapshot(self, path: str) -> None:
        """Write the shard as one .npz of plain arrays (no pickle: safe to load), atomically."""
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **self._state())
        os.replace(tmp, path)

    def restore(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as data:
            self._load_state({k: data[k] for k in data.files})
