"""Lossless multi-token decoding with a draft tree verified in one forward pass (issue 18).

One decoding call of the frozen target model reads

    [pending committed tokens | draft-tree nodes | k probe (mask) embeddings]
      causal among themselves   each sees the committed  chained after the last committed
                                tokens and its ancestors  token (they never see the tree)

and returns the target's distribution at the last committed token (the root) and at every tree node. The
longest root-to-node path whose tokens the target accepts is kept, plus one token the target picks after it
(the "bonus"), so every call emits at least one token and the output follows the target exactly:
- greedy (`temperature=0`): a child is accepted iff its token is the argmax of its parent's target logits;
- sampling: at a node with target distribution p and candidate children x_1..x_m (each a deterministic draft),
  x_j is accepted with probability p_j(x_j), where p_1 = p and p_{j+1} = p_j with x_j removed and
  renormalised; if none is accepted the token is drawn from p_{m+1} (SpecInfer's multi-draft rule with point-mass
  drafts: min(1, p/q) = p(x), residual norm(max(p - q, 0)) = p without x). By induction the emitted token is
  distributed as p, whatever the drafts.

Proposers (where the tree comes from) share this verifier:
- `MaskProbe`: training-free MTP by embedding-space probing (Goel et al., arXiv 2603.17942, "ESP"). k copies of a
  mask embedding e_m follow the root; e_m starts as the mean of the prompt's token embeddings and is the running
  mean of the embeddings of every committed token (prompt + accepted). The target's logits at mask i guess the
  token i + 2 places after the root (the root's own logits give the next one). Those guesses, shifted by what the
  call accepted, seed the next call's tree: top-`top_k` tokens per depth, expanded best-first by the product of
  their mask probabilities, at most `max_nodes` nodes, nodes under `min_prob` pruned.
- `actors.drafts.SuffixDraft`: continuations of the longest suffix match in earlier rollouts (the prefix store's
  stored sequences) or in the sequence itself.

KV cache: one `transformers.DynamicCache` per sequence. After a call the cache holds the committed tokens and the
call's tree and probe nodes; the nodes are cropped (`DynamicCache.crop(-n)`) and the accepted tokens + bonus are fed
as the next call's pending tokens (their KV is recomputed once, inside the next call, instead of being gathered
out of the tree). Batch size 1 only.

Pure parts (`DraftTree`, `build_tree`, `step_mask`, `accept_greedy`, `accept_sample`, `sample_residual`) take plain
lists / tensors; `decode` needs a Hugging Face causal LM that accepts `inputs_embeds`, a custom 4D
`attention_mask` and explicit `position_ids` (Llama does). No Ray, vLLM or DeepSpeed.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import torch

PROBE = -1
"""Token id of a probe (mask-embedding) node; such a node never matches a target token."""


@dataclass
class DraftTree:
    """A draft tree over the positions after the root (the last committed token)."""
    tokens: list[int] = field(default_factory=list)
    """Token id of each node (PROBE for a mask-embedding node)."""
    parents: list[int] = field(default_factory=list)
    """Index of each node's parent; -1 = the root. A parent precedes its children."""

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        """Token-node children of `node` (-1: the root), in index order (the order candidates are tried)."""
        return [j for j, p in enumerate(self.parents) if p == node and self.tokens[j] != PROBE]


def depths(parents: list[int]) -> list[int]:
    """Depth of each node: 0 for a child of the root, parent's depth + 1 otherwise."""
    out: list[int] = []
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"node {j} has parent {p}: a parent must precede its children")
        out.append(0 if p < 0 else out[p] + 1)
    return out


