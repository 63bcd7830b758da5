"""The reward-model worker on its DeepSpeed engine (in-process): learns choices, checkpoint round trip."""
import random

import pytest

from launch.config import PreferenceConfig


def _pairs(n, seed=0):
    """Sequences over tokens 3..14; the rater prefers the one with more 7s (a rule the backbone can read)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = [1] + [rng.choice([7, 8, 9]) for _ in range(5)]
        b = [1] + [rng.choice([7, 8, 9]) for _ in range(5)]
        if a.count(7) == b.count(7):
            continue
        out.append((a, b, 0 if a.count(7) > b.count(7) else 1))
    return out


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from learner.rm_worker import RewardModelClient

    cfg = PreferenceConfig(lr=3e-3, batch_size=32, ensemble_size=4, head_hidden=16)
    return RewardModelClient(model_dir=tiny_model_dir, pref_cfg=cfg, seed=0, local=True)


def test_worker_learns_the_choices_and_priors_stay_frozen(worker):
    import torch

    m = worker.local.model
    priors = [p.clone() for p in m.priors.parameters()]
    train, held = _pairs(200, seed=0), _pairs(100, seed=1)
    assert worker.add(train) == len(train)
    first = worker.train(1)
    last = worker.train(150)
    assert last["rm/loss"] < first["rm/loss"] and last["rm/updates"] == 151
    point, particles = worker.score([s for a, b, _ in held for s in (a, b)])
    assert len(particles[0]) == 4
    correct = [(point[2 * i] > point[2 * i + 1]) == (c == 0) for i, (_, _, c) in enumerate(held)]
    assert sum(correct) / len(correct) > 0.8  # held-out choices
    assert all(torch.equal(a, b) for a, b in zip(priors, m.priors.parameters()))


def test_checkpoint_round_trip_restores_weights_choices_and_rng(worker, tmp_path, tiny_model_dir):
    from learner.rm_worker import RewardModelClient

    worker.add(_pairs(10, seed=2))
    worker.save(str(tmp_path))
    seqs = [a for a, _, _ in _pairs(20, seed=3)]
    before = worker.score(seqs)
    after_one = worker.train(1)["rm/loss"]
    other = RewardModelClient(model_dir=tiny_model_dir, pref_cfg=PreferenceConfig(lr=3e-3, batch_size=32, ensemble_size=4,
                              head_hidden=16), seed=5, local=True)
    assert other.score(seqs) != before
    assert other.load(str(tmp_path)) == len(worker.local.pairs)
    assert other.score(seqs)[0] == pytest.approx(before[0], abs=1e-6)
    assert other.train(1)["rm/loss"] == pytest.approx(after_one, rel=1e-5)  # same minibatch, same optimizer state
