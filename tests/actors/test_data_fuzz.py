"""Fuzzing of JSONL dataset lines: every line is an Example a verifier can score, or a one-line reason."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from actors.data import DataError, Example, load_jsonl, parse_line
from actors.verifiers import reference_number

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)
field = st.one_of(json_values, st.sampled_from(["", " ", "\t\n", "7", "#### 12", "\ud800", "a\u2028b", "NaN", "1e400"]))
objects = st.dictionaries(st.sampled_from(["prompt", "answer", "id", "extra"]), field, max_size=4)
lines = st.one_of(objects.map(lambda o: json.dumps(o, allow_nan=True)), json_values.map(lambda v: json.dumps(v, allow_nan=True)),
                  st.text(max_size=40), st.sampled_from(['{"prompt": "p", "answer": NaN}', '{"prompt": "p", "answer": 1e999}',
                                                         '{"prompt": "p", "answer": "x", "id": [1]}', '{"prompt": "\\ud800", "answer": 1}',
                                                         '{"prompt": "p", "answer": 1, "prompt": 2}', '[]', 'null', '{', '']))


def check_example(ex: Example, line: str | None = None) -> None:
    """What every accepted line must give: text a tokenizer and a verifier can take, and a stable string id;
    a number answer is finite (the string "NaN" is text, a verifier such as `exact` may want it)."""
    assert isinstance(ex.prompt, str) and ex.prompt.strip() and isinstance(ex.answer, str) and ex.answer.strip()
    assert isinstance(ex.id, str) and ex.id
    for text in (ex.prompt, ex.answer, ex.id):
        text.encode("utf-8")  # no lone surrogates: tokenizers and the JSON writer of summaries need UTF-8
    if line is not None and isinstance(json.loads(line).get("answer"), float):
        assert math.isfinite(float(ex.answer)), line


@FUZZ
@given(lines)
def test_fuzz_parse_line_accepts_valid_or_names_the_problem(line):
    try:
        ex = parse_line(line)
    except ValueError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))
        return
    check_example(ex, line)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=8), st.sampled_from(["skip", "reject"]))
def test_fuzz_jsonl_file_one_line_error_with_line_numbers(tmp_path_factory, file_lines, policy):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("\n".join(file_lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        examples = load_jsonl(str(path), policy)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg, repr(msg)
        return
    assert examples
    for ex in examples:
        check_example(ex)


@pytest.mark.parametrize("line,why", [
    ('{"prompt": "p", "answer": NaN}', "not a finite number"),
    ('{"prompt": "p", "answer": Infinity}', "not a finite number"),
    ('{"prompt": "p", "answer": "x", "id": {"a": 1}}', "'id' must be a string or an integer"),
    ('{"prompt": "\\ud800 x", "answer": "1"}', "not valid UTF-8"),
])
def test_fuzz_found_lines_rejected(line, why):
    with pytest.raises(ValueError, match=why):
        parse_line(line)


def test_numeric_answers_keep_their_value():
    """A number answer is written back exactly (no float repr surprises for the numeric verifier)."""
    for raw in ("12", "-3.5", "1e3", "0.1"):
        ex = parse_line('{"prompt": "p", "answer": %s}' % raw)
        assert math.isclose(float(reference_number(ex.answer)), float(raw))
