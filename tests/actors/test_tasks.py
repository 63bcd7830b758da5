import random

from actors.tasks import EOS, ChainTask, digit_token


def test_running_sums_and_reward():
    t = ChainTask(horizon=4)
    digits = (3, 9, 4, 5)
    assert t.running_sums(digits) == [3, 2, 6, 1]
    p = t.prompt_ids(digits)
    right = [digit_token(x) for x in (3, 2, 6, 1)]
    assert t.reward(p, right + [EOS]) == 1.0
    assert t.reward(p, right[:3] + [digit_token(0), EOS]) == 0.0
    assert t.reward(p, right[:2]) == 0.0  # too short
    assert t.reward(p, [EOS] * 5) == 0.0  # malformed


def test_train_and_heldout_are_disjoint():
    t = ChainTask(horizon=4, heldout_size=200)
    held = set(t.heldout_prompts())
    train = set(t.train_prompts(random.Random(0), 2000))
    assert held and train and not held & train
