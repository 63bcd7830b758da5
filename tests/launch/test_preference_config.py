"""The preference section of the config: names from their owners, ranges, the combinations that cannot work."""
import pytest

from launch.config import ConfigError, load_config


def test_preference_example_config_loads():
    cfg = load_config("configs/preference_chain.yaml")
    assert cfg.learner.signal == "preference" and cfg.store.branch_fraction == 0.0
    assert cfg.preference.query_selection == "uncertainty" and cfg.preference.max_labels == 2000


@pytest.mark.parametrize("overrides, message", [
    (["learner.signal=votes"], "learner.signal='votes' is not valid; choose one of reward, preference"),
    (["preference.rater=human"], "preference.rater='human' is not valid; choose one of simulated, file"),
    (["preference.query_selection=greedy"], "choose one of uncertainty, random, double_thompson"),
    (["preference.mode=batch"], "choose one of online, offline"),
    (["preference.ensemble_size=1"], "preference.ensemble_size=1 must be >= 2"),
    (["preference.rater_temperature=0"], "preference.rater_temperature=0.0 must be > 0"),
    (["preference.max_labels=0"], "preference.max_labels=0 must be >= 1"),
    (["learner.signal=preference", "preference.mode=offline"], "set preference.max_labels"),
    (["learner.signal=preference", "preference.rater=file"], "preference.rater_path=None is not a file"),
    (["learner.signal=preference", "train.samples_per_request=1"], "must be >= 2"),
    (["learner.signal=preference", "learner.advantage=soft_value", "learner.kl_mode=loss"], "use group, group_norm or rloo"),
])
def test_bad_preference_settings_get_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_file_rater_needs_an_existing_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "1234", "response_a": "1360", "response_b": "1361", "choice": "a"}\n')
    cfg = load_config(None, ["learner.signal=preference", "preference.rater=file", f"preference.rater_path={path}"])
    assert cfg.preference.rater_path == str(path)
