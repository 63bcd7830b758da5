"""Objectives against hand-computed values and an independent float64 loop implementation."""
import math

import numpy as np
import pytest
import torch

from learner.objectives import group_advantages, kl_estimate, policy_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([7, 7, 7, 3, 3])
    adv = group_advantages(r, g, nudge=0.1)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]) + 0.1)


def test_group_norm_matches_loop():
    rng = np.random.default_rng(0)
    r = rng.random(12)
    g = rng.integers(0, 3, 12)
    adv = group_advantages(torch.tensor(r), torch.tensor(g), normalize=True).numpy()
    for i in range(12):
        grp = r[g == g[i]]
        assert adv[i] == pytest.approx((r[i] - grp.mean()) / (grp.std() + 1e-6), abs=1e-9)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators(est):
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = (lp - ref).numpy()
    want = {"k1": d, "k2": d**2 / 2, "k3": np.exp(-d) - 1 + d}[est]
    assert np.allclose(kl_estimate(lp, ref, est).numpy(), want)


def test_k3_is_unbiased_for_kl():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    expect = float((p * kl_estimate(p.log(), q.log(), "k3")).sum())
    assert expect == pytest.approx(exact, rel=1e-9)


def loop_loss(logp, blp, ref, adv, mask, clip, beta):
    num, den = 0.0, 0.0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - blp[i][t])
            surr = min(ratio * adv[i], min(max(ratio, 1 - clip), 1 + clip) * adv[i])
            d = logp[i][t] - ref[i][t]
            num += -surr + beta * (math.exp(-d) - 1 + d)
            den += 1
    return num / den


def test_policy_loss_matches_float64_loop():
    rng = np.random.default_rng(1)
    B, T = 5, 7
    logp, blp, ref = (-rng.random((B, T)) * 3 for _ in range(3))
    adv = rng.normal(size=B)
    mask = (rng.random((B, T)) > 0.3).astype(float)
    loss, _ = policy_loss(*(torch.tensor(x) for x in (logp, blp, ref, adv, mask)), clip_ratio=0.2, kl_coef=0.05, kl_estimator="k3")
    assert float(loss) == pytest.approx(loop_loss(logp, blp, ref, adv, mask, 0.2, 0.05), rel=1e-10)


def test_masked_tokens_get_no_gradient():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[0.0, 1.0, 1.0]]),
                          clip_ratio=0.2, kl_coef=0.1, kl_estimator="k3")
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0
