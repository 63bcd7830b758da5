import subprocess
import sys

import pytest

from launch.config import ConfigError, load_config

from tests.conftest import ROOT


def test_defaults_and_override():
    cfg = load_config("configs/default.yaml", ["train.steps=3", "store.scorer=random"])
    assert cfg.train.steps == 3 and cfg.store.scorer == "random"


def test_no_kl_derives_the_hard_max_soft_value():
    """learner.kl_coef=0 (no KL) loads: the store's soft-value temperature it derives is 0, the max reward."""
    cfg = load_config("configs/default.yaml", ["learner.kl_coef=0"])
    assert cfg.learner.kl_coef == 0 and cfg.store.beta == 0


@pytest.mark.parametrize("overrides,match", [
    (["train.stepz=3"], "unknown config key 'train.stepz'; valid keys here: .*steps"),
    (["train.steps=abc"], "invalid config"),
    (["store.scorer=magic"], "store.scorer='magic' is not valid; choose one of .*random"),
    (["model.path=/no/such/model"], "model.path='/no/such/model' does not exist"),
    (["nonsense"], "not of the form key=value"),
    (["store.scorer_weights={combined: 1.0}"], "store.scorer_weights names combined, not scorers"),
    (["store.beta=-1"], r"store.beta=-1.0 must be >= 0"),
])
def test_bad_overrides_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/default.yaml", overrides)


@pytest.mark.parametrize("args,words", [
    (["--config", "configs/missing.yaml"], "not found"),
    (["--config", "configs/default.yaml", "train.stepz=3"], "unknown config key"),
    (["--config", "configs/default.yaml", "model.path=/no/such/model"], "does not exist"),
    (["--config", "configs/arithmetic.yaml"], "needs model.path"),
])
def test_cli_bad_input_one_line_no_traceback(args, words, tmp_path):
    p = subprocess.run([sys.executable, "-m", "launch.train", *args, f"run_dir={tmp_path}/runs"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()  # nothing partial written


@pytest.mark.parametrize("name", ["default", "smoke", "root_start", "prefix_uncertainty", "prefix_random"])
def test_shipped_presets_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.train.steps >= 1


def test_mode_presets_differ_only_in_branching():
    root, unc, rnd = (load_config(f"configs/{n}.yaml") for n in ("root_start", "prefix_uncertainty", "prefix_random"))
    assert root.store.branch_fraction == 0 and unc.store.branch_fraction == rnd.store.branch_fraction > 0
    assert (unc.store.scorer, rnd.store.scorer) == ("outcome_uncertainty", "random")


def test_gpu_cluster_example_is_valid(tmp_path):
    cfg = load_config("configs/gpu_cluster.yaml", [f"model.path={tmp_path}"])
    assert cfg.rollout.num_gpus_per_actor == 1 and cfg.train.async_rollouts


def test_sweep_file_is_expanded_and_validated():
    from launch.sweep import load_sweep, run_name

    spec, points = load_sweep("configs/sweeps/modes_h4.yaml")
    assert len(points) == 9 and {run_name(p) for p in points}.__len__() == 9
    _, smoke = load_sweep("configs/sweeps/smoke.yaml")
    assert [p["store.branch_fraction"] for p in smoke] == [0.0, 0.5]
