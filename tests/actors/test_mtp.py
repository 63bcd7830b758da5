"""Pure parts of actors/mtp.py on plain lists and tensors: tree mask, positions, tree building, greedy acceptance,
and the lossless sampling rule (exact enumeration and many draws with a fixed generator)."""
import itertools

import pytest
import torch

from actors.mtp import (PROBE, DraftTree, accept_greedy, accept_sample, batch_step_mask, build_tree, depths,
                        sample_residual, step_mask)

#        root
#       /    \
#     0(5)   1(6)
#     /  \      \
#   2(7) 3(8)   4(9)
#    |
#   5(PROBE)
TREE = DraftTree(tokens=[5, 6, 7, 8, 9, PROBE], parents=[-1, -1, 0, 0, 1, 2])


def test_depths_and_parent_order():
    assert depths(TREE.parents) == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="parent must precede"):
        depths([-1, 2, 0])


def test_step_mask_shape_ancestors_and_positions():
    allowed, pos = step_mask(num_cached=3, num_pending=2, parents=TREE.parents)
    assert allowed.shape == (2 + 6, 3 + 2 + 6)
    assert allowed[:, :3].all()  # everything sees the cache
    assert allowed[0, 3] and not allowed[0, 4] and allowed[1, 4]  # pending tokens are causal
    assert not allowed[:2, 5:].any()  # pending tokens never see the tree
    ancestors = {0: {0}, 1: {1}, 2: {0, 2}, 3: {0, 3}, 4: {1, 4}, 5: {0, 2, 5}}
    for j, anc in ancestors.items():
        row = allowed[2 + j]
        assert row[3:5].all(), f"node {j} must see both pending tokens"
        assert {i for i in range(6) if row[5 + i]} == anc, f"node {j}"
    assert pos.tolist() == [3, 4, 5, 5, 6, 6, 6, 7]


def test_step_mask_without_tree_is_causal():
    allowed, pos = step_mask(num_cached=0, num_pending=4, parents=[])
    assert torch.equal(allowed, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert pos.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at least one pending"):
        step_mask(2, 0, [])


def test_batch_step_mask_places_each_row_like_step_mask():
    """Row 0: 2 pending + TREE, 3 valid of 4 cache slots; row 1: 1 pending, no nodes, 2 valid slots; row 2 finished."""
    key_valid = torch.tensor([[True, False, True, True], [True, True, False, False], [True, True, True, True]])
    allowed, pos, pmax, mmax = batch_step_mask(key_valid, [3, 2, 4], [2, 1, 0], [TREE.parents, [], [1, 2]])
    assert (pmax, mmax) == (2, 6) and allowed.shape == (3, 8, 12) and pos.shape == (3, 8)
    ref, ref_pos = step_mask(0, 2, TREE.parents)
    assert torch.equal(allowed[0, :, 4:], ref) and pos[0].tolist() == (ref_pos + 3).tolist()
    assert torch.equal(allowed[0, :, :4], key_valid[0].expand(8, 4))  # every real query: its row's valid slots
    # row 1: its pending token at slot 0 sees its valid slots and itself; every other slot is padding
    assert allowed[1, 0].tolist() == [True, True, False, False, True] + [False] * 7 and pos[1, 0] == 2
    for r, slots in ((1, range(1, 8)), (2, range(8))):
        for s in slots:
            assert allowed[r, s].nonzero().flatten().tolist() == [4 + s], (r, s)  # padding sees only itself
    with pytest.raises(ValueError, match="rows"):
        batch_step_mask(key_valid, [3], [2], [[]])


def test_children_skip_probes_and_keep_order():
    assert TREE.children(-1) == [0, 1]
    assert TREE.children(0) == [2, 3]
    assert TREE.children(2) == []  # its only child is a probe


def test_build_tree_best_first_with_budget_and_pruning():
    toks = [[10, 11], [20, 21], [30, 31]]
    probs = [[0.6, 0.25], [0.5, 0.4], [0.9, 0.1]]
    tree = build_tree(toks, probs, max_nodes=4)
    # scores: 10:.6, 10-20:.3, 10-20-30:.27, 11:.25, 10-21:.24, 11-20:.125, ...
    assert tree.tokens == [10, 20, 30, 11]
    assert tree.parents == [-1, 0, 1, -1]
    pruned = build_tree(toks, probs, max_nodes=50, min_prob=0.25)
    assert pruned.tokens == tree.tokens and pruned.parents == tree.parents
    assert len(build_tree(toks, probs, max_nodes=50)) == 2 + 4 + 8
    assert len(build_tree([], [], max_nodes=5)) == 0


def test_build_tree_drops_duplicate_siblings():
    tree = build_tree([[4, 4, 5]], [[0.5, 0.4, 0.1]], max_nodes=10)
    assert tree.tokens == [4, 5]


def test_accept_greedy_longest_matching_path():
    argmax = [0] * 7
    argmax[0], argmax[1], argmax[4] = 5, 8, 1  # root -> 5 (node 0), node 0 -> 8 (node 3), node 3 -> bonus 1
    assert accept_greedy(TREE, argmax) == ([0, 3], 1)
    argmax[0] = 6  # root -> node 1; node 1's argmax (argmax[2] = 0) matches none of its children
    assert accept_greedy(TREE, argmax) == ([1], 0)
    argmax[0] = 42
    assert accept_greedy(TREE, argmax) == ([], 42)
    assert accept_greedy(DraftTree(), [3]) == ([], 3)


def _residual_law(p: list[float], cands: list[int]) -> list[float]:
    """Exact law of the token `sample_residual` emits, computed by enumerating its branches."""
    out, q, reach = [0.0] * len(p), list(p), 1.0
    for x in cands:
        s = sum(q)
        out[x] += reach * q[x] / s
        reach *= 1 - q[x] / s
        q[x] = 0.0
    s = sum(q)
    for i, v in enumerate(q):
        out[i] += reach * v / s
    return out


@pytest.mark.parametrize("cands", [[], [2], [2, 0], [0, 1, 2, 3], [4, 4]])
def test_residual_rule_is_exactly_lossless(cands):
    p = [0.1, 0.25, 0.4, 0.05, 0.2]
    assert _residual_law(p, cands) == pytest.approx(p, abs=1e-12)


def test_residual_rule_draws_match_the_target():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.25, 0.4, 0.05, 0.2])
    n = 40_000
    counts, hits = torch.zeros(5), 0
    for _ in range(n):
        j, tok = sample_residual(p, [2, 0, 3], gen)
        counts[tok] += 1
        hits += j is not None
    freq = counts / n
    assert (freq - p).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 standard errors at worst
    assert abs(hits / n - 0.55) < 0.015  # 0.4 + 0.6 * (0.1 / 0.6) + 0.5 * (0.05 / 0.5)


