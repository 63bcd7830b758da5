"""Synthetic multi-step arithmetic word problems with a numeric answer. Pure Python.

Each problem starts from a quantity and applies H operations (add, take away,
multiply by a group count, share equally), every one depending on the result
before it; the answer is the final quantity. Intermediate values stay
non-negative integers and divisions are exact. The reference answer is a
worked solution ending in `#### <answer>`, so both the `numeric` and the
`gsm8k` verifier apply.

    make_problem(random.Random(0), steps=3).prompt
    # e.g. 'Ava has 7 marbles. She finds 5 more marbles. Then she ... How many marbles does Ava have now?'
"""
from __future__ import annotations

import random

from actors.data import Example, example_id

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Maya", "Noor"]
PRONOUN = {n: ("She" if n in {"Ava", "Chloe", "Emma", "Grace", "Ines", "Kemi", "Maya", "Noor"} else "He") for n in NAMES}
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "beads"]


def _step(rng: random.Random, value: int, item: str, he: str) -> tuple[int, str, str]:
    """(new value, sentence, worked line) of one operation applied to `value`."""
    ops = ["add", "add", "mul"] + (["sub"] if value > 1 else []) + (["div"] if value >= 4 else [])
    op = rng.choice(ops)
    if op == "add":
        k = rng.randint(2, 20)
        return value + k, f"{he} finds {k} more {item}.", f"{value} + {k} = {value + k}"
    if op == "sub":
        k = rng.randint(1, min(value - 1, 20))
        return value - k, f"{he} gives {k} {item} to a friend.", f"{value} - {k} = {value - k}"
    if op == "mul":
        k = rng.randint(2, 4 if value <= 50 else 2)
        return value * k, f"{he} ends up with {k} times as many {item} as before.", f"{value} * {k} = {value * k}"
    divisors = [k for k in range(2, 6) if value % k == 0]
    if not divisors:
        k = rng.randint(2, 20)
        return value + k, f"{he} finds {k} more {item}.", f"{value} + {k} = {value + k}"
    k = rng.choice(divisors)
    return value // k, f"{he} splits the {item} into {k} equal piles and keeps one pile.", f"{value} / {k} = {value // k}"


def make_problem(rng: random.Random, steps: int) -> Example:
    """One word problem with `steps` dependent operations; the answer is a worked solution ending in `#### N`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    he = PRONOUN[name]
    value = rng.randint(2, 20)
    sentences, work = [f"{name} has {value} {item}."], []
    for i in range(steps):
        value, sentence, line = _step(rng, value, item, he)
        sentences.append(("Then " + sentence[0].lower() + sentence[1:]) if i else sentence)
        work.append(line)
    prompt = " ".join(sentences) + f" How many {item} does {name} have now?"
    return Example(id=example_id(prompt), prompt=prompt, answer="\n".join(work) + f"\n#### {value}")


def make_problems(n: int, steps: int, seed: int) -> list[Example]:
    """n distinct problems (by prompt text), deterministic in (n, steps, seed)."""
    rng = random.Random(f"arithmetic:{steps}:{seed}")
    out, seen = [], set()
    for _ in range(50 * n):
        ex = make_problem(rng, steps)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                break
    return out
