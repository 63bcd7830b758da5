"""The preferences phase on plain data: a fake reward model, the simulated rater on the chain task's gold score."""
import json
from types import SimpleNamespace

import pytest

from actors.raters import SimulatedRater, gold_score
from actors.tasks import DIGIT0, EOS, ChainTask
from learner.batch import build_train_batch
from learner.rm_phase import PreferencePhase
from protocol.messages import Rollout


class FakeRM:
    """Point reward = the response's first digit; particles disagree on responses starting with 9."""

    def __init__(self):
        self.pairs, self.trained, self.saved = [], 0, None

    def score(self, seqs):
        point = [float(s[6] - DIGIT0) for s in seqs]  # s = <bos> d1..d4 : y1 ...; index 6 = y1
        particles = [[p + (5.0 * (-1) ** k if s[6] == DIGIT0 + 9 else 0.0) for k in range(4)] for p, s in zip(point, seqs)]
        return point, particles

    def add(self, pairs):
        self.pairs += pairs
        return len(self.pairs)

    def train(self, updates):
        self.trained += updates
        return {"rm/loss": 0.5, "rm/pairs": len(self.pairs), "rm/updates": self.trained}

    def save(self, path):
        self.saved = path

    def load(self, path):
        return len(self.pairs)


def _cfg(**kw):
    base = dict(mode="online", query_selection="uncertainty", queries_per_step=16, updates_per_step=2,
                offline_updates=5, warmup_labels=0)
    return SimpleNamespace(**{**base, **kw})


def _rollouts(task, answers_per_prompt):
    out = []
    for g, (digits, answers) in enumerate(answers_per_prompt):
        for ans in answers:
            out.append(Rollout(request_id=g, root_id=task.root_id(digits), prompt_ids=task.prompt_ids(digits),
                               prefix_ids=[], token_ids=[DIGIT0 + a for a in ans] + [EOS], logprobs=[-1.0] * 5,
                               entropy=[0.0] * 5, top1_logprobs=[0.0] * 5, alt_token_ids=[-1] * 5,
                               alt_logprobs=[-1e9] * 5, reward=0.0, policy_version=0, actor_id=0))
    return out


def test_one_query_per_group_labels_counted_and_signal_centred():
    task = ChainTask(horizon=4)
    rater = SimulatedRater(gold_score(task), seed=0, budget=3)
    rm = FakeRM()
    phase = PreferencePhase(rm, rater, _cfg(), seed=0)
    rollouts = _rollouts(task, [((1, 2, 3, 4), [(1, 3, 6, 0), (9, 3, 6, 0), (2, 3, 6, 0)]),
                                ((5, 5, 5, 5), [(5, 0, 5, 0), (4, 0, 5, 0), (9, 9, 9, 9)]),
                                ((0, 0, 0, 1), [(0, 0, 0, 1), (0, 0, 0, 1)])])  # the third: identical responses
    signal, m = phase(rollouts, step=0)
    assert m["rm/new_labels"] == 2 and rater.labels.used == 2 and m["rm/labels_used"] == 2
    # uncertainty: every asked pair holds the response the particles disagree on (first digit 9)
    assert all(DIGIT0 + 9 in (a[6], b[6]) for a, b, _ in rm.pairs)
    assert rm.trained == 2 and m["rm/loss"] == 0.5
    assert m["rm/chosen_pair_variance"] > m["rm/pair_variance_mean"] > 0
    for g in range(3):  # the group mean of the signal is 1/2; its group advantage is p - 1/2 + nudge
        s = [x for x, r in zip(signal, rollouts) if r.request_id == g]
        assert sum(s) / len(s) == pytest.approx(0.5)
    batch = build_train_batch(rollouts, advantage="group", nudge=0.1, rewards=signal)
    assert batch.advantages == pytest.approx([s - 0.5 + 0.1 for s in signal])
    # the budget: one label left, then none; the RM stops training once no new choice arrives
    phase(rollouts, step=1)
    assert rater.labels.used == 3
    trained = rm.trained
    _, m = phase(rollouts, step=2)
    assert rater.labels.used == 3 and rm.trained == trained and "rm/new_labels" not in m


