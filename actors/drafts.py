"""Drafts from earlier rollouts: suffix match against stored token sequences (issue 18's second proposer).

RL rollouts of one prompt repeat each other (several samples per prompt, re-entered prefixes), so the tokens
that followed the current suffix in an earlier rollout are a cheap draft (SPEC-RL, RhymeRL, suffix decoding).
`SuffixDraft` looks up the longest suffix of the committed sequence, `min_match` to `max_match` tokens long, in
the reference sequences (e.g. `PrefixTree.trajectories(root_id)` of the prefix store, each prompt + continuation,
or a plain list of previous outputs) and in the sequence itself (prompt lookup); the next `depth` tokens after
up to `max_branches` distinct occurrences form a trie, which `actors.mtp.decode` verifies like any draft tree.
Occurrences are tried most recent reference first. Pure Python: plain lists in, an `actors.mtp.DraftTree` out.
"""
from __future__ import annotations

from collections import defaultdict

from actors.mtp import DraftTree, Proposer


class SuffixDraft(Proposer):
    """n-gram index over reference token sequences; proposes a trie of continuations of the longest match."""

    def __init__(self, references: list[list[int]] = (), *, min_match: int = 2, max_match: int = 8, depth: int = 6,
                 max_branches: int = 3, max_nodes: int = 16, self_lookup: bool = True):
        if not 1 <= min_match <= max_match or depth < 1 or max_branches < 1 or max_nodes < 1:
            raise ValueError(f"SuffixDraft needs 1 <= min_match <= max_match, depth, max_branches, max_nodes >= 1 "
                             f"(got {min_match}, {max_match}, {depth}, {max_branches}, {max_nodes})")
        self.min_match, self.max_match, self.depth = min_match, max_match, depth
        self.max_branches, self.max_nodes, self.self_lookup = max_branches, max_nodes, self_lookup
        self.refs: list[list[int]] = []
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)  # n-gram -> (ref, end)
        for r in references:
            self.add(r)

    def add(self, seq: list[int]) -> None:
        """Index one more reference sequence (its n-grams of every length min_match..max_match)."""
        seq = [int(t) for t in seq]
        ri = len(self.refs)
        self.refs.append(seq)
        for n in range(self.min_match, self.max_match + 1):
            for end in range(n, len(seq)):  # an n-gram that ends before the last token has a continuation
                self._index[tuple(seq[end - n:end])].append((ri, end))

    def continuations(self, committed: list[int]) -> list[list[int]]:
        """Up to max_branches distinct continuations (<= depth tokens) of the longest suffix found."""
        for n in range(min(self.max_match, len(committed) - 1), self.min_match - 1, -1):
            key = tuple(committed[-n:])
            found: list[list[int]] = []
            for ri, end in reversed(self._index.get(key, ())):
                cont = self.refs[ri][end:end + self.depth]
                if cont and cont not in found:
                    found.append(cont)
                if len(found) >= self.max_branches:
                    return found
            if self.self_lookup:  # the sequence itself, newest occurrence first, not the suffix itself
                for end in range(len(committed) - 1, n - 1, -1):
                    if len(found) >= self.max_branches:
                        break
                    if tuple(committed[end - n:end]) == key:
                        cont = committed[end:end + self.depth]
                        if cont and cont not in found:
                            found.append(cont)
            if found:
                return found
        return []

    def draft(self, committed: list[int]) -> DraftTree:
        return trie(self.continuations(committed), max_nodes=self.max_nodes)


def trie(paths: list[list[int]], *, max_nodes: int) -> DraftTree:
    """Prefix tree of token paths (shared prefixes once), nodes in the order paths first reach them, at most
    max_nodes."""
    tree, node_of = DraftTree(), {}
    for path in paths:
        parent = -1
        for tok in path:
            key = (parent, tok)
            if key not in node_of:
                if len(tree) >= max_nodes:
                    break
                node_of[key] = len(tree)
                tree.tokens.append(int(tok))
                tree.parents.append(parent)
            parent = node_of[key]
    return tree
