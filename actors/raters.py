"""Raters: who says which of two responses to a prompt is better. Pure Python (no torch, no Ray).

    simulated   Bradley-Terry on a gold score g:  p(A > B) = sigmoid((g(A) - g(B)) / temperature), seeded draws.
                Chain task: g = the number of correct steps (answer positions equal to the true running sums);
                text tasks: g = the task's verifier reward.
    file        recorded choices from a JSONL file of {"prompt", "response_a", "response_b", "choice"} lines
                (choice "a"/"b" or 0/1), for human preference data. It answers only the pairs it holds.

Every answered query is one label and is counted (`LabelCounter`): labels are the budget of preference learning.
A choice is 0 when response A is preferred and 1 when response B is.

A bad line of a preference file (not JSON, missing fields, a tie, a prompt the task does not have) is reported
with its line number exactly like a JSONL task's (actors/data.py): `on_bad_line="skip"` drops it with one
warning naming the lines, `"reject"` raises `DataError` listing them.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Callable

from actors.data import BAD_LINE_POLICIES, read_jsonl
from protocol.registry import check

CHOICES = {"a": 0, "b": 1, 0: 0, 1: 1}
"""Accepted values of a file's `choice` field -> 0 (A preferred) or 1 (B preferred)."""


class LabelBudgetExhausted(RuntimeError):
    """A query was asked after the label budget was spent."""


class Unanswerable(KeyError):
    """The file rater holds no recorded choice for this (prompt, response, response)."""


class LabelCounter:
    """Labels asked for so far and the budget (None: unlimited). `spend` refuses to go past the budget."""

    def __init__(self, budget: int | None = None):
        self.budget, self.used = budget, 0

    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    def spend(self, n: int = 1) -> None:
        if self.budget is not None and self.used + n > self.budget:
            raise LabelBudgetExhausted(f"{self.used} of {self.budget} labels used; {n} more asked for")
        self.used += n


# ---- how a task's prompts and responses read as text (the file rater's keys) ------------------------------
@dataclass
class TextCodec:
    """prompt_text(prompt_ids), response_text(continuation_ids) and known_prompt(text) for one task."""
    prompt_text: Callable[[list[int]], str]
    response_text: Callable[[list[int]], str]
    known_prompt: Callable[[str], bool]


def task_codec(task) -> TextCodec:
    """Chain: the prompt is its digit string (its root id, e.g. "3071"), a response its digits up to <eos>
    ("3707"); text tasks: the example's prompt text and the decoded completion."""
    if getattr(task, "name", None) == "chain":
        from actors.tasks.chain import DIGIT0, EOS

        def response_text(ids):
            out = []
            for t in ids:
                if t == EOS:
                    break
                out.append(str(t - DIGIT0) if 0 <= t - DIGIT0 < 10 else "?")
            return "".join(out)

        def known(text: str) -> bool:
            return len(text) == task.prompt_len and all(c.isdigit() and int(c) < task.modulus for c in text)

        return TextCodec(lambda p: task.root_id(task.digits_of(p)), response_text, known)
    prompts = {e.prompt for e in task.train_examples + task.heldout_prompts()}
    return TextCodec(lambda p: task.example_of(p).prompt, task.decode, prompts.__contains__)


def gold_score(task) -> Callable[[list[int], list[int]], float]:
    """The simulated rater's gold g(prompt_ids, continuation_ids): chain = number of the H answer positions that
    hold the true running sum (0..H); any other task = its verifier reward."""
    if getattr(task, "name", None) == "chain":
        def correct_steps(prompt_ids, cont):
            target = task.answer_ids(task.digits_of(prompt_ids))[: task.horizon]
            return float(sum(a == b for a, b in zip(cont[: task.horizon], target)))

        return correct_steps
    return task.reward


# ---- raters ----------------------------------------------------------------------------------------------
class SimulatedRater:
    """Bradley-Terry on a gold score: choose A with probability sigmoid((g(A) - g(B)) / temperature).

    Draws come from one seeded stream, so a run's choices are a function of (seed, the queries in order);
    `state_dict` / `load_state_dict` carry the stream and the label count through a checkpoint."""

    name = "simulated"

    def __init__(self, gold: Callable[[list[int], list[int]], float], *, temperature: float = 1.0, seed: int = 0,
                 budget: int | None = None):
        if not temperature > 0:
            raise ValueError(f"simulated rater: temperature={temperature} must be > 0")
        self.gold, self.temperature = gold, temperature
        self.rng = random.Random(f"rater:{seed}")
        self.labels = LabelCounter(budget)

    def prob_a(self, prompt_ids, a, b) -> float:
        """p(A > B) = sigmoid((g(A) - g(B)) / temperature)."""
        z = (self.gold(prompt_ids, a) - self.gold(prompt_ids, b)) / self.temperature
        return 1.0 / (1.0 + math.exp(-z))

    def ask(self, prompt_ids, a, b) -> int:
        """One label: 0 if A is preferred, 1 if B."""
        self.labels.spend()
        return 0 if self.rng.random() < self.prob_a(prompt_ids, a, b) else 1

    def state_dict(self) -> dict:
        return {"labels_used": self.labels.used, "rng": repr(self.rng.getstate())}

    def load_state_dict(self, state: dict) -> None:
        import ast

        self.labels.used = int(state["labels_used"])
        self.rng.setstate(ast.literal_eval(state["rng"]))


