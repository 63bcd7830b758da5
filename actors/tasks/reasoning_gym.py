"""Reasoning-gym problems as text-task examples (`task.name=reasoning_gym`).

Items come from `reasoning_gym.create_dataset(task.generator, size=task.num_examples, seed=task.seed,
**task.generator_options)`: each has a `question`, an `answer` string and `metadata`. An example's prompt is
the question plus `INSTRUCTION` (ask for a closing "The answer is N.", which the `reasoning` verifier reads);
its reference answer is the item's answer. Identical questions are kept once; with a number-comparing
verifier, items whose answer holds no number are dropped (all of them dropped is an error). `TextTask`
applies the chat template and holds out a fifth of the examples by a hash of the prompt text.

    make_examples("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}, size=5000, seed=0)

`example_of_item` and `dedupe` are pure (plain dicts in, `Example`s out); only `make_examples` imports
reasoning_gym.
"""
from __future__ import annotations

import logging

from actors.data import Example, example_id
from actors.verifiers import has_reference_number

log = logging.getLogger(__name__)

# Greedy SmolLM2-135M-Instruct ends with "The answer is N." on 32 of 32 chain_sum and 13 of 16 gsm_symbolic prompts
# with this; asked for a "#### N" line instead it wrote one on 0 of 16 of each (docs/TASKS.md).
INSTRUCTION = "End your response with 'The answer is N.' where N is the number."
_SUGGESTED = ("chain_sum", "gsm_symbolic", "basic_arithmetic", "decimal_chain_sum", "leg_counting", "gcd", "lcm")


def example_of_item(item: dict, instruction: str = INSTRUCTION) -> Example:
    """One reasoning-gym item (`question`, `answer`) as an Example; the prompt is the question + the instruction."""
    question, answer = str(item["question"]).strip(), str(item["answer"]).strip()
    prompt = f"{question}\n{instruction}" if instruction else question
    return Example(id=example_id(prompt), prompt=prompt, answer=answer)


def dedupe(examples: list[Example]) -> list[Example]:
    """First occurrence of each prompt text, in order."""
    seen, out = set(), []
    for ex in examples:
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def keep_numeric(examples: list[Example], where: str) -> list[Example]:
    """Examples whose reference answer holds a number. ValueError when under half of them do: then the answers are
    not numbers (a digit inside a word list is no answer a number-comparing verifier can check)."""
    kept = [e for e in examples if has_reference_number(e.answer)]
    if 2 * len(kept) < len(examples) or not kept:
        sample = next((e.answer for e in examples if not has_reference_number(e.answer)), "")[:40]
        raise ValueError(f"{where}: only {len(kept)} of the {len(examples)} answers hold a number (e.g. {sample!r}); "
                         "choose a generator with numeric answers or task.verifier=exact")
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d items whose answer holds no number", where, len(examples) - len(kept),
                    len(examples))
    return kept


def generator_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_generator(name) -> None:
    """ValueError (one line, a few valid names) unless `name` is a registered reasoning-gym dataset."""
    if not name:
        raise ValueError("task.name=reasoning_gym needs task.generator, a reasoning_gym dataset name "
                         f"(e.g. {', '.join(_SUGGESTED[:3])})")
    names = generator_names()
    if name not in names:
        close = [n for n in names if str(name).lower() in n or n in str(name).lower()][:5]
        hint = ", ".join(close or [n for n in _SUGGESTED if n in names])
        raise ValueError(f"task.generator={name!r} is not a reasoning_gym dataset; e.g. {hint} ({len(names)} in all, "
                         "reasoning_gym.factory.DATASETS)")


def make_examples(generator: str, options: dict | None, *, size: int, seed: int, numeric: bool = True,
                  instruction: str = INSTRUCTION) -> list[Example]:
    """`size` items of a reasoning-gym generator as Examples (deduplicated; numeric answers only if `numeric`)."""
    import reasoning_gym

    check_generator(generator)
    options = dict(options or {})
    try:
        data = reasoning_gym.create_dataset(generator, size=size, seed=seed, **options)
        items = [data[i] for i in range(len(data))]
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"reasoning_gym generator {generator!r} rejected task.generator_options={options}: {why}") from None
    examples = dedupe([example_of_item(it, instruction) for it in items])
    if len(examples) < len(items):
        log.info("reasoning_gym %s: %d of %d questions were repeats (kept once)", generator, len(items) - len(examples),
                 len(items))
    return keep_numeric(examples, f"reasoning_gym {generator!r}") if numeric else examples
