import random

import pytest

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


@pytest.mark.parametrize("horizon,modulus,prompt_len", [(4, 10, None), (6, 3, 4), (3, 5, 8), (8, 10, 2)])
def test_chain_config_disjoint_and_cycling(horizon, modulus, prompt_len):
    t = ChainTask(horizon=horizon, heldout_size=50, modulus=modulus, prompt_len=prompt_len)
    held = t.heldout_prompts()
    train = t.train_prompts(random.Random(1), 1000)
    assert len(held) == 50 and not set(held) & set(train)
    L = prompt_len or horizon
    for d in held + train:
        assert len(d) == L and all(0 <= x < modulus for x in d)
        sums = t.running_sums(d)
        assert len(sums) == horizon and sums[0] == d[0] % modulus
        assert all(sums[i] == (sums[i - 1] + d[i % L]) % modulus for i in range(1, horizon))
        p = t.prompt_ids(d)
        assert t.digits_of(p) == d and t.reward(p, t.answer_ids(d)) == 1.0
    assert t.max_new_tokens == horizon + 1


def test_chain_rejects_bad_settings():
    with pytest.raises(ValueError, match="modulus=11"):
        ChainTask(horizon=4, modulus=11)
    with pytest.raises(ValueError, match="too few to split"):
        ChainTask(horizon=4, modulus=2, prompt_len=1)


def test_make_task_chain_from_config():
    from omegaconf import OmegaConf

    from actors.tasks import make_task
    from launch.config import TaskConfig

    t = make_task(OmegaConf.structured(TaskConfig(horizon=5, modulus=7, prompt_len=3)))
    assert (t.horizon, t.modulus, t.prompt_len) == (5, 7, 3)
    assert make_task(TaskConfig(horizon=4, heldout_size=8)).prompt_len == 4
    with pytest.raises(ValueError, match="unknown task 'x'; choose one of chain, arithmetic, jsonl"):
        make_task(TaskConfig(name="x"))
