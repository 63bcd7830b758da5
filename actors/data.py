"""Prompt data from JSONL files. Pure Python.

One example per line: `{"prompt": "...", "answer": "..."}` (the answer may be
a number; an optional `"id"` names the example). Blank lines are ignored.
A malformed line (not JSON, not an object, missing or non-string `prompt`,
missing `answer`, a non-finite number as answer, an `id` that is not a string or integer, text that is not
valid UTF-8) is reported with its line number; `on_bad_line="skip"`
drops it with a warning, `"reject"` raises `DataError` listing every bad line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)
BAD_LINE_POLICIES = ("skip", "reject")
_SHOWN = 10  # bad lines spelled out in a message; the rest are counted


@dataclass(frozen=True)
class Example:
    """One text prompt with its reference answer. `id` is stable (given, or a hash of the prompt)."""
    id: str
    prompt: str
    answer: str


class DataError(ValueError):
    """Unusable prompt data; the message names the file and the bad line numbers."""


def example_id(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()


def parse_line(line: str) -> Example:
    """One JSONL line -> Example; raises ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty string field 'prompt'")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise ValueError("missing field 'answer' (a string or a number)")
    if isinstance(answer, float) and not math.isfinite(answer):  # json reads NaN, Infinity and 1e999 as floats
        raise ValueError(f"field 'answer' is {answer}, not a finite number")
    ex_id = obj.get("id")
    if ex_id is not None and (isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)) or str(ex_id).strip() == ""):
        raise ValueError("field 'id' must be a string or an integer when given")
    for name, text in (("prompt", prompt), ("answer", str(answer)), ("id", str(ex_id or ""))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as \ud800
            raise ValueError(f"field {name!r} is not valid UTF-8 (a lone surrogate escape)") from None
    return Example(id=str(ex_id) if ex_id is not None else example_id(prompt), prompt=prompt, answer=str(answer))


def read_jsonl(path: str, parse, *, what: str, items: str, on_bad_line: str, setting: str) -> list[tuple[int, object]]:
    """(line number, parse(line)) for every non-blank line of a JSONL file, in file order.

    A line whose `parse` raises ValueError is malformed: all of them are reported in one message naming the line
    numbers and reasons, then skipped (one warning) or, with on_bad_line="reject", the whole file is refused
    (DataError naming `setting`, the config field that chooses). An unreadable file or one with no usable line is a
    DataError; `what` names the file's kind and `items` its records in the messages ("prompt file", "examples")."""
    if on_bad_line not in BAD_LINE_POLICIES:
        raise ValueError(f"on_bad_line={on_bad_line!r}; choose one of {', '.join(BAD_LINE_POLICIES)}")
    records, bad = [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {what} {path!r}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, parse(line)))
            except ValueError as e:
                bad.append((lineno, str(e)))
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        msg = f"{path}: {len(bad)} malformed line(s): {shown}{more}"
        if on_bad_line == "reject":
            raise DataError(msg + f" (set {setting}=skip to drop them)")
        log.warning("%s; skipped", msg)
    if not records:
        raise DataError(f"{path}: no usable {items}")
    return records


def load_jsonl(path: str, on_bad_line: str = "skip") -> list[Example]:
    """Examples of a JSONL file, in file order; bad lines skipped (with a warning) or rejected."""
    return [ex for _, ex in read_jsonl(path, parse_line, what="prompt file", items="examples", on_bad_line=on_bad_line,
                                        setting="task.on_bad_line")]
