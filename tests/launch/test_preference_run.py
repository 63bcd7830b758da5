"""End to end on the real stack, learning from preferences: Ray, a vLLM engine, the DeepSpeed learner, the
reward-model actor and the simulated rater, through the real CLI; then a resume from its checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]
OVERRIDES = ["learner.signal=preference", "learner.nudge=0.02", "learner.ref_ema=0.05", "store.branch_fraction=0",
             "preference.max_labels=40", "preference.queries_per_step=16", "train.checkpoint_every=2",
             "wandb.mode=disabled", "train.log_every=0"]


def _train(args):
    p = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_preference_run_trains_checkpoints_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    _train(["--config", "configs/smoke.yaml", f"run_dir={runs}", "run_name=pref", "train.steps=2", *OVERRIDES])
    run = runs / "pref"
    history = json.loads((run / "history.json").read_text())
    assert [h["rm/labels_used"] for h in history] == [16, 32]
    assert all("timing/preferences_s" in h and h["rm/new_labels"] == 16 for h in history)
    assert all(0.0 <= h["rm/heldout_accuracy"] <= 1.0 and h["rm/chosen_pair_variance"] >= 0 for h in history)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    phase = json.loads((ckpt / "preferences" / "phase.json").read_text())
    assert phase["rater"]["labels_used"] == 32
    assert os.path.isdir(ckpt / "preferences" / "rm")

    # resume to 4 steps: the budget of 40 runs out at step 3 (8 labels), step 4 asks nothing
    cfg = run / "config.yaml"
    assert cfg.exists()
    _train([f"resume={run}", "train.steps=4"])
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["rm/labels_used"] for h in history] == [16, 32, 40, 40]
    assert history[2]["rm/new_labels"] == 8 and "rm/new_labels" not in history[3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["weight_sync_check"]["max_abs_diff"] < 1e-4
