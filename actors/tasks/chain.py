"""Chain task: the seed paper's hard instance in miniature. Pure Python.

The prompt is L symbols d_1..d_L from an alphabet of size m (m <= 10, written
as the digits 0..m-1); the answer is H running sums

    s_i = (s_{i-1} + d_{((i-1) mod L) + 1}) mod m,   s_0 = 0,   i = 1..H

(step i adds the next prompt symbol, cycling through the prompt when H > L;
with L > H the trailing symbols are distractors). Every step depends on the
one before, and the outcome reward is 1 only when all H steps are right, so
one wrong turn makes every continuation worthless.

Token layout (fixed vocabulary, word-level tokenizer built locally):
    prompt   = <bos> d_1 ... d_L :
    answer   = s_1 ... s_H <eos>

Prompts are tuples of ints. A fixed fifth of all symbol strings is held out,
chosen by a stable hash, so training and held-out prompts are disjoint.
"""
from __future__ import annotations

import hashlib
import itertools
import random

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIAL_TOKENS + [str(d) for d in range(10)] + [":"]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD, BOS, EOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"], TOKEN_ID["<eos>"]
SEP = TOKEN_ID[":"]
DIGIT0 = TOKEN_ID["0"]
MAX_MODULUS = 10
_ENUMERATE_BELOW = 200_000  # prompt spaces smaller than this are enumerated (exact split, no rejection loops)


def digit_token(d: int) -> int:
    return DIGIT0 + d


class ChainTask:
    """H dependent steps over an alphabet of m symbols; reward 1 iff every running sum is right."""

    name = "chain"

    def __init__(self, horizon: int, heldout_size: int = 128, seed: int = 0, *, modulus: int = 10,
                 prompt_len: int | None = None):
        if horizon < 1:
            raise ValueError(f"chain task: horizon={horizon} must be >= 1")
        if not 2 <= modulus <= MAX_MODULUS:
            raise ValueError(f"chain task: modulus={modulus} must lie in [2, {MAX_MODULUS}] (the step alphabet is the digits)")
        self.horizon = horizon
        self.modulus = modulus
        self.prompt_len = horizon if prompt_len is None else prompt_len
        if self.prompt_len < 1:
            raise ValueError(f"chain task: prompt_len={self.prompt_len} must be >= 1")
        self.heldout_size = heldout_size
        self.seed = seed
        self.verifier_errors = 0  # the chain reward cannot raise; kept for a uniform task interface
        self._popped = 0
        self._space = None
        if modulus ** self.prompt_len < _ENUMERATE_BELOW:
            space = list(itertools.product(range(modulus), repeat=self.prompt_len))
            held = [p for p in space if self.is_heldout(p)]
            train = [p for p in space if not self.is_heldout(p)]
            if not held or not train:
                raise ValueError(f"chain task: only {len(space)} distinct prompts (modulus={modulus}, prompt_len={self.prompt_len}); "
                                 "too few to split into disjoint training and held-out sets; raise prompt_len or modulus")
            self._space = {True: held, False: train}

    # ---- prompts -------------------------------------------------------------
    def is_heldout(self, digits: tuple[int, ...]) -> bool:
        """A fixed fifth of all symbol strings is held out, chosen by a hash (stable, disjoint)."""
        h = hashlib.blake2b(f"{self.seed}:{tuple(digits)}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") % 5 == 0

    def _draw(self, rng: random.Random, heldout: bool) -> tuple[int, ...]:
        if self._space is not None:
            return rng.choice(self._space[heldout])
        while True:
            digits = tuple(rng.randrange(self.modulus) for _ in range(self.prompt_len))
            if self.is_heldout(digits) == heldout:
                return digits

    def train_prompts(self, rng: random.Random, n: int) -> list[tuple[int, ...]]:
        return [self._draw(rng, heldout=False) for _ in range(n)]

    def heldout_prompts(self) -> list[tuple[int, ...]]:
        """`heldout_size` held-out prompts, fixed by the seed (distinct while the held-out set allows)."""
        rng = random.Random(f"heldout:{self.seed}")
        if self._space is not None and len(self._space[True]) <= self.heldout_size:
            pool = self._space[True]
            return [pool[i % len(pool)] for i in range(self.heldout_size)]
        out, seen = [], set()
        while len(out) < self.heldout_size:
            d = self._draw(rng, heldout=True)
            if d not in seen:
                seen.add(d)
                out.append(d)
        return out

    @staticmethod
    def root_id(digits: tuple[int, ...]) -> str:
        return "".join(map(str, digits))

    @staticmethod
    def prompt_ids(digits: tuple[int, ...]) -> list[int]:
        return [BOS] + [digit_token(d) for d in digits] + [SEP]

    def digits_of(self, prompt_ids: list[int]) -> tuple[int, ...]:
        return tuple(t - DIGIT0 for t in prompt_ids[1 : 1 + self.prompt_len])

    # ---- answers -------------------------------------------------------------
    def step_digit(self, digits: tuple[int, ...], i: int) -> int:
        """The prompt symbol added at step i (0-based)."""
        return digits[i % len(digits)]

    def running_sums(self, digits: tuple[int, ...]) -> list[int]:
        out, s = [], 0
        for i in range(self.horizon):
            s = (s + self.step_digit(digits, i)) % self.modulus
            out.append(s)
        return out

    def answer_ids(self, digits: tuple[int, ...]) -> list[int]:
        return [digit_token(s) for s in self.running_sums(digits)] + [EOS]

    def teacher_forcing(self, digits: tuple[int, ...]) -> tuple[list[int], int]:
        """(prompt + the H right step tokens, position of the first step token): the sequence whose teacher-forced
        probability prod_{i < H} pi(s_i | prompt, s_<i) is the exact chance that a sample from this prompt earns
        reward 1 (learner.exact_success)."""
        prompt = self.prompt_ids(digits)
        return prompt + self.answer_ids(digits)[: self.horizon], len(prompt)

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

    def pop_verifier_errors(self) -> int:
        n, self._popped = self.verifier_errors - self._popped, self.verifier_errors
        return n
