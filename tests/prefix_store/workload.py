"""Rollouts shaped like the driver's: fresh prompts plus re-entries of handed-out branch points.

Continuations use a small alphabet and a fixed total length, so trees share
prefixes heavily and one tree never holds more than `max_tree_tokens()` tokens (without forced branches).
"""
from __future__ import annotations

import numpy as np

from protocol.messages import BranchPoint, Rollout

ALPHABET = (4, 5, 6)
LENGTH = 5  # continuation tokens (prefix + new) of every rollout
VOCAB = 16


def max_tree_tokens(depth: int = LENGTH) -> int:
    """Tokens of a full tree of continuations `depth` long (LENGTH + 1 with forced branches)."""
    return sum(len(ALPHABET) ** d for d in range(1, depth + 1))


def rollout(rng: np.random.Generator, root: str, *, prefix=(), ref: int = -1, forced: bool = False,
            rid: int = 0, version: int = 0) -> Rollout:
    n = max(1, LENGTH - len(prefix))  # a forced token at the last position makes one rollout LENGTH + 1 long
    return Rollout(request_id=rid, root_id=root, prompt_ids=[1, int(root.removeprefix("root")) % VOCAB],
                   prefix_ids=list(prefix), token_ids=rng.choice(ALPHABET, n).tolist(),
                   logprobs=(-rng.random(n)).tolist(), entropy=(2 * rng.random(n)).tolist(),
                   top1_logprobs=(-rng.random(n) / 4).tolist(), alt_token_ids=rng.choice(ALPHABET, n).tolist(),
                   alt_logprobs=(-1 - rng.random(n)).tolist(), reward=float(rng.random() < 0.3),
                   policy_version=version, actor_id=0, branch_ref=ref, forced=forced)


def from_branch_point(rng: np.random.Generator, bp: BranchPoint, samples: int, version: int = 0) -> list[Rollout]:
    forced = bp.forced_token >= 0
    prefix = bp.prefix_ids + ([bp.forced_token] if forced else [])
    return [rollout(rng, bp.root_id, prefix=prefix, ref=bp.ref, forced=forced, version=version) for _ in range(samples)]


def fresh(rng: np.random.Generator, n_roots: int, prompts: int, samples: int, version: int = 0) -> list[Rollout]:
    roots = rng.choice(n_roots, prompts, replace=False)
    return [rollout(rng, f"root{r}", version=version) for r in roots for _ in range(samples)]
