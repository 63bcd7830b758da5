"""actors/drafts.py on plain token lists: suffix lookup in references and in the sequence itself, the trie."""
import pytest

from actors.drafts import SuffixDraft, trie


def test_longest_suffix_match_in_references_newest_first():
    refs = [[1, 2, 3, 4, 5, 6], [9, 2, 3, 7, 8], [0, 3, 4, 9]]
    d = SuffixDraft(refs, min_match=1, max_match=4, depth=3, self_lookup=False)
    assert d.continuations([5, 2, 3]) == [[7, 8], [4, 5, 6]]  # match "2 3": ref 1 is newer than ref 0
    assert d.continuations([7, 3, 4]) == [[9], [5, 6]]  # "3 4" in refs 2 and 0
    assert d.continuations([8, 1, 2, 3, 4]) == [[5, 6]]  # the longest match wins: "1 2 3 4"
    assert d.continuations([42]) == []


def test_min_match_and_branch_limit():
    refs = [[1, 2, 5], [1, 2, 6], [1, 2, 7]]
    d = SuffixDraft(refs, min_match=2, max_match=3, depth=2, max_branches=2, self_lookup=False)
    assert d.continuations([0, 1, 2]) == [[7], [6]]
    assert d.continuations([0, 2]) == []  # a 1-token suffix is under min_match
    with pytest.raises(ValueError, match="min_match"):
        SuffixDraft(min_match=3, max_match=2)


def test_self_lookup_finds_earlier_occurrence():
    d = SuffixDraft([], min_match=2, max_match=4, depth=3)
    seq = [4, 5, 6, 7, 8, 4, 5]
    assert d.continuations(seq) == [[6, 7, 8]]
    assert d.draft(seq).tokens == [6, 7, 8] and d.draft(seq).parents == [-1, 0, 1]


def test_trie_shares_prefixes_and_respects_budget():
    t = trie([[1, 2, 3], [1, 2, 4], [5]], max_nodes=10)
    assert t.tokens == [1, 2, 3, 4, 5]
    assert t.parents == [-1, 0, 1, 1, -1]
    small = trie([[1, 2, 3], [1, 2, 4], [5]], max_nodes=3)
    assert small.tokens == [1, 2, 3] and small.parents == [-1, 0, 1]


def test_vllm_speculative_kwargs():
    from actors.speculative import vllm_speculative_kwargs

    assert vllm_speculative_kwargs("none", 4) == {}
    spec = vllm_speculative_kwargs("ngram", 3)["speculative_config"]
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == 3
    with pytest.raises(ValueError, match="choose one of none, ngram"):
        vllm_speculative_kwargs("suffix", 4)
