"""The store on reasoning text of a real tokenizer: 200-400-token continuations over a 49,152-token vocabulary,
reasoning steps ending at the newline token (SmolLM2's id 198). Plain data, no model."""
import math

import numpy as np

from prefix_store.tree import PrefixShard
from protocol.messages import Rollout

VOCAB, NEWLINE = 49_152, 198


def reasoning_rollout(rng, i: int, root: str) -> Rollout:
    """A continuation of 200-400 tokens in lines of 10-40 tokens; confidence drawn per line (as steps are)."""
    n = int(rng.integers(200, 401))
    toks, top1, conf = [], [], 0.0
    while len(toks) < n:
        conf = float(rng.uniform(0.3, 0.99))
        line = int(rng.integers(10, 41))
        toks += [int(t) for t in rng.integers(1000, VOCAB, line - 1)] + [NEWLINE]
        top1 += [math.log(conf)] * line
    toks, top1 = toks[:n], top1[:n]
    return Rollout(request_id=i, root_id=root, prompt_ids=[1, 2, 3], prefix_ids=[], token_ids=toks,
                   logprobs=[lp - 0.1 for lp in top1], entropy=[1.0] * n, top1_logprobs=top1,
                   alt_token_ids=[5] * n, alt_logprobs=[-3.0] * n, reward=float(rng.random() < 0.2), policy_version=0,
                   actor_id=0)


def make_shard(scorer: str) -> PrefixShard:
    return PrefixShard(scorer=scorer, beta=0.01, max_branches_per_position=2, max_tokens=10**8, vocab_size=VOCAB,
                       step_delimiter=NEWLINE)


def test_step_statistics_are_per_line_and_storage_stays_within_target():
    rng = np.random.default_rng(0)
    shard = make_shard("step_confidence")
    rollouts = [reasoning_rollout(rng, i, f"q{i % 16}") for i in range(64)]
    shard.insert(rollouts)
    assert shard.live_tokens == sum(len(r.token_ids) for r in rollouts)
    # one step = one line: the stored step confidence is constant inside a line and is the line's mean max-prob
    pool, n = shard.pool, shard.pool.n
    toks, conf = np.asarray(pool["tok"][:n]), np.asarray(pool["step_conf"][:n], dtype=np.float64)
    first = rollouts[0]
    seg = conf[: len(first.token_ids)]
    assert np.array_equal(toks[: len(first.token_ids)], first.token_ids)
    ends = [j for j, t in enumerate(first.token_ids) if t == NEWLINE]
    start = 0
    for end in ends:
        want = math.exp(first.top1_logprobs[start])
        assert np.allclose(seg[start:end + 1], want, atol=2e-3)  # float16 column
        start = end + 1
    assert len(set(np.round(seg, 3))) > 3  # steps differ
    # columnar storage target: <= 32 bytes per stored token (plus a few nodes per 1,000 tokens)
    assert shard.bytes_used() / shard.live_tokens <= 34


def test_every_scorer_selects_positions_inside_long_reasoning_text():
    from prefix_store.scoring import SCORERS

    rng = np.random.default_rng(1)
    rollouts = [reasoning_rollout(rng, i, f"q{i % 8}") for i in range(24)]
    for name in SCORERS:
        if name in ("combined", "frontier"):  # frontier: these paths are all surprised at their first token, so each
            continue                          # root's frontier is the root itself (tests/prefix_store/test_frontier.py)
        shard = make_shard(name)
        shard.insert(rollouts)
        picked = shard.select(8)
        assert picked, name
        assert all(0 <= len(bp.prefix_ids) < 400 and 0 <= bp.token_id < VOCAB for bp in picked), name
