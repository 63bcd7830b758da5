"""Text tasks: prompts with reference answers, a tokenizer, and a text verifier.

`TextTask` serves the same interface as `ChainTask` (train_prompts,
heldout_prompts, root_id, prompt_ids, answer_ids, max_new_tokens, reward) for
a fixed list of `Example`s: synthetic arithmetic word problems or a user's
JSONL file. Prompt ids come from the policy's own tokenizer, through its
chat template when it has one; `reward(prompt_ids, continuation_ids)` looks
the example up by its prompt ids, decodes the continuation and calls the
verifier. A verifier that raises (or returns something that is not a reward
in [0, 1]) gives that sample reward 0; the error is counted in
`verifier_errors` and logged (the first few in full, then every 100th).

Training and held-out examples are disjoint by construction: a stable hash of
the prompt text holds out a fifth of them, or, with a separate held-out file,
any training example whose prompt also appears there is dropped.
"""
from __future__ import annotations

import hashlib
import logging
import random

from actors.data import Example
from actors.verifiers import NUMERIC_VERIFIERS, check_reward, get_verifier, has_reference_number

log = logging.getLogger(__name__)
_LOG_FIRST = 5


def is_heldout_text(prompt: str, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % 5 == 0


class TextTask:
    """Examples + tokenizer + verifier; reward = verifier(decoded continuation, reference answer)."""

    def __init__(self, examples: list[Example], tokenizer, *, verifier: str = "numeric", heldout_size: int = 128,
                 seed: int = 0, max_new_tokens: int = 256, chat_template: bool = True,
                 heldout_examples: list[Example] | None = None, name: str = "text"):
        self.name = name
        self.tokenizer = tokenizer
        self.verifier_name = verifier
        self.verify = get_verifier(verifier)
        self.seed = seed
        self.heldout_size = heldout_size
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        if verifier in NUMERIC_VERIFIERS:  # a reference without a number could never earn reward
            for where, exs in (("", examples), (" held-out", heldout_examples or [])):
                if exs and not any(has_reference_number(e.answer) for e in exs):
                    raise ValueError(f"{name} task: none of the {len(exs)}{where} answers holds a number the "
                                     f"{verifier!r} verifier can compare (e.g. {exs[0].answer[:40]!r}); fix the "
                                     "answers or choose task.verifier=exact")
        if heldout_examples is None:
            train = [e for e in examples if not is_heldout_text(e.prompt, seed)]
            held = [e for e in examples if is_heldout_text(e.prompt, seed)]
        else:
            held_prompts = {e.prompt for e in heldout_examples}
            train, held = [e for e in examples if e.prompt not in held_prompts], list(heldout_examples)
        if not train:
            raise ValueError(f"{name} task: no training examples left after holding out {len(held)}")
        if not held:
            raise ValueError(f"{name} task: no held-out examples ({len(examples)} examples in all); add more data")
        self.train_examples, self._heldout = train, held[:heldout_size]
        self.horizon = None  # text tasks have no fixed step count
        self.verifier_errors = 0  # cumulative
        self._popped = 0
        self._ids: dict[Example, list[int]] = {}
        self._by_prompt_ids: dict[tuple[int, ...], Example] | None = None

    # ---- prompts -------------------------------------------------------------
    def train_prompts(self, rng: random.Random, n: int) -> list[Example]:
        return [rng.choice(self.train_examples) for _ in range(n)]

    def heldout_prompts(self) -> list[Example]:
        return list(self._heldout)

    @staticmethod
    def root_id(ex: Example) -> str:
        return ex.id

    def prompt_ids(self, ex: Example) -> list[int]:
        """The policy's input for this prompt: its chat template (user turn + generation prompt) when present."""
        ids = self._ids.get(ex)
        if ids is None:
            if self.use_chat_template:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                ids = list(self.tokenizer(ex.prompt)["input_ids"])
            self._ids[ex] = ids
        return ids

    def answer_ids(self, ex: Example) -> list[int]:
        """Token ids of the reference answer followed by EOS (a fixed sequence for logprob checks)."""
        ids = list(self.tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids + ([eos] if eos is not None else [])

    def example_of(self, prompt_ids: list[int]) -> Example:
        """The example whose prompt ids these are (train or held-out); KeyError if unknown."""
        if self._by_prompt_ids is None:
            self._by_prompt_ids = {tuple(self.prompt_ids(e)): e for e in self.train_examples + self._heldout}
        return self._by_prompt_ids[tuple(prompt_ids)]

    # ---- reward --------------------------------------------------------------
    def decode(self, continuation_ids: list[int]) -> str:
        return self.tokenizer.decode(list(continuation_ids), skip_special_tokens=True)

    def score_text(self, completion: str, answer: str) -> float:
        """verifier(completion, answer); any exception or out-of-range value -> 0.0, counted and logged."""
        try:
            return check_reward(self.verify(completion, answer), self.verifier_name)
        except Exception as e:  # noqa: BLE001 - a user verifier may raise anything; the run goes on
            return self._error(f"verifier {self.verifier_name!r} raised {type(e).__name__}: {e}")

    def reward(self, prompt_ids: list[int], continuation_ids: list[int]) -> float:
        """verifier(decoded continuation, reference answer); never raises (errors score 0 and are counted)."""
        try:
            ex = self.example_of(prompt_ids)
            completion = self.decode(continuation_ids)
        except KeyError:
            return self._error(f"prompt of {len(prompt_ids)} tokens is not in the {self.name} task's data")
        except Exception as e:  # noqa: BLE001 - e.g. ids the tokenizer cannot decode
            return self._error(f"cannot decode the continuation: {type(e).__name__}: {e}")
        return self.score_text(completion, ex.answer)

    def _error(self, why: str) -> float:
        self.verifier_errors += 1
        if self.verifier_errors <= _LOG_FIRST or self.verifier_errors % 100 == 0:
            log.warning("%s (error #%d; sample scored 0)", why, self.verifier_errors)
        return 0.0

    def pop_verifier_errors(self) -> int:
        """Verifier errors since the last call (for a `rollout/verifier_errors` metric)."""
        n, self._popped = self.verifier_errors - self._popped, self.verifier_errors
        return n
