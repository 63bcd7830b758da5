"""One shard of the prefix store: a radix tree of rollouts per root (prompt).

Owns: the trees, per-token observations along edges, per-node outcome
statistics, branch-point selection and bookkeeping, eviction, snapshots.
Knows nothing of Ray, vLLM or the learner.

Layout of one tree (continuation tokens only; the prompt is the root key):

    root ──[3 5]──► n1 ──[8 2 <eos>]──► leaf   (trajectory A: 3 5 8 2 <eos>)
                     └──[9 1 <eos>]──► leaf   (trajectory B: 3 5 9 1 <eos>)

A node's statistics count the trajectories whose continuation passes
through its *edge*; every token of one edge therefore shares them. A branch
point is (node, offset): re-enter the prefix that ends just before
edge token `offset` and sample from there.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from actors.messages import BranchPoint, Rollout
from prefix_store.scoring import Candidates, get_scorer


class StoreInputError(ValueError):
    """A rejected insert or lookup; the store is unchanged."""


class Node:
    __slots__ = (
        "tokens", "logprob", "entropy", "top1_logprob", "children", "parent", "start",
        "visits", "reward_sum", "reward_sq", "soft_lse", "version", "actor", "branch_counts",
    )

    def __init__(self, parent: "Node | None", start: int):
        self.tokens: list[int] = []
        self.logprob: list[float] = []
        self.entropy: list[float] = []
        self.top1_logprob: list[float] = []
        self.children: dict[int, Node] = {}
        self.parent = parent
        self.start = start  # depth (continuation index) of the edge's first token
        self.visits = 0
        self.reward_sum = 0.0
        self.reward_sq = 0.0
        self.soft_lse = -math.inf  # log sum exp(r / beta) over trajectories through the edge
        self.version = -1
        self.actor = -1
        self.branch_counts: dict[int, int] = {}

    def split(self, k: int) -> "Node":
        """Cut this edge before token k; returns the new upper node holding tokens[:k]."""
        upper = Node(self.parent, self.start)
        for name in ("tokens", "logprob", "entropy", "top1_logprob"):
            seq = getattr(self, name)
            setattr(upper, name, seq[:k])
            setattr(self, name, seq[k:])
        for name in ("visits", "reward_sum", "reward_sq", "soft_lse", "version", "actor"):
            setattr(upper, name, getattr(self, name))
        upper.branch_counts = {o: c for o, c in self.branch_counts.items() if o < k}
        self.branch_counts = {o - k: c for o, c in self.branch_counts.items() if o >= k}
        assert self.parent is not None
        self.parent.children[upper.tokens[0]] = upper
        upper.children[self.tokens[0]] = self
        self.parent = upper
        self.start += k
        return upper

    def soft_value(self, beta: float) -> float:
        """V = beta * log( (1/n) sum exp(r / beta) ) over the trajectories through this edge."""
        return beta * (self.soft_lse - math.log(self.visits)) if self.visits else float("nan")


@dataclass
class Tree:
    root: Node
    prompt_ids: list[int]
    last_use: int = 0
    num_nodes: int = 1


class PrefixShard:
    """Radix trees for the roots assigned to this shard."""

    def __init__(self, *, scorer: str, beta: float, max_branches_per_position: int,
                 max_nodes: int, vocab_size: int, seed: int = 0):
        self.scorer = get_scorer(scorer)
        self.beta = beta
        self.max_branches = max_branches_per_position
        self.max_nodes = max_nodes
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.trees: dict[str, Tree] = {}
        self.clock = 0
        self.outstanding: dict[int, str] = {}  # branch ref -> root id (pins the tree)
        self.next_ref = 0

    # ---- insert ----------------------------------------------------------------
    def _check(self, r: Rollout) -> None:
        cont = r.continuation
        if not r.token_ids:
            raise StoreInputError(f"rollout {r.request_id} of root {r.root_id!r} has no new tokens; nothing to store")
        bad = [t for t in cont if not 0 <= t < self.vocab_size]
        if bad:
            raise StoreInputError(f"rollout {r.request_id} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        arrays = (r.logprobs, r.entropy, r.top1_logprobs)
        if any(len(a) != len(r.token_ids) for a in arrays):
            raise StoreInputError(f"rollout {r.request_id}: logprobs/entropy/top1 lengths differ from {len(r.token_ids)} tokens")
        if not all(math.isfinite(x) for a in arrays for x in a) or not math.isfinite(r.reward):
            raise StoreInputError(f"rollout {r.request_id} of root {r.root_id!r} carries NaN or infinite values")
        if r.prefix_ids and not self._has_prefix(r.root_id, r.prefix_ids):
            raise StoreInputError(f"rollout {r.request_id}: its prefix is not stored under root {r.root_id!r}")

    def _has_prefix(self, root_id: str, prefix: list[int]) -> bool:
        tree = self.trees.get(root_id)
        if tree is None:
            return False
        node, i = tree.root, 0
        while i < len(prefix):
            child = node.children.get(prefix[i])
            if child is None:
                return False
            n = min(len(child.tokens), len(prefix) - i)
            if child.tokens[:n] != prefix[i : i + n]:
                return False
            node, i = child, i + n
        return True

    def insert(self, rollouts: list[Rollout]) -> int:
        """Add trajectories and their outcomes. All are validated first: one bad rollout rejects the batch."""
        for r in rollouts:
            self._check(r)
        added = 0
        for r in rollouts:
            added += self._insert_one(r)
            if r.branch_ref >= 0:
                self.outstanding.pop(r.branch_ref, None)
        self.evict()
        return added

    def _insert_one(self, r: Rollout) -> int:
        self.clock += 1
        tree = self.trees.get(r.root_id)
        if tree is None:
            tree = self.trees[r.root_id] = Tree(root=Node(None, 0), prompt_ids=list(r.prompt_ids))
        tree.last_use = self.clock
        cont = r.continuation
        n_prefix = len(r.prefix_ids)
        # Observations for new tokens; prefix tokens already exist in the tree.
        obs = lambda j: (r.logprobs[j - n_prefix], r.entropy[j - n_prefix], r.top1_logprobs[j - n_prefix])
        path = [tree.root]
        node, i, added = tree.root, 0, 0
        while i < len(cont):
            child = node.children.get(cont[i])
            if child is None:  # new leaf with the rest of the continuation
                if i < n_prefix:
                    raise StoreInputError(f"rollout {r.request_id}: prefix vanished from root {r.root_id!r}")
                leaf = Node(node, i)
                for j in range(i, len(cont)):
                    lp, ent, top1 = obs(j)
                    leaf.tokens.append(cont[j]); leaf.logprob.append(lp)
                    leaf.entropy.append(ent); leaf.top1_logprob.append(top1)
                leaf.version, leaf.actor = r.policy_version, r.actor_id
                node.children[cont[i]] = leaf
                tree.num_nodes += 1
                added += 1
                path.append(leaf)
                break
            k = 0
            while k < len(child.tokens) and i + k < len(cont) and child.tokens[k] == cont[i + k]:
                k += 1
            if k < len(child.tokens):  # diverges (or ends) inside the edge
                child = child.split(k)
                tree.num_nodes += 1
                added += 1
            path.append(child)
            node, i = child, i + k
        for n in path:
            n.visits += 1
            n.reward_sum += r.reward
            n.reward_sq += r.reward * r.reward
            n.soft_lse = float(np.logaddexp(n.soft_lse, r.reward / self.beta))
        return added

    # ---- select ----------------------------------------------------------------
    def _candidates(self):
        """Every (tree, node, offset) that may still be branched, with its observations."""
        where, cols = [], ([], [], [], [], [])
        for root_id, tree in self.trees.items():
            stack = list(tree.root.children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                for off in range(len(node.tokens)):
                    if node.start + off == 0:  # prefix would be empty: that is a root start
                        continue
                    if node.branch_counts.get(off, 0) >= self.max_branches:
                        continue
                    # Statistics of the prefix y_<t: this edge if t is not its first token, else the parent's.
                    stats = node if off > 0 else node.parent
                    where.append((root_id, node, off))
                    for col, v in zip(cols, (node.logprob[off], node.entropy[off], node.top1_logprob[off],
                                             stats.visits, stats.reward_sum)):
                        col.append(v)
        return where, Candidates(*(np.asarray(c, dtype=np.float64) for c in cols))

    def peek(self, k: int) -> list[BranchPoint]:
        """The k best branch points by the configured scorer, one per distinct prefix; no side effects."""
        if k <= 0 or not self.trees:
            return []
        where, cand = self._candidates()
        if not where:
            return []
        scores = self.scorer(cand, self.rng)
        order = np.argsort(-scores, kind="stable")
        out, seen = [], set()
        for idx in order:
            root_id, node, off = where[idx]
            prefix = self.path_tokens(node)[: node.start + off]
            key = (root_id, tuple(prefix))
            if key in seen:  # sibling edges share the prefix before their first token
                continue
            seen.add(key)
            out.append(BranchPoint(root_id=root_id, prompt_ids=list(self.trees[root_id].prompt_ids),
                                   prefix_ids=prefix, token_id=node.tokens[off], score=float(scores[idx]), ref=-1))
            if len(out) == k:
                break
        return out

    def claim(self, points: list[BranchPoint]) -> list[BranchPoint]:
        """Hand out `points` (from peek): count the branch and pin the tree until released."""
        out = []
        for bp in points:
            node = self.node_at(bp.root_id, bp.prefix_ids + [bp.token_id])
            off = len(bp.prefix_ids) - node.start
            node.branch_counts[off] = node.branch_counts.get(off, 0) + 1
            ref = self.next_ref
            self.next_ref += 1
            self.outstanding[ref] = bp.root_id
            out.append(BranchPoint(bp.root_id, bp.prompt_ids, bp.prefix_ids, bp.token_id, bp.score, ref))
        return out

    def select(self, k: int) -> list[BranchPoint]:
        """peek + claim: the k best branch points, handed out."""
        return self.claim(self.peek(k))

    def release(self, refs: list[int]) -> None:
        for ref in refs:
            self.outstanding.pop(ref, None)

    @staticmethod
    def path_tokens(node: Node) -> list[int]:
        segs = []
        while node.parent is not None:
            segs.append(node.tokens)
            node = node.parent
        return [t for seg in reversed(segs) for t in seg]

    # ---- read back -------------------------------------------------------------
    def trajectories(self, root_id: str) -> list[list[int]]:
        """Every stored continuation of a root (leaf paths), for checks and debugging."""
        if root_id not in self.trees:
            raise StoreInputError(f"unknown root {root_id!r}; this shard holds {len(self.trees)} roots")
        out, stack = [], [self.trees[root_id].root]
        while stack:
            node = stack.pop()
            if not node.children and node.parent is not None:
                out.append(self.path_tokens(node))
            stack.extend(node.children.values())
        return out

    def node_at(self, root_id: str, prefix: list[int]) -> Node:
        """The node whose edge contains the last token of `prefix`."""
        tree = self.trees.get(root_id)
        if tree is None:
            raise StoreInputError(f"unknown root {root_id!r}")
        if not self._has_prefix(root_id, prefix) or not prefix:
            raise StoreInputError(f"prefix {prefix} is not stored under root {root_id!r}")
        node, i = tree.root, 0
        while i < len(prefix):
            node = node.children[prefix[i]]
            i += len(node.tokens)
        return node

    @property
    def num_nodes(self) -> int:
        return sum(t.num_nodes for t in self.trees.values())

    def stats(self) -> dict[str, float]:
        return {"roots": len(self.trees), "nodes": self.num_nodes, "outstanding": len(self.outstanding)}

    # ---- eviction --------------------------------------------------------------
    def evict(self) -> int:
        """Drop least recently used whole trees until within max_nodes; pinned trees stay."""
        pinned = set(self.outstanding.values())
        dropped = 0
        for root_id in sorted(self.trees, key=lambda r: self.trees[r].last_use):
            if self.num_nodes <= self.max_nodes:
                break
            if root_id not in pinned:
                del self.trees[root_id]
                dropped += 1
        return dropped

    # ---- snapshot --------------------------------------------------------------
    def snapshot(self, path: str) -> None:
        """Write the shard as gzipped JSON (data only, safe to load), atomically."""
        def enc(node: Node) -> dict:
            return {"t": node.tokens, "lp": node.logprob, "en": node.entropy, "t1": node.top1_logprob,
                    "s": node.start, "v": node.visits, "rs": node.reward_sum, "rq": node.reward_sq,
                    "sl": node.soft_lse if math.isfinite(node.soft_lse) else None,
                    "ver": node.version, "a": node.actor,
                    "b": {str(o): c for o, c in node.branch_counts.items()},
                    "c": [enc(ch) for ch in node.children.values()]}
        data = {"clock": self.clock, "next_ref": self.next_ref,
                "outstanding": {str(k): v for k, v in self.outstanding.items()},
                "trees": {rid: {"prompt": t.prompt_ids, "last_use": t.last_use, "n": t.num_nodes, "root": enc(t.root)}
                          for rid, t in self.trees.items()}}
        tmp = f"{path}.tmp"
        with gzip.open(tmp, "wt") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def restore(self, path: str) -> None:
        with gzip.open(path, "rt") as f:
            data = json.load(f)

        def dec(d: dict, parent: Node | None) -> Node:
            node = Node(parent, d["s"])
            node.tokens, node.logprob, node.entropy, node.top1_logprob = d["t"], d["lp"], d["en"], d["t1"]
            node.visits, node.reward_sum, node.reward_sq = d["v"], d["rs"], d["rq"]
            node.soft_lse = -math.inf if d["sl"] is None else d["sl"]
            node.version, node.actor = d["ver"], d["a"]
            node.branch_counts = {int(o): c for o, c in d["b"].items()}
            for cd in d["c"]:
                child = dec(cd, node)
                node.children[child.tokens[0]] = child
            return node

        self.clock, self.next_ref = data["clock"], data["next_ref"]
        self.outstanding = {int(k): v for k, v in data["outstanding"].items()}
        self.trees = {rid: Tree(root=dec(t["root"], None), prompt_ids=t["prompt"], last_use=t["last_use"], num_nodes=t["n"])
                      for rid, t in data["trees"].items()}