def step_mask(num_cached: int, num_pending: int, parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and positions of one decoding call.

    Queries: `num_pending` committed tokens not yet in the cache (causal), then the tree nodes. Keys: the
    `num_cached` cached tokens, the pending tokens, the nodes. A node sees every cached and pending token, its
    ancestors and itself. Position of pending token i: num_cached + i; of a node at depth d: num_cached +
    num_pending + d.

    Returns (allowed, positions): bool (P+N, C+P+N) with True = may attend, and long (P+N,).
    """
    if num_pending < 1:
        raise ValueError(f"a call needs at least one pending token (the root), got {num_pending}")
    n, p, c = len(parents), num_pending, num_cached
    allowed = torch.zeros(p + n, c + p + n, dtype=torch.bool)
    allowed[:, :c] = True
    allowed[:p, c:c + p] = torch.tril(torch.ones(p, p, dtype=torch.bool))
    allowed[p:, c:c + p] = True
    for j in range(n):
        a = j
        while a >= 0:  # itself and its ancestors
            allowed[p + j, c + p + a] = True
            a = parents[a]
    d = torch.tensor(depths(parents), dtype=torch.long)
    positions = torch.cat([torch.arange(c, c + p), c + p + d])
    return allowed, positions


def build_tree(cand_tokens: list[list[int]], cand_probs: list[list[float]], *, max_nodes: int,
               min_prob: float = 0.0) -> DraftTree:
    """Best-first draft tree from per-depth candidates that do not depend on the path (mask-probe guesses).

    cand_tokens[d], cand_probs[d]: the candidates for depth d and their proposal probabilities. A node's score is
    the product of its path's probabilities; nodes are added in order of score (a child after its parent since
    scores only shrink), at most `max_nodes`, none with a score under `min_prob`. Siblings with the same token are
    kept once.
    """
    tree = DraftTree()
    if not cand_tokens or max_nodes < 1:
        return tree
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, tie, parent, depth, token)
    tie = 0
    for tok, pr in zip(cand_tokens[0], cand_probs[0]):
        heapq.heappush(heap, (-float(pr), tie, -1, 0, int(tok)))
        tie += 1
    seen: set[tuple[int, int]] = set()
    while heap and len(tree) < max_nodes:
        neg, _, parent, d, tok = heapq.heappop(heap)
        if -neg < min_prob or (parent, tok) in seen:
            continue
        seen.add((parent, tok))
        node = len(tree)
        tree.tokens.append(tok)
        tree.parents.append(parent)
        if d + 1 < len(cand_tokens):
            for t2, p2 in zip(cand_tokens[d + 1], cand_probs[d + 1]):
                heapq.heappush(heap, (neg * float(p2), tie, node, d + 1, int(t2)))
                tie += 1
    return tree


def accept_greedy(tree: DraftTree, argmax: list[int]) -> tuple[list[int], int]:
    """Longest path whose every token equals the argmax of its parent's target logits.

    argmax[0]: at the root; argmax[j + 1]: at node j. Returns (accepted node indices, bonus token = argmax after
    the last accepted node). Siblings with the same token are all followed (the deepest wins, the first on ties)."""
    def longest(node: int) -> list[int]:
        want = argmax[node + 1]
        best: list[int] = []
        for c in tree.children(node):
            if tree.tokens[c] == want:
                below = [c] + longest(c)
                best = below if len(below) > len(best) else best
        return best

    path = longest(-1)
    return path, int(argmax[(path[-1] if path else -1) + 1])


def sample_residual(p: torch.Tensor, candidates: list[int], generator: torch.Generator | None = None
                    ) -> tuple[int | None, int]:
    """One node of the lossless rule: try the candidate tokens in order against target distribution p (V,).

    Candidate j is accepted with probability p_j(x_j) (p_1 = p; p_{j+1} = p_j without x_j, renormalised).
    Returns (index of the accepted candidate, its token) or (None, a token drawn from the last residual)."""
    q = p.double().clone()
    for j, x in enumerate(candidates):
        total = float(q.sum())
        if total <= 0:
            break
        if float(torch.rand((), generator=generator, dtype=torch.float64)) * total < float(q[x]):
            return j, int(x)
        q[x] = 0.0
    if float(q.sum()) <= 0:  # every token with mass was a rejected candidate: impossible unless p is degenerate
        raise ValueError("target distribution has no mass left after removing the rejected candidates")
    return None, int(torch.multinomial(q / q.sum(), 1, generator=generator))


def accept_sample(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[list[int], int]:
    """Walk the tree with `sample_residual`: probs[0] is the target at the root, probs[j + 1] at node j (N+1, V).
    Returns (accepted node indices, bonus token drawn where the walk stopped)."""
    path, cur = [], -1
    while True:
        kids = tree.children(cur)
        j, tok = sample_residual(probs[cur + 1], [tree.tokens[c] for c in kids], generator)
        if j is None:
            return path, tok
        path.append(kids[j])
        cur = kids[j]


class Proposer:
    """No drafts: `decode` with it is plain autoregressive decoding through the same code path.

    A proposer gives each call its tree (`draft`), optionally probe nodes after the tree (`probe_parents`: their
    parents, indices < len(tree) + own index, -1 = the root; all take `probe_embedding()` as input), and sees what
    the call accepted (`observe`: the new tokens, the accepted tree nodes, the target's logits at the probes)."""

    def start(self, prompt_ids: list[int], embed: torch.nn.Embedding) -> None:
        pass

    def draft(self, committed: list[int]) -> DraftTree:
        return DraftTree()

    def probe_parents(self, tree: DraftTree) -> list[int]:
        return []

    def probe_embedding(self) -> torch.Tensor | None:
        return None

    def observe(self, new_tokens: list[int], path: list[int], probe_logits: torch.Tensor | None) -> None:
        pass


class MaskProbe(Proposer):
    """Embedding-space probing (arXiv 2603.17942): k mask embeddings after the root propose the following tokens.

    Mask i sits at the root's position + 1 + i and its logits guess the token i + 2 places after the root. After a
    call that accepted a tree tokens (+1 bonus) the new root is a + 1 places further on, so mask a + d guesses depth d
    of the next tree: masks a .. k-1 seed depths 0 .. k-1-a (a >= k leaves none: the next tree is empty)."""

    def __init__(self, *, k: int = 4, top_k: int = 3, max_nodes: int = 12, min_prob: float = 0.0,
                 chain_probes: bool = False):
        if k < 1 or top_k < 1 or max_nodes < 1:
            raise ValueError(f"MaskProbe needs k, top_k, max_nodes >= 1 (got {k}, {top_k}, {max_nodes})")
        self.k, self.top_k, self.max_nodes, self.min_prob = k, top_k, max_nodes, min_prob
        self.chain_probes = chain_probes
        self._chain: list[int] = []
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._embed: torch.nn.Embedding | None = None
        self._guess: tuple[list[list[int]], list[list[float]]] = ([], [])

    def start(self, prompt_ids: list[int], embed: torch.nn.Embedding) -> None:
        self._embed = embed
        with torch.no_grad():
            self._sum = embed(torch.tensor(prompt_ids)).sum(0)  # (H,)
        self._count = len(prompt_ids)
        self._guess = ([], [])

    def probe_embedding(self) -> torch.Tensor:
        """e_m = mean embedding of every committed token so far (prompt + accepted)."""
        return self._sum / self._count

    def draft(self, committed: list[int]) -> DraftTree:
        toks, probs = self._guess
        return build_tree(toks, probs, max_nodes=self.max_nodes, min_prob=self.min_prob)

    def probe_parents(self, tree: DraftTree) -> list[int]:
        """k masks chained after the root; with chain_probes, k more after the end of the tree's first path (its
        most probable chain), which are the better guesses when the whole chain is accepted."""
        n, k = len(tree), self.k
        parents = [-1] + list(range(n, n + k - 1))
        self._chain = []
        if self.chain_probes and n:
            node = 0
            while node >= 0:
                self._chain.append(node)
                node = next((c for c in tree.children(node)), -1)
            parents += [self._chain[-1]] + list(range(n + k, n + 2 * k - 1))
        return parents

    def observe(self, new_tokens: list[int], path: list[int], probe_logits: torch.Tensor | None) -> None:
        with torch.no_grad():
            self._sum = self._sum + self._embed(torch.tensor(new_tokens)).sum(0)
        self._count += len(new_tokens)
        if self._chain and path == self._chain:  # masks after the accepted chain: mask i guesses depth i
            rows = probe_logits[self.k:]
        else:
            rows = probe_logits[len(path):self.k]  # (k - a, V)
        top = torch.softmax(rows.float(), dim=-1).topk(self.top_k, dim=-1)
        self._guess = (top.indices.tolist(), top.values.tolist())


@dataclass
class DecodeStats:
    """What one `decode` call measured."""
    new_tokens: int = 0
    calls: int = 0
    """Forward passes of the target (the prefill included)."""
    accepted_drafts: int = 0
    """Draft tokens accepted (new_tokens - calls, up to truncation at eos / the length limit)."""
    tree_nodes: int = 0
    """Tree nodes verified, summed over calls (probe nodes not counted)."""
    seconds: float = 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.new_tokens / max(self.calls, 1)


def _causal_lm_call(model, cache, embeds, allowed, positions):
    neg = torch.finfo(embeds.dtype).min
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, neg)[None, None]  # (1,1,Q,K)
    out = model(inputs_embeds=embeds[None], attention_mask=mask, position_ids=positions[None],
                past_key_values=cache, use_cache=True)
    return out.logits[0]  # (Q, V)