def test_heldout_accuracy_is_measured_before_training():
    task = ChainTask(horizon=4)
    # a decisive rater: the response with more correct steps always wins; the fake RM ranks by the first digit
    rater = SimulatedRater(gold_score(task), temperature=1e-3, seed=0)
    phase = PreferencePhase(FakeRM(), rater, _cfg(query_selection="random"), seed=0)
    # the right answer to 1234 is 1 3 6 0: the RM prefers 2xxx (wrong) over 1360 (right): accuracy 0
    rollouts = _rollouts(task, [((1, 2, 3, 4), [(1, 3, 6, 0), (2, 3, 6, 0)])])
    _, m = phase(rollouts, step=0)
    assert m["rm/heldout_accuracy"] == 0.0


def test_offline_collects_every_label_first_and_then_asks_nothing():
    task = ChainTask(horizon=4)
    rater = SimulatedRater(gold_score(task), seed=0, budget=5)
    rm = FakeRM()
    batch = _rollouts(task, [((1, 2, 3, 4), [(1, 3, 6, 0), (9, 3, 6, 0)]), ((5, 5, 5, 5), [(5, 0, 5, 0), (4, 0, 5, 0)])])
    calls = []
    phase = PreferencePhase(rm, rater, _cfg(mode="offline", query_selection="random"), seed=0,
                            generate_base=lambda: calls.append(1) or batch)
    _, m = phase(batch, step=0)
    assert rater.labels.used == 5 and len(calls) == 3 and rm.trained == 5 and m["rm/offline_batches"] == 3
    phase(batch, step=1)
    assert rater.labels.used == 5 and len(calls) == 3 and rm.trained == 5


def test_online_warmup_asks_its_labels_about_base_batches_then_goes_online():
    task = ChainTask(horizon=4)
    rater = SimulatedRater(gold_score(task), seed=0, budget=10)
    rm = FakeRM()
    base = _rollouts(task, [((1, 2, 3, 4), [(1, 3, 6, 0), (9, 3, 6, 0)]), ((5, 5, 5, 5), [(5, 0, 5, 0), (4, 0, 5, 0)])])
    calls = []
    phase = PreferencePhase(rm, rater, _cfg(warmup_labels=3), seed=0, generate_base=lambda: calls.append(1) or base)
    own = _rollouts(task, [((0, 0, 0, 1), [(0, 0, 0, 1), (9, 0, 0, 1)])])
    _, m = phase(own, step=0)
    # two base batches (2 + 1 labels: the warm-up stops at 3), each followed by updates_per_step = 2 updates,
    # then the step's own query and its 2 updates
    assert len(calls) == 2 and m["rm/warmup_batches"] == 2
    assert rater.labels.used == 4 and m["rm/labels_used"] == 4 and rm.trained == 6
    assert rm.pairs[-1][0][:len(own[0].prompt_ids)] == own[0].prompt_ids  # the last query is the step's own
    phase(own, step=1)
    assert len(calls) == 2 and rater.labels.used == 5  # no second warm-up


def test_save_and_restore_round_trip(tmp_path):
    task = ChainTask(horizon=4)
    rollouts = _rollouts(task, [((1, 2, 3, 4), [(1, 3, 6, 0), (9, 3, 6, 0), (2, 3, 6, 0)])] * 1)
    a = PreferencePhase(FakeRM(), SimulatedRater(gold_score(task), seed=0), _cfg(query_selection="random"), seed=0)
    a(rollouts, 0)
    a.save(str(tmp_path))
    later = [a(rollouts, s)[1]["rm/labels_used"] for s in (1, 2)]
    picks_a = [tuple(map(tuple, p[:2])) for p in a.rm.pairs[1:]]
    b = PreferencePhase(FakeRM(), SimulatedRater(gold_score(task), seed=7), _cfg(query_selection="random"), seed=7)
    b.restore(str(tmp_path))
    assert json.load(open(tmp_path / "phase.json"))["rater"]["labels_used"] == 1
    assert [b(rollouts, s)[1]["rm/labels_used"] for s in (1, 2)] == later
    assert [tuple(map(tuple, p[:2])) for p in b.rm.pairs] == picks_a  # the same queries in the same order
