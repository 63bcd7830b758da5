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

KV cache: one `transformers.DynamicCache` (one row per sequence). After a call the cache holds the committed tokens and the
call's tree and probe nodes; the nodes are cropped (`DynamicCache.crop(-n)`) and the accepted tokens + bonus are fed
as the next call's pending tokens (their KV is recomputed once, inside the next call, instead of being gathered
out of the tree). `decode_batch` serves several sequences in one forward pass per call (one cache; each row's
padding slots masked out, `batch_step_mask`); `decode` is its batch of one.

Pure parts (`DraftTree`, `build_tree`, `step_mask`, `batch_step_mask`, `accept_greedy`, `accept_sample`,
`sample_residual`) take plain lists / tensors; `decode` and `decode_batch` need a Hugging Face causal LM that
accepts `inputs_embeds`, a custom 4D `attention_mask` and explicit `position_ids` (Llama does). No Ray, vLLM or
DeepSpeed.
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


def batch_step_mask(key_valid: torch.Tensor, num_cached: list[int], num_pending: list[int],
                    parents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Attention mask and positions of one decoding call over a batch of sequences of different lengths.

    The cache holds L slots per row, `key_valid` (B, L) says which of row i's slots are its committed tokens (the
    others are padding of earlier calls). The call's queries are a pending block of P = max(num_pending) slots (row
    i's pending tokens in the first num_pending[i]) and a node block of M = max(len(parents[i])) slots (row i's
    tree and probe nodes first); keys are the L cache slots, then the same P + M slots. A real query of row i sees
    its row's valid cache slots and, within the call, what `step_mask` allows; a padding query sees only itself.
    Positions count row i's committed tokens: pending j at num_cached[i] + j, a node at depth d at
    num_cached[i] + num_pending[i] + d (padding: 0). A row with num_pending[i] = 0 (finished) is all padding.

    Returns (allowed (B, P+M, L+P+M) bool, positions (B, P+M) long, P, M).
    """
    b, cache_len = key_valid.shape
    if not (len(num_cached) == len(num_pending) == len(parents) == b):
        raise ValueError(f"batch_step_mask: {b} rows of key_valid but {len(num_cached)}, {len(num_pending)}, "
                         f"{len(parents)} rows of num_cached, num_pending, parents")
    pmax = max(num_pending, default=0)
    mmax = max((len(par) if p else 0 for p, par in zip(num_pending, parents)), default=0)
    q = pmax + mmax
    allowed = torch.zeros(b, q, cache_len + q, dtype=torch.bool)
    positions = torch.zeros(b, q, dtype=torch.long)
    diag = torch.arange(q)
    allowed[:, diag, cache_len + diag] = True  # padding sees itself (real rows are overwritten below)
    for i in range(b):
        p = num_pending[i]
        if p == 0:
            continue
        m = len(parents[i])
        local, pos = step_mask(0, p, parents[i])  # (p + m, p + m) over [pending | nodes]
        slots = torch.cat([torch.arange(p), pmax + torch.arange(m)])  # where row i's queries / keys sit
        allowed[i, slots, :cache_len] = key_valid[i]
        allowed[i, slots[:, None], cache_len + slots[None, :]] = local
        positions[i, slots] = pos + num_cached[i]
    return allowed, positions, pmax, mmax


@dataclass
class DecodeStats:
    """What one `decode` / `decode_batch` call measured."""
    new_tokens: int = 0
    """Tokens emitted, summed over the batch."""
    calls: int = 0
    """Forward passes of the target (the prefill included); one per call whatever the batch size."""
    row_calls: int = 0
    """Sequences served, summed over calls (a finished sequence is no longer served); = calls at batch 1."""
    accepted_drafts: int = 0
    """Draft tokens accepted (new_tokens - row_calls, up to truncation at eos / the length limit)."""
    tree_nodes: int = 0
    """Tree nodes verified, summed over calls and sequences (probe nodes not counted)."""
    seconds: float = 0.0

    @property
    def tokens_per_call(self) -> float:
        """Accepted tokens per target call of one sequence (batch 1: per forward pass)."""
        return self.new_tokens / max(self.row_calls, 1)


def _causal_lm_call(model, cache, embeds, allowed, positions):
    neg = torch.finfo(embeds.dtype).min
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, neg)[:, None]  # (B,1,Q,K)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True)
    return out.logits  # (B, Q, V)


@torch.no_grad()
def decode(model, prompt_ids: list[int], *, max_new_tokens: int, proposer: Proposer | None = None,
           temperature: float = 0.0, eos_token_id: int | None = None, generator: torch.Generator | None = None
           ) -> tuple[list[int], DecodeStats]:
    """Generate up to `max_new_tokens` after `prompt_ids` (stops after `eos_token_id`), one tree per call.

    temperature 0: greedy (same tokens as plain greedy decoding, up to float ties); > 0: samples softmax(logits / T)
    exactly (the lossless rule above). Returns (new token ids, stats). `decode_batch` of one sequence."""
    outs, stats = decode_batch(model, [prompt_ids], max_new_tokens=max_new_tokens, proposers=[proposer or Proposer()],
                               temperature=temperature, eos_token_id=eos_token_id, generator=generator)
    return outs[0], stats


@torch.no_grad()
def decode_batch(model, prompts: list[list[int]], *, max_new_tokens: int, proposers: list[Proposer] | None = None,
                 temperature: float = 0.0, eos_token_id: int | None = None, generator: torch.Generator | None = None
                 ) -> tuple[list[list[int]], DecodeStats]:
    """`decode` for several sequences in one forward pass per call, each with its own proposer (proposers keep
    per-sequence state: pass one object per prompt).

    One `DynamicCache` holds every row. A call appends a pending block (padded to the longest row's pending
    tokens) and a node block; after the call the node block is cropped for every row, and the padding slots of
    the pending block stay in the cache, masked out of every later query (`batch_step_mask`'s key_valid). A
    finished sequence (eos or max_new_tokens) is padding in the calls after it."""
    from transformers import DynamicCache

    b = len(prompts)
    proposers = proposers if proposers is not None else [Proposer() for _ in range(b)]
    if len(proposers) != b or len({id(p) for p in proposers}) != b:
        raise ValueError(f"decode_batch needs one distinct proposer per prompt ({b} prompts, {len(proposers)} "
                         f"proposers, {len({id(p) for p in proposers})} distinct)")
    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    committed = [list(p) for p in prompts]
    cached = [0] * b  # committed tokens of row i already in the cache
    outs: list[list[int]] = [[] for _ in range(b)]
    done = [max_new_tokens <= 0] * b
    key_valid = torch.zeros(b, 0, dtype=torch.bool)
    stats = DecodeStats()
    for prop, p in zip(proposers, prompts):
        prop.start(list(p), embed)
    t0 = time.perf_counter()
    while not all(done):
        trees, pendings, probes = [], [], []
        for i in range(b):
            tree = DraftTree() if done[i] else proposers[i].draft(committed[i])
            trees.append(tree)
            pendings.append([] if done[i] else committed[i][cached[i]:])
            probes.append([] if done[i] else proposers[i].probe_parents(tree))
        parents = [t.parents + pp for t, pp in zip(trees, probes)]
        allowed, positions, pmax, mmax = batch_step_mask(key_valid, cached, [len(p) for p in pendings], parents)
        rows = []
        for i in range(b):
            ids = torch.zeros(pmax + mmax, dtype=torch.long)  # padding slots: token 0, masked out
            ids[:len(pendings[i])] = torch.tensor(pendings[i], dtype=torch.long)
            ids[pmax:pmax + len(trees[i])] = torch.tensor(trees[i].tokens, dtype=torch.long)
            row = embed(ids)
            if probes[i]:
                start = pmax + len(trees[i])
                row[start:start + len(probes[i])] = proposers[i].probe_embedding()
            rows.append(row)
        logits = _causal_lm_call(model, cache, torch.stack(rows), allowed, positions)  # (B, P + M, V)
        if mmax:
            cache.crop(-mmax)
        pending_valid = torch.arange(pmax)[None, :] < torch.tensor([len(p) for p in pendings])[:, None]
        key_valid = torch.cat([key_valid, pending_valid], dim=1)
        stats.calls += 1
        for i in range(b):
            if done[i]:
                continue
            p, n, k = len(pendings[i]), len(trees[i]), len(probes[i])
            target = torch.cat([logits[i, p - 1:p], logits[i, pmax:pmax + n]]).float()  # (1 + N, V): root, nodes
            if temperature > 0:
                path, bonus = accept_sample(trees[i], torch.softmax(target / temperature, dim=-1), generator)
            else:
                path, bonus = accept_greedy(trees[i], target.argmax(-1).tolist())
            new = [trees[i].tokens[j] for j in path] + [bonus]
            if eos_token_id is not None and eos_token_id in new:
                new = new[:new.index(eos_token_id) + 1]
            new = new[:max_new_tokens - len(outs[i])]
            cached[i] = len(committed[i])
            committed[i] += new
            outs[i] += new
            stats.row_calls += 1
            stats.tree_nodes += n
            stats.accepted_drafts += len(new) - 1
            if outs[i][-1:] == [eos_token_id] or len(outs[i]) >= max_new_tokens:
                done[i] = True
            else:
                probe_logits = logits[i, pmax + n:pmax + n + k] if k else None
                proposers[i].observe(new, path, probe_logits)
    stats.new_tokens = sum(len(o) for o in outs)
    stats.seconds = time.perf_counter() - t0
    return outs, stats
