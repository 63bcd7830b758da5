"""Outcome verifiers for text tasks: `verifier(completion, answer) -> reward in [0, 1]`. Pure Python.

`completion` is the decoded model output, `answer` the reference answer
string of the example (for GSM8K data, the full reference solution ending in
`#### <answer>` also works). Verifiers are chosen by name from `VERIFIERS`:

    chain     the first H whitespace-separated symbols equal the answer's H symbols
    numeric   the last number in the completion equals the answer's number
    gsm8k     the completion contains `#### <number>` equal to the answer's number
    reasoning the completion's final answer equals the answer's number: its last `#### N`, else its last
              `\boxed{N}`, else its last "answer is N" / "answer: N", else its last number
    exact     the stripped completion equals the stripped answer

or by import path `package.module:function` for a user verifier with the same
signature. NOTE: an import path imports and runs that module's code in every
process that scores samples (the driver and each rollout actor); use only
modules you trust.

A verifier may raise on inputs it cannot handle; the task catches it, gives
that sample reward 0 and counts the error (see `actors.tasks.TextTask`).
"""
from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Callable

Verifier = Callable[[str, str], float]

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")
_GSM8K = re.compile(r"####\s*([^\n]*)")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def parse_number(text: str) -> Fraction | None:
    """The number written in `text` ('1,234', '-3.5', '$12', '7/2', '12.'), exactly, or None."""
    m = _NUMBER.search(text.strip())
    if m is None:
        return None
    s = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number in `text`, or None when there is none."""
    found = list(_NUMBER.finditer(text))
    return parse_number(found[-1].group(0)) if found else None


def reference_number(answer: str) -> Fraction:
    """The reference answer's number: after `####` when present (GSM8K solutions), else the last number.

    Raises ValueError when the reference has no number (a data error, not a model error).
    """
    m = _GSM8K.search(answer)
    value = parse_number(m.group(1)) if m else last_number(answer)
    if value is None:
        raise ValueError(f"reference answer {answer[:80]!r} contains no number")
    return value


def chain(completion: str, answer: str) -> float:
    """1.0 iff the first H symbols of the completion are the answer's H symbols (H = len(answer.split()))."""
    want = answer.split()
    if not want:
        raise ValueError("chain verifier: empty reference answer")
    return float(completion.split()[: len(want)] == want)


def numeric(completion: str, answer: str) -> float:
    """1.0 iff the last number in the completion equals the reference number (exactly, as a fraction)."""
    got = last_number(completion)
    return float(got is not None and got == reference_number(answer))


def gsm8k(completion: str, answer: str) -> float:
    """1.0 iff the completion's first `#### <number>` equals the reference number; no `####` scores 0."""
    m = _GSM8K.search(completion)
    if m is None:
        return 0.0
    got = parse_number(m.group(1))
    return float(got is not None and got == reference_number(answer))


_MARKED = [  # final-answer markers of the `reasoning` verifier, strongest first; the last occurrence of each counts
    re.compile(r"####[ \t]*([^\n]*)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"answer\s*(?:is|:|=)[ \t]*:?([^\n]*)", re.IGNORECASE),
]


def final_answer(completion: str) -> Fraction | None:
    """The number a free-form solution gives as its final answer, or None. Never raises.

    The last `#### N`; else the last `\\boxed{N}`; else the last "answer is N" / "answer: N" (the first number
    after the marker, on its line); else the last number anywhere. A marker with no number after it is skipped.
    """
    text = completion.replace("\u2212", "-")  # unicode minus
    for pattern in _MARKED:
        for m in reversed(list(pattern.finditer(text))):
            value = parse_number(m.group(1).replace("**", ""))
            if value is not None:
                return value
    return last_number(text)


def reasoning(completion: str, answer: str) -> float:
    """1.0 iff the completion's final answer (see `final_answer`) equals the reference number, exactly."""
    got = final_answer(completion)
    return float(got is not None and got == reference_number(answer))


def has_reference_number(answer: str) -> bool:
    """Whether a number-comparing verifier can read this reference answer."""
    try:
        reference_number(answer)
        return True
    except ValueError:
        return False


def exact(completion: str, answer: str) -> float:
    """1.0 iff the completion equals the answer after stripping surrounding whitespace."""
    return float(completion.strip() == answer.strip())


VERIFIERS: dict[str, Verifier] = {"chain": chain, "numeric": numeric, "gsm8k": gsm8k, "reasoning": reasoning,
                                   "exact": exact}
NUMERIC_VERIFIERS = ("numeric", "gsm8k", "reasoning")  # compare numbers: every reference answer needs one


class VerifierNotFound(ValueError):
    """A verifier name or import path that does not resolve; the message names it."""


def get_verifier(spec: str) -> Verifier:
    """A verifier by registry name, or by import path `module:function` (imports and runs that module)."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise VerifierNotFound(f"unknown verifier {spec!r}; choose one of {', '.join(VERIFIERS)} "
                               "or give an import path module:function")
    module_name, _, attr = spec.partition(":")
    if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(attr)):
        raise VerifierNotFound(f"verifier import path {spec!r} must be of the form module:function "
                               "(dotted Python names, e.g. my_project.rewards:judge; no relative imports)")
    try:  # runs the module's top-level code (documented: use only modules you trust)
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - an ImportError, or whatever the module's own code raised
        why = (str(e).strip().splitlines() or [""])[0]
        raise VerifierNotFound(f"verifier {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {why})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise VerifierNotFound(f"verifier {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise VerifierNotFound(f"verifier {spec!r}: {attr!r} is not callable")
    return fn


def check_reward(value, spec: str) -> float:
    """A verifier's return value as a float in [0, 1]; anything else is a verifier error (raises)."""
    r = float(value)
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"verifier {spec!r} returned {value!r}, not a reward in [0, 1]")
    return r