@torch.no_grad()
def decode(model, prompt_ids: list[int], *, max_new_tokens: int, proposer: Proposer | None = None,
           temperature: float = 0.0, eos_token_id: int | None = None, generator: torch.Generator | None = None
           ) -> tuple[list[int], DecodeStats]:
    """Generate up to `max_new_tokens` after `prompt_ids` (stops after `eos_token_id`), one tree per call.

    temperature 0: greedy (same tokens as plain greedy decoding, up to float ties); > 0: samples softmax(logits / T)
    exactly (the lossless rule above). Returns (new token ids, stats)."""
    from transformers import DynamicCache

    proposer = proposer or Proposer()
    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    committed, cached, out = list(prompt_ids), 0, []
    stats = DecodeStats()
    proposer.start(list(prompt_ids), embed)
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        tree = proposer.draft(committed)
        pending = committed[cached:]
        probe_parents = proposer.probe_parents(tree)
        k = len(probe_parents)
        allowed, positions = step_mask(cached, len(pending), tree.parents + probe_parents)
        parts = [embed(torch.tensor(pending + tree.tokens, dtype=torch.long))]
        if k:
            parts.append(proposer.probe_embedding()[None].expand(k, -1))
        logits = _causal_lm_call(model, cache, torch.cat(parts), allowed, positions)  # (P + N + k, V)
        p, n = len(pending), len(tree)
        target = logits[p - 1:p + n].float()  # (1 + N, V): root, then each tree node
        if temperature > 0:
            path, bonus = accept_sample(tree, torch.softmax(target / temperature, dim=-1), generator)
        else:
            path, bonus = accept_greedy(tree, target.argmax(-1).tolist())
        new = [tree.tokens[j] for j in path] + [bonus]
        if eos_token_id is not None and eos_token_id in new:
            new = new[:new.index(eos_token_id) + 1]
        new = new[:max_new_tokens - len(out)]
        if n + k:
            cache.crop(-(n + k))
        cached = len(committed)
        committed += new
        out += new
        stats.calls += 1
        stats.tree_nodes += n
        stats.accepted_drafts += len(new) - 1
        if out[-1:] == [eos_token_id]:
            break
        proposer.observe(new, path, logits[p + n:] if k else None)
    stats.new_tokens = len(out)
    stats.seconds = time.perf_counter() - t0
    return out, stats
