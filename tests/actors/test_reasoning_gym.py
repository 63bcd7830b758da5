"""The `reasoning` verifier and the reasoning-gym example builder, on plain data (no model)."""
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from actors.data import Example
from actors.tasks.reasoning_gym import (INSTRUCTION, check_generator, dedupe, example_of_item, keep_numeric,
                                        make_examples)
from actors.tasks.text import TextTask
from actors.verifiers import VERIFIERS, final_answer, reasoning

CHAIN3 = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}


@pytest.mark.parametrize("text,value", [
    ("12 + 7 = 19\n#### 19", 19),
    ("#### 5\nwait, no\n#### 6", 6),                       # the last marked answer counts
    ("#### N\nThe answer is 40.75", Fraction(163, 4)),     # a marker without a number is skipped
    ("so the answer is \\boxed{7/2}.", Fraction(7, 2)),
    ("The answer is -103.", -103),
    ("The final answer is: **1,234**", 1234),
    ("Answer: $12.50", Fraction(25, 2)),
    ("The answer is 19 because 12 + 7 = 19, not 20", 19),  # "answer is" beats the last number
    ("15 - 43 - 75 = -103", -103),                         # no marker: the last number
    ("5 \u2212 8 = \u22123", -3),                              # unicode minus
    ("no number here", None), ("", None), ("####", None), ("the answer is", None), ("1/0", None),
])
def test_final_answer(text, value):
    assert final_answer(text) == value


@pytest.mark.parametrize("completion,answer,reward", [
    ("#### 3.50", "3.5", 1.0), ("The answer is 7/2", "3.5", 1.0), ("#### 1,000", "1000", 1.0),
    ("#### -4", "-4", 1.0), ("#### 4", "-4", 0.0), ("The answer is 3.", "4", 0.0), ("I don't know", "4", 0.0),
    ("#### 28080", "Robert ...\n#### 28080", 1.0),  # a GSM-style worked reference: its #### number
])
def test_reasoning_verifier(completion, answer, reward):
    assert VERIFIERS["reasoning"] is reasoning
    assert reasoning(completion, answer) == reward


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=300), st.sampled_from(["42", "-3", "3.5", "7/2", "1,234", "0"]))
def test_reasoning_never_raises_on_any_completion(completion, answer):
    assert reasoning(completion, answer) in (0.0, 1.0)
    final_answer(completion)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(-10**9, 10**9), st.sampled_from(["#### {}", "The answer is {}.", "x = 3\nso {}", "\\boxed{{{}}}"]),
       st.text(alphabet="abc +=\n", max_size=20))
def test_reasoning_reads_the_marked_number(n, form, noise):
    assert reasoning(noise + "\n" + form.format(n), str(n)) == 1.0
    assert reasoning(noise + "\n" + form.format(n + 1), str(n)) == 0.0


def test_example_of_item_and_dedupe():
    item = {"question": "State the final answer to the following arithmetic problem: 4 - 1 - 7 =", "answer": -4,
            "metadata": {"num_terms": 3}}
    ex = example_of_item(item)
    assert ex.prompt == item["question"] + "\n" + INSTRUCTION and ex.answer == "-4" and ex.id
    assert example_of_item(item, instruction="").prompt == item["question"]
    assert dedupe([ex, example_of_item(dict(item)), example_of_item({**item, "question": "2 + 2 ="})]) == [
        ex, example_of_item({**item, "question": "2 + 2 ="})]


def test_keep_numeric_drops_or_rejects():
    exs = [Example("a", "p1", "12"), Example("b", "p2", "twelve"), Example("c", "p3", "-3.5")]
    assert keep_numeric(exs, "t") == [exs[0], exs[2]]
    with pytest.raises(ValueError, match="only 0 of the 1 answers hold a number"):
        keep_numeric(exs[1:2], "t")
    with pytest.raises(ValueError, match="only 1 of the 3 answers hold a number .*'twelve'"):
        keep_numeric([exs[0], exs[1], exs[1]], "t")


def test_chain_sum_examples_are_distinct_and_split_disjoint():
    exs = make_examples("chain_sum", CHAIN3, size=2000, seed=0)
    assert len({e.prompt for e in exs}) == len(exs) > 1500  # repeats removed, most kept
    assert all(reasoning(f"#### {e.answer}", e.answer) == 1.0 for e in exs)
    assert all(e.prompt.count(" + ") + e.prompt.count(" - ") == 2 for e in exs)  # 3 terms
    task = TextTask(exs, tokenizer=None, verifier="reasoning", heldout_size=128)
    train, held = {e.prompt for e in task.train_examples}, {e.prompt for e in task.heldout_prompts()}
    assert not train & held and len(held) == 128 and len(train) > 1200
    assert make_examples("chain_sum", CHAIN3, size=2000, seed=0) == exs  # deterministic in the seed
    assert make_examples("chain_sum", CHAIN3, size=2000, seed=1) != exs


def test_gsm_symbolic_examples():
    exs = make_examples("gsm_symbolic", {}, size=20, seed=0)
    assert len(exs) == 20 and all(e.answer.lstrip("-").replace(".", "", 1).isdigit() for e in exs)


@pytest.mark.parametrize("generator,options,match", [
    ("nosuch_dataset", {}, "not a reasoning_gym dataset; e.g. chain_sum"),
    ("chain", {}, "e.g. chain_sum"),  # a close name is suggested
    (None, {}, "needs task.generator"),
    ("chain_sum", {"bogus": 1}, "rejected task.generator_options=.*bogus"),
    ("chain_sum", {"min_terms": 5, "max_terms": 2}, "max_terms must be >= min_terms"),
    ("spell_backward", {}, "only 0 of the 10 answers hold a number"),
    ("word_sorting", {}, "of the 10 answers hold a number"),  # a digit inside a list of words is no numeric answer
])
def test_bad_generators_are_named(generator, options, match):
    with pytest.raises(ValueError, match=match):
        make_examples(generator, options, size=10, seed=0)


def test_check_generator_accepts_known():
    check_generator("chain_sum")
    check_generator("gsm_symbolic")
