"""Tasks and verifiers. Pure Python: the rollout actor calls `reward` on each sample.

Chain task (the seed paper's hard instance in miniature): the prompt is H
digits d_1..d_H; the answer is the H running sums s_i = (s_{i-1} + d_i) mod 10
(s_0 = 0). Every step depends on the one before, and the outcome reward is
1 only when all H steps are right, so one wrong turn makes every
continuation worthless.

Token layout (fixed vocabulary, word-level tokenizer built locally):
    prompt   = <bos> d_1 ... d_H :
    answer   = s_1 ... s_H <eos>
"""
from __future__ import annotations

import hashlib
import random

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIAL_TOKENS + [str(d) for d in range(10)] + [":"]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD, BOS, EOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"], TOKEN_ID["<eos>"]
SEP = TOKEN_ID[":"]
DIGIT0 = TOKEN_ID["0"]


def digit_token(d: int) -> int:
    return DIGIT0 + d


class ChainTask:
    """H dependent steps; reward 1 iff every running sum is right."""

    def __init__(self, horizon: int, heldout_size: int = 128, seed: int = 0):
        self.horizon = horizon
        self.heldout_size = heldout_size
        self.seed = seed

    # ---- prompts -------------------------------------------------------------
    def is_heldout(self, digits: tuple[int, ...]) -> bool:
        """A fixed fifth of all digit strings is held out, chosen by a hash (stable, disjoint)."""
        h = hashlib.blake2b(f"{self.seed}:{digits}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") % 5 == 0

    def _draw(self, rng: random.Random, heldout: bool) -> tuple[int, ...]:
        while True:
            digits = tuple(rng.randrange(10) for _ in range(self.horizon))
            if self.is_heldout(digits) == heldout:
                return digits

    def train_prompts(self, rng: random.Random, n: int) -> list[tuple[int, ...]]:
        return [self._draw(rng, heldout=False) for _ in range(n)]

    def heldout_prompts(self) -> list[tuple[int, ...]]:
        rng = random.Random(f"heldout:{self.seed}")
        return [self._draw(rng, heldout=True) for _ in range(self.heldout_size)]

    @staticmethod
    def root_id(digits: tuple[int, ...]) -> str:
        return "".join(map(str, digits))

    @staticmethod
    def prompt_ids(digits: tuple[int, ...]) -> list[int]:
        return [BOS] + [digit_token(d) for d in digits] + [SEP]

    def digits_of(self, prompt_ids: list[int]) -> tuple[int, ...]:
        return tuple(t - DIGIT0 for t in prompt_ids[1 : 1 + self.horizon])

    # ---- answers -------------------------------------------------------------
    @staticmethod
    def running_sums(digits: tuple[int, ...]) -> list[int]:
        out, s = [], 0
        for d in digits:
            s = (s + d) % 10
            out.append(s)
        return out

    def answer_ids(self, digits: tuple[int, ...]) -> list[int]:
        return [digit_token(s) for s in self.running_sums(digits)] + [EOS]

    @property
    def max_new_tokens(self) -> int:
        return self.horizon + 1

    def reward(self, prompt_ids: list[int], continuation_ids: list[int]) -> float:
        """1.0 iff the first H continuation tokens are the H running sums, else 0.0.

        Tokens after the H-th (normally <eos>) are ignored; a short or
        non-digit answer scores 0.
        """
        target = self.answer_ids(self.digits_of(prompt_ids))[: self.horizon]
        return float(list(continuation_ids[: self.horizon]) == target)


def make_task(name: str, *, horizon: int, heldout_size: int, seed: int) -> ChainTask:
    tasks = {"chain": ChainTask}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(tasks)}")
    return tasks[name](horizon=horizon, heldout_size=heldout_size, seed=seed)
