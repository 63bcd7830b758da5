"""The tiny base model: soft-target loss vs its one-hot reference, the sampling measurement, and the built model.

`test_default_base_model_matches_target_q` builds the model of configs/default.yaml
on a cache miss (about 1.5 minutes on 2 cores, once: the same cache entry is used by
`make run` and the end-to-end test) and reads it in a few seconds afterwards.
"""
import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from actors.tasks import DIGIT0, EOS, VOCAB, ChainTask, digit_token
from launch.base_model import (REPORT_FILE, ensure_base_model, load_model, noisy_demos, sampled_success,
                               soft_target_loss)
from launch.config import ConfigError, load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("q,m", [(0.5, 10), (0.3, 3), (0.9, 2)])
def test_soft_target_loss_is_the_expected_one_hot_loss(q, m):
    """Reference: explicit target distributions, and the mean one-hot loss over the demonstrator's choices."""
    task = ChainTask(horizon=3, modulus=m)
    _, _, rights = noisy_demos(task, random.Random(0), 6, q)
    logp = torch.log_softmax(torch.randn(6, 4, len(VOCAB), dtype=torch.float64), -1)  # (B, H+1, V)
    ref = torch.zeros(6, 4, dtype=torch.float64)
    for b in range(6):
        for i, r in enumerate(rights[b]):
            if r < 0:
                ref[b, i] = -logp[b, i, EOS]
            else:
                probs = {s: (q if s == r else (1 - q) / (m - 1)) for s in range(m)}
                ref[b, i] = -sum(p * logp[b, i, DIGIT0 + s] for s, p in probs.items())
    assert torch.allclose(soft_target_loss(logp, rights, q, m), ref.mean())


def test_noisy_demos_follow_the_local_rule():
    task = ChainTask(horizon=5, modulus=7, prompt_len=3)
    seqs, masks, rights = noisy_demos(task, random.Random(0), 200, 0.5)
    n_right = 0
    for seq, mask, right in zip(seqs, masks, rights):
        digits = task.digits_of(seq)
        answer = [t - DIGIT0 for t in seq[-6:-1]]
        prev = 0
        for i, (o, r) in enumerate(zip(answer, right)):
            assert r == (prev + task.step_digit(digits, i)) % 7 and 0 <= o < 7
            n_right += o == r
            prev = o
        assert seq[-1] == EOS and sum(mask) == 6 and right[-1] == -1
    assert 0.4 < n_right / 1000 < 0.6


class _FakeLM:
    """Next-token distribution: the right running sum with probability p_right, else uniform over other digits."""

    def __init__(self, task, p_right):
        self.task, self.p = task, p_right

    def __call__(self, ids):
        B, T = ids.shape
        logits = torch.full((B, T, len(VOCAB)), -1e9)
        n_prompt = self.task.prompt_len + 2
        for b in range(B):
            digits = self.task.digits_of(ids[b].tolist())
            i = T - n_prompt  # index of the step being predicted
            prev = 0 if i == 0 else int(ids[b, -1]) - DIGIT0
            right = (prev + self.task.step_digit(digits, i)) % self.task.modulus
            probs = torch.full((self.task.modulus,), (1 - self.p) / (self.task.modulus - 1))
            probs[right] = self.p
            logits[b, -1, DIGIT0 : DIGIT0 + self.task.modulus] = probs.log()
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_sampled_success_counts_steps_after_a_right_prefix(p):
    task = ChainTask(horizon=3, heldout_size=40)
    out = sampled_success(_FakeLM(task, p), task, task.heldout_prompts(), samples=25, seed=0)
    assert out["sampled_answers"] == 1000
    assert abs(out["measured_q"] - p) < 0.05
    assert abs(out["heldout_root_success"] - p ** 3) < 0.05
    assert len(out["measured_q_per_step"]) == 3


def test_text_tasks_need_a_model_folder():
    cfg = load_config("configs/default.yaml", ["task.name=arithmetic"])
    with pytest.raises(ConfigError, match="task.name='arithmetic' needs model.path"):
        ensure_base_model(cfg.model, cfg.task)


def test_default_base_model_matches_target_q():
    """Acceptance: measured_q within 0.1 of target_q; held-out root success consistent with measured_q ** H."""
    cfg = load_config("configs/default.yaml")
    path = ensure_base_model(cfg.model, cfg.task, log=lambda m: None)
    with open(f"{path}/{REPORT_FILE}") as f:
        report = json.load(f)
    task = ChainTask(horizon=cfg.task.horizon, heldout_size=cfg.task.heldout_size, seed=cfg.task.seed,
                     modulus=cfg.task.modulus, prompt_len=cfg.task.prompt_len)
    fresh = sampled_success(load_model(path), task, task.heldout_prompts(), samples=16, seed=1)  # new samples
    H, target = cfg.task.horizon, cfg.model.target_q
    assert (report["horizon"], report["target_q"]) == (H, target)
    for r in (report, fresh):
        q, success = r["measured_q"], r["heldout_root_success"]
        assert abs(q - target) <= 0.1, r
        assert abs(success - q ** H) <= 0.05 or q ** H / 3 <= success <= 3 * q ** H, r
    assert abs(fresh["measured_q"] - report["measured_q"]) < 0.05  # the stored report is reproducible


def test_report_cli_prints_one_json_line():
    """Reuses the cache filled by the test above (same config)."""
    p = subprocess.run([sys.executable, "-m", "launch.base_model", "--config", "configs/default.yaml", "--report"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert {"horizon", "target_q", "measured_q", "heldout_root_success"} <= set(report)