def test_tree_walk_is_lossless_on_a_markov_chain():
    """Two tokens from a 3-symbol Markov chain: the joint law of what accept_sample emits (accepted + bonus,
    first two tokens) equals p(x1) p(x2 | x1), with a tree that drafts wrong and right children."""
    p1 = torch.tensor([0.5, 0.3, 0.2])
    p2 = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])  # p2[x1] = law of x2 after x1
    p3 = torch.full((3,), 1 / 3)
    tree = DraftTree(tokens=[1, 0, 2, 1], parents=[-1, -1, 1, 1])  # root: try 1 then 0; under 0: 2 then 1
    probs = torch.stack([p1, p2[1], p2[0], p3, p3])  # target at root, node0 (tok 1), node1 (tok 0), leaves
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(3, 3)
    n = 30_000
    for _ in range(n):
        path, bonus = accept_sample(tree, probs, gen)
        seq = [tree.tokens[j] for j in path] + [bonus]
        if len(seq) == 1:  # stopped at the root: x2 comes from a plain draw after x1, as the next call would
            seq.append(int(torch.multinomial(p2[seq[0]], 1, generator=gen)))
        counts[seq[0], seq[1]] += 1
    joint = p1[:, None] * p2
    assert (counts / n - joint).abs().max() < 4 * (0.25 / n) ** 0.5


def test_sample_residual_at_a_leaf_samples_the_target():
    gen = torch.Generator().manual_seed(2)
    p = torch.tensor([0.0, 1.0, 0.0])
    assert all(sample_residual(p, [], gen) == (None, 1) for _ in range(20))
    assert all(sample_residual(p, [1], gen) == (0, 1) for _ in range(20))
    assert all(sample_residual(p, [0, 2], gen) == (None, 1) for _ in range(20))


