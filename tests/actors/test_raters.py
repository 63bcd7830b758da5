"""Raters: Bradley-Terry draws on a gold score, recorded choices from a file, the label count, the registry."""
import json
import math
from types import SimpleNamespace

import pytest

from actors.data import DataError
from actors.raters import (RATER_NAMES, FileRater, LabelBudgetExhausted, LabelCounter, SimulatedRater, Unanswerable,
                           gold_score, load_preferences, make_rater, task_codec)
from actors.tasks import DIGIT0, EOS, ChainTask


def _cfg(**kw):
    base = dict(rater="simulated", rater_temperature=1.0, rater_path=None, on_bad_line="skip", max_labels=None)
    return SimpleNamespace(**{**base, **kw})


def test_simulated_rater_matches_bradley_terry_frequencies():
    gold = lambda p, y: float(y[0])  # noqa: E731 - the response's first token is its score
    r = SimulatedRater(gold, temperature=2.0, seed=3)
    n = 4000
    picks_a = sum(r.ask([0], [3], [1]) == 0 for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-(3 - 1) / 2.0))
    assert r.prob_a([0], [3], [1]) == pytest.approx(expected)
    assert abs(picks_a - expected) < 0.03
    assert r.labels.used == n


def test_simulated_rater_is_seeded_and_resumes():
    gold = lambda p, y: float(y[0])  # noqa: E731
    a, b = SimulatedRater(gold, seed=1), SimulatedRater(gold, seed=1)
    first = [a.ask([0], [1], [1]) for _ in range(20)]
    assert first == [b.ask([0], [1], [1]) for _ in range(20)]
    assert len(set(first)) == 2  # p = 1/2: both answers occur
    state = a.state_dict()
    rest = [a.ask([0], [1], [1]) for _ in range(20)]
    c = SimulatedRater(gold, seed=99)
    c.load_state_dict(state)
    assert [c.ask([0], [1], [1]) for _ in range(20)] == rest
    assert c.labels.used == 40


def test_label_budget_is_enforced():
    counter = LabelCounter(budget=2)
    counter.spend(2)
    assert counter.remaining() == 0
    with pytest.raises(LabelBudgetExhausted):
        counter.spend()
    r = SimulatedRater(lambda p, y: 0.0, budget=1)
    r.ask([0], [1], [2])
    with pytest.raises(LabelBudgetExhausted):
        r.ask([0], [1], [2])


def test_chain_gold_counts_correct_steps():
    task = ChainTask(horizon=4)
    digits = (1, 2, 3, 4)
    right = task.answer_ids(digits)  # running sums 1 3 6 0, then <eos>
    gold = gold_score(task)
    p = task.prompt_ids(digits)
    assert gold(p, right) == 4.0
    assert gold(p, right[:2] + [DIGIT0 + 9, right[3], EOS]) == 3.0
    assert gold(p, [DIGIT0 + 9] * 4 + [EOS]) == 0.0
    assert gold(p, right[:1]) == 1.0  # a short answer scores what it got right


def _write(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_file_rater_reports_bad_lines_by_number(tmp_path, caplog):
    task = ChainTask(horizon=4)
    codec = task_codec(task)
    path = _write(tmp_path, [
        {"prompt": "1234", "response_a": "1360", "response_b": "1361", "choice": "a"},  # 1 ok
        "not json",  # 2
        {"prompt": "1234", "response_a": "1360", "response_b": "1361", "choice": "tie"},  # 3 tie
        {"prompt": "99", "response_a": "1360", "response_b": "1361", "choice": "b"},  # 4 unknown prompt
        {"prompt": "1234", "response_a": "1360", "response_b": "1360", "choice": 0},  # 5 same text: a tie
        "",  # blank: ignored
        {"prompt": "1234", "response_b": "1361", "choice": 1},  # 7 missing field
        {"prompt": "5555", "response_a": "5050", "response_b": "5051", "choice": 1},  # 8 ok
    ])
    with pytest.raises(DataError) as e:
        load_preferences(path, codec.known_prompt, "reject")
    msg = str(e.value)
    assert "5 malformed line(s)" in msg
    for n in (2, 3, 4, 5, 7):
        assert f"line {n}:" in msg
    assert "line 1:" not in msg and "line 8:" not in msg
    assert "tie" in msg and "unknown prompt" in msg and "preference.on_bad_line=skip" in msg
    with caplog.at_level("WARNING"):
        records = load_preferences(path, codec.known_prompt, "skip")
    assert [r.line for r in records] == [1, 8]
    assert "line 3:" in caplog.text


def test_file_rater_answers_recorded_pairs_in_either_order(tmp_path):
    task = ChainTask(horizon=4)
    path = _write(tmp_path, [{"prompt": "1234", "response_a": "1360", "response_b": "1361", "choice": "b"}])
    r = FileRater(path, task_codec(task))
    p = task.prompt_ids((1, 2, 3, 4))
    a = [DIGIT0 + d for d in (1, 3, 6, 0)] + [EOS]
    b = [DIGIT0 + d for d in (1, 3, 6, 1)] + [EOS]
    assert r.ask(p, a, b) == 1 and r.ask(p, b, a) == 0
    with pytest.raises(Unanswerable):
        r.ask(p, a, [DIGIT0] * 4 + [EOS])
    assert r.labels.used == 2  # an unanswerable query costs nothing


def test_registry_names_and_unknown_rater():
    assert set(RATER_NAMES) == {"simulated", "file"}
    task = ChainTask(horizon=4)
    assert isinstance(make_rater(_cfg(), task), SimulatedRater)
    with pytest.raises(ValueError, match="unknown rater 'human'; choose one of simulated, file"):
        make_rater(_cfg(rater="human"), task)
    with pytest.raises(ValueError, match="rater_path"):
        make_rater(_cfg(rater="file"), task)