@dataclass(frozen=True)
class RecordedChoice:
    prompt: str
    response_a: str
    response_b: str
    choice: int
    """0: response_a preferred, 1: response_b preferred."""
    line: int
    """Line number in the file (1-based)."""


def parse_preference_line(line: str, known_prompt: Callable[[str], bool]) -> RecordedChoice:
    """One JSONL line -> RecordedChoice (line number 0, set by the caller); ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "response_a", "response_b"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f"missing or empty string field {key!r}")
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"field {key!r} is not valid UTF-8 (a lone surrogate escape)") from None
    choice = obj.get("choice")
    if isinstance(choice, str):
        choice = choice.strip().lower()
    if isinstance(choice, bool) or choice not in CHOICES:
        if choice in ("tie", "equal", "none", 0.5) or choice is None and "choice" in obj:
            raise ValueError(f"a tie (choice {obj.get('choice')!r}): a choice must prefer one response; drop the line")
        raise ValueError(f"field 'choice' is {obj.get('choice')!r}; use \"a\" or \"b\" (or 0 / 1)")
    if obj["response_a"] == obj["response_b"]:
        raise ValueError("a tie: response_a and response_b are the same text")
    if not known_prompt(obj["prompt"]):
        raise ValueError(f"unknown prompt {obj['prompt'][:40]!r}: not a prompt of the task")
    return RecordedChoice(obj["prompt"], obj["response_a"], obj["response_b"], CHOICES[choice], 0)


def load_preferences(path: str, known_prompt: Callable[[str], bool], on_bad_line: str = "skip") -> list[RecordedChoice]:
    """The recorded choices of a JSONL file, in file order; bad lines skipped (one warning) or rejected."""
    check("bad-line policy", BAD_LINE_POLICIES, on_bad_line)
    lines = read_jsonl(path, lambda line: parse_preference_line(line, known_prompt), what="preference file",
                       items="preference lines", on_bad_line=on_bad_line, setting="preference.on_bad_line")
    return [RecordedChoice(r.prompt, r.response_a, r.response_b, r.choice, lineno) for lineno, r in lines]


class FileRater:
    """Recorded choices (a user's human preference data). `ask` answers a pair it holds, in either order, and
    raises Unanswerable for any other; `records` is the whole file (what an offline reward model trains on)."""

    name = "file"

    def __init__(self, path: str, codec: TextCodec, *, on_bad_line: str = "skip", budget: int | None = None):
        self.codec = codec
        self.records = load_preferences(path, codec.known_prompt, on_bad_line)
        self._choice = {}
        for r in self.records:  # a pair recorded twice: the later line wins
            self._choice[(r.prompt, r.response_a, r.response_b)] = r.choice
            self._choice[(r.prompt, r.response_b, r.response_a)] = 1 - r.choice
        self.labels = LabelCounter(budget)

    def has(self, prompt_ids, a, b) -> bool:
        c = self.codec
        return (c.prompt_text(prompt_ids), c.response_text(a), c.response_text(b)) in self._choice

    def ask(self, prompt_ids, a, b) -> int:
        c = self.codec
        key = (c.prompt_text(prompt_ids), c.response_text(a), c.response_text(b))
        if key not in self._choice:
            raise Unanswerable(f"no recorded choice for prompt {key[0][:40]!r} and responses {key[1][:30]!r} / {key[2][:30]!r}")
        self.labels.spend()
        return self._choice[key]

    def state_dict(self) -> dict:
        return {"labels_used": self.labels.used}

    def load_state_dict(self, state: dict) -> None:
        self.labels.used = int(state["labels_used"])


def _simulated(cfg, task, seed: int):
    return SimulatedRater(gold_score(task), temperature=cfg.rater_temperature, seed=seed, budget=cfg.max_labels)


def _file(cfg, task, seed: int):
    if not cfg.rater_path:
        raise ValueError("preference.rater=file needs preference.rater_path: a JSONL file of "
                         '{"prompt", "response_a", "response_b", "choice"} lines')
    return FileRater(cfg.rater_path, task_codec(task), on_bad_line=cfg.on_bad_line, budget=cfg.max_labels)


RATERS: dict[str, Callable] = {"simulated": _simulated, "file": _file}
"""Rater builders by name: f(preference_cfg, task, seed) -> rater (`preference.rater`)."""
RATER_NAMES = tuple(RATERS)


def make_rater(cfg, task, seed: int = 0):
    """The rater named by `cfg.rater` (a PreferenceConfig: rater, rater_temperature, rater_path, on_bad_line,
    max_labels)."""
    return RATERS[check("rater", RATERS, cfg.rater)](cfg, task, seed)
