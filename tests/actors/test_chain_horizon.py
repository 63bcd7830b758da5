"""One base model for every H: the chain task at horizon H on prompts of a longer chain counts its first H steps."""
import pytest

from actors.tasks import ChainTask, digit_token


def test_reward_counts_the_first_h_steps_of_the_longer_chain():
    short, full = ChainTask(horizon=4, prompt_len=10), ChainTask(horizon=10)
    digits = (3, 7, 1, 9, 4, 4, 0, 8, 2, 5)
    prompt = full.prompt_ids(digits)
    assert short.prompt_ids(digits) == prompt
    sums = full.running_sums(digits)
    assert short.running_sums(digits) == sums[:4] == [3, 0, 1, 0]
    answer = [digit_token(s) for s in sums]
    assert short.reward(prompt, answer) == full.reward(prompt, answer) == 1.0
    wrong_5th = answer[:4] + [digit_token((sums[4] + 1) % 10)] + answer[5:]
    assert short.reward(prompt, wrong_5th) == 1.0 and full.reward(prompt, wrong_5th) == 0.0  # beyond H: not counted
    wrong_4th = answer[:3] + [digit_token((sums[3] + 1) % 10)] + answer[4:]
    assert short.reward(prompt, wrong_4th) == 0.0
    assert short.reward(prompt, answer[:3]) == 0.0  # too short
    seq, first = short.teacher_forcing(digits)
    assert seq == prompt + answer[:4] and first == len(prompt) == 12


def test_build_horizon_shares_the_base_model_of_the_longest_chain():
    from launch.base_model import base_model_dir, build_task_cfg
    from launch.config import load_config

    small = load_config(None, ["task.horizon=4", "model.build_horizon=10"])
    big = load_config(None, ["task.horizon=10"])
    assert small.task.prompt_len == 10 and small.model.sft_steps == big.model.sft_steps == 3750
    built = build_task_cfg(small.model, small.task)
    assert (built.horizon, built.prompt_len) == (10, 10) and small.task.horizon == 4
    assert base_model_dir(small.model, built) == base_model_dir(big.model, build_task_cfg(big.model, big.task))
    plain = load_config(None, ["task.horizon=4"])
    assert base_model_dir(plain.model, build_task_cfg(plain.model, plain.task)) != base_model_dir(big.model, big.task)
    # an explicit prompt length is kept (trailing symbols are distractors for both)
    longer = load_config(None, ["task.horizon=4", "model.build_horizon=10", "task.prompt_len=12"])
    assert build_task_cfg(longer.model, longer.task).prompt_len == 12 == longer.task.prompt_len


@pytest.mark.parametrize("over,match", [
    (["task.horizon=8", "model.build_horizon=6"], "model.build_horizon=6 must be >= task.horizon=8"),
    (["task.name=arithmetic", "model.build_horizon=8"], "only applies to the tiny base model of the chain task"),
    (["model.build_horizon=0"], "model.build_horizon=0 must be >= 1"),
])
def test_bad_build_horizon_is_one_line(over, match):
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, over)
