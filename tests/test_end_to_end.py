"""End to end on the real stack: Ray, a vLLM engine, a DeepSpeed engine, wandb offline; no stand-ins.

Runs the real CLI (`python -m launch.train --config configs/smoke.yaml`) once and
checks what it wrote.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SECRET = "graftrl-test-secret-7f3a9c"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, WANDB_API_KEY=SECRET, HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN=SECRET)
    p = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml", f"run_dir={runs}",
                        "run_name=smoke"], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(runs / "smoke" / "summary.json") as f:
        return runs, json.load(f), p.stdout + p.stderr


def test_summary_records_a_real_run(smoke_run):
    runs, s, _ = smoke_run
    cfg = s["config"]
    assert s["steps"] == cfg["train"]["steps"] == s["policy_version"]  # one learner update and push per step
    assert s["rollouts"] == cfg["train"]["steps"] * cfg["train"]["prompts_per_step"] * cfg["train"]["samples_per_request"]
    assert s["generated_tokens"] >= s["rollouts"]
    assert 0.0 <= s["heldout_success_before"] <= 1.0 and 0.0 <= s["heldout_success_after"] <= 1.0
    assert os.path.realpath(runs / "latest") == os.path.realpath(runs / "smoke")
    assert list((runs / "smoke" / "wandb").glob("offline-run-*"))


def test_some_rollouts_started_from_stored_prefixes(smoke_run):
    _, s, _ = smoke_run
    assert s["rollouts_from_prefix"] > 0


def test_loss_is_finite(smoke_run):
    _, s, _ = smoke_run
    assert s["final_loss"] is not None and math.isfinite(s["final_loss"])


def test_engine_logprobs_equal_learner_after_push(smoke_run):
    _, s, _ = smoke_run
    check = s["weight_sync_check"]
    assert len(check["engine"]) == len(check["token_ids"]) - 1
    assert max(abs(a - b) for a, b in zip(check["engine"], check["learner"])) < 1e-4


def test_pushed_weights_differ_from_the_base_model(smoke_run):
    """The agreement above must come from new weights, not from an engine still serving the base model."""
    import torch
    from transformers import AutoModelForCausalLM

    _, s, _ = smoke_run
    ids = s["weight_sync_check"]["token_ids"]
    base = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(base(torch.tensor([ids])).logits[0, :-1], -1)
    base_lp = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
    assert max(abs(a - b) for a, b in zip(s["weight_sync_check"]["engine"], base_lp)) > 1e-5


def test_no_secret_reaches_logs_config_or_wandb(smoke_run):
    runs, _, output = smoke_run
    assert SECRET not in output
    for path in runs.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret found in {path}"
