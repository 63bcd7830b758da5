"""Fields that name an implementation accept exactly the names of the owner's registry, read without torch."""
import subprocess
import sys

import pytest

from launch.config import ConfigError, _choices, load_config
from protocol.registry import check, lookup

from tests.conftest import ROOT


def test_lookup_answers_unknown_names_with_the_valid_ones():
    assert lookup("colour", {"red": 1, "blue": 2}, "blue") == 2 and check("shape", ("disc", "cube"), "cube") == "cube"
    with pytest.raises(ValueError, match="^unknown colour 'green'; choose one of red, blue$"):
        lookup("colour", {"red": 1, "blue": 2}, "green")


def test_choices_are_the_owners_registries():
    from actors.group import ENGINES
    from learner.objectives import KL_ESTIMATORS, SEQUENCE_ADVANTAGES
    from learner.schedule import LR_SCHEDULES
    from prefix_store.scoring import SCORERS

    c = _choices()
    assert c["rollout.engine"] == tuple(ENGINES) and c["store.scorer"] == tuple(SCORERS)
    assert c["learner.lr_schedule"] == tuple(LR_SCHEDULES) and c["learner.kl_estimator"] == tuple(KL_ESTIMATORS)
    assert c["learner.advantage"] == (*SEQUENCE_ADVANTAGES, "soft_value")


@pytest.mark.parametrize("key", sorted(_choices()))
def test_every_choice_field_rejects_a_bad_name_listing_the_valid_ones(key):
    allowed = _choices()[key]
    with pytest.raises(ConfigError, match=f"{key}='nope' is not valid; choose one of {', '.join(allowed)}$"):
        load_config("configs/smoke.yaml", [f"{key}=nope"])


def test_loading_a_config_imports_nothing_heavy():
    code = ("import sys; from launch.config import load_config; load_config('configs/smoke.yaml'); "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