def test_greedy_walk_matches_a_brute_force_search():
    """accept_greedy = the deepest node whose whole path matches, over every tree node (small random trees)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=g))
        parents = [int(torch.randint(-1, j, (1,), generator=g)) for j in range(n)]
        tokens = torch.randint(0, 3, (n,), generator=g).tolist()
        tree = DraftTree(tokens=tokens, parents=parents)
        argmax = torch.randint(0, 3, (n + 1,), generator=g).tolist()
        path, bonus = accept_greedy(tree, argmax)
        best = []
        for j in range(n):
            chain, a = [], j
            while a >= 0:
                chain.append(a)
                a = parents[a]
            chain.reverse()
            ok = all(tokens[c] == argmax[(parents[c] + 1)] for c in chain)
            if ok and len(chain) > len(best):
                best = chain
        assert len(path) == len(best)
        assert bonus == argmax[(path[-1] + 1) if path else 0]
        assert all(parents[c] == (path[i - 1] if i else -1) and tokens[c] == argmax[parents[c] + 1]
                   for i, c in enumerate(path))  # a matching root-to-node chain


def test_mask_probe_places_masks_and_reads_the_right_ones():
    from actors.mtp import MaskProbe

    emb = torch.nn.Embedding(10, 4)
    mp = MaskProbe(k=3, top_k=2, max_nodes=6, chain_probes=True)
    mp.start([1, 2, 3], emb)
    assert torch.allclose(mp.probe_embedding(), emb.weight[[1, 2, 3]].mean(0))
    assert mp.draft([1, 2, 3]).tokens == []  # nothing guessed yet
    assert mp.probe_parents(DraftTree()) == [-1, 0, 1]  # root chain only when there is no tree
    logits = torch.full((3, 10), -9.0)
    for i, t in enumerate((4, 5, 6)):
        logits[i, t] = 5.0  # mask i's best guess: token 4 + i
        logits[i, 9] = 4.0  # and 9 second
    mp.observe([7], [], logits)  # nothing accepted: masks 0.. seed depths 0..
    assert torch.allclose(mp.probe_embedding(), emb.weight[[1, 2, 3, 7]].mean(0))
    tree = mp.draft([1, 2, 3, 7])
    assert tree.tokens[:3] == [4, 5, 6] and tree.parents[:3] == [-1, 0, 1]  # the most probable chain first
    parents = mp.probe_parents(tree)
    n = len(tree)
    assert parents == [-1, n, n + 1, 2, n + 3, n + 4]  # root chain, then a chain after the chain's end (node 2)
    six = torch.full((6, 10), -9.0)
    six[3:, 8] = 5.0  # the masks after the chain guess 8
    six[:3, 3] = 5.0  # the root masks guess 3
    mp.observe([4, 5, 6, 0], [0, 1, 2], six)  # whole chain accepted: read the chain-end masks
    assert mp.draft([]).tokens[0] == 8
    mp.probe_parents(mp.draft([]))
    mp.observe([8, 1], [0], six)  # one accepted (not the whole chain): root masks 1.. seed depths 0..
    assert len(mp._guess[0]) == 2 and mp.draft([]).tokens[0] == 3


def test_decode_on_a_tiny_random_llama_equals_generate():
    """The whole decode loop (tree mask into transformers' Llama, positions, cache crop) on a 2-layer random Llama:
    every proposer's greedy tokens are `generate`'s; sampling with a fixed generator emits the requested length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.drafts import SuffixDraft
    from actors.mtp import MaskProbe, Proposer, decode

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)).eval()
    prompt = [3, 5, 7, 9, 11, 3, 5]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, len(prompt):].tolist()
    calls = {}
    for name, prop in (("plain", Proposer()), ("mask", MaskProbe()), ("chain", MaskProbe(chain_probes=True)),
                       ("store", SuffixDraft([prompt + ref[:12]]))):
        out, st = decode(model, prompt, max_new_tokens=30, proposer=prop, eos_token_id=2)
        assert out == ref, name
        calls[name] = st.calls
    assert calls["plain"] == len(ref) and calls["store"] < len(ref)
    out, st = decode(model, prompt, max_new_tokens=12, proposer=MaskProbe(), temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert len(out) == 12 or out[-1] == 2


def test_decode_batch_on_a_tiny_random_llama_equals_generate_per_prompt():
    """Three prompts of different lengths in one batch (padding in the cache; with drafts for the first prompt only
    its row finishes calls before the others and is padding after): each row's greedy tokens are `generate`'s for
    that prompt alone, for every proposer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.drafts import SuffixDraft
    from actors.mtp import MaskProbe, Proposer, decode_batch

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)).eval()
    prompts = [[3, 5, 7, 9, 11, 3, 5], [4, 6], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    makers = {"plain": lambda i: Proposer(), "mask": lambda i: MaskProbe(),
              "store": lambda i: SuffixDraft([prompts[0] + refs[0]] if i == 0 else [], self_lookup=False)}
    for name, make in makers.items():
        outs, st = decode_batch(model, prompts, max_new_tokens=20, proposers=[make(i) for i in range(3)])
        assert outs == refs, name
        assert st.new_tokens == 60 and st.calls <= st.row_calls <= 3 * st.calls
        if name == "plain":
            assert (st.calls, st.row_calls) == (20, 60)
        if name == "store":  # row 0 took its 20 tokens in a few calls, the others one per call
            assert st.calls == 20 and st.row_calls < 60
    with pytest.raises(ValueError, match="one distinct proposer per prompt"):
        shared = Proposer()
        decode_batch(model, prompts, max_new_tokens=2, proposers=[shared] * 3)
