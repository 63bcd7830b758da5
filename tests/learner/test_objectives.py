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


# ---- RLOO, registry, KL in reward, soft values, per-token advantages, forced tokens -------------------

from learner.objectives import (forced_token_mask, kl_penalised_rewards, rloo_advantages, sequence_advantages,  # noqa: E402
                                soft_value, soft_value_advantages)


def test_rloo_by_hand():
    # group 7: r = 1, 0, 0 -> leave-one-out means 0, 1/2, 1/2; group 3: 1, 1 -> 0, 0; group 9 alone -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 5.0], dtype=torch.float64)
    g = torch.tensor([7, 7, 7, 3, 3, 9])
    adv = rloo_advantages(r, g, nudge=0.1)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64) + 0.1)


def test_rloo_matches_float64_loop():
    rng = np.random.default_rng(2)
    r = rng.normal(size=20)
    g = rng.integers(0, 5, 20)
    adv = rloo_advantages(torch.tensor(r), torch.tensor(g), nudge=0.03).numpy()
    for i in range(20):
        others = [r[j] for j in range(20) if g[j] == g[i] and j != i]
        want = (r[i] - sum(others) / len(others) if others else 0.0) + 0.03
        assert adv[i] == pytest.approx(want, abs=1e-12)


def test_advantage_registry_names_valid_choices():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    assert torch.allclose(sequence_advantages(r, g, "group"), torch.tensor([0.5, -0.5]))
    assert torch.allclose(sequence_advantages(r, g, "rloo"), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="choose one of group, group_norm, rloo, soft_value"):
        sequence_advantages(r, g, "ppo")


def test_kl_in_reward_by_hand_and_loop():
    # one sample, two tokens: log rho = (-1 - -1.5, -2 - -1) = (0.5, -1.0); third token masked
    blp = torch.tensor([[-1.0, -2.0, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([1.0], dtype=torch.float64)
    got = kl_penalised_rewards(r, blp, ref, mask, kl_coef=0.1, estimator="k1")
    assert float(got) == pytest.approx(1.0 - 0.1 * (0.5 - 1.0))
    rng = np.random.default_rng(3)
    B, T = 6, 5
    blp, ref = -rng.random((B, T)) * 2, -rng.random((B, T)) * 2
    mask = (rng.random((B, T)) > 0.3).astype(float)
    r = rng.random(B)
    got = kl_penalised_rewards(*(torch.tensor(x) for x in (r, blp, ref, mask)), kl_coef=0.2, estimator="k3").numpy()
    for i in range(B):
        pen = sum(math.exp(ref[i, t] - blp[i, t]) - 1 + blp[i, t] - ref[i, t] for t in range(T) if mask[i, t])
        assert got[i] == pytest.approx(r[i] - 0.2 * pen, abs=1e-12)


def test_soft_value_by_hand_and_limits():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert float(soft_value(r, 1.0)) == pytest.approx(math.log((math.e + 1) / 2))
    assert float(soft_value(r, 1e3)) == pytest.approx(0.5, abs=1e-3)  # beta -> inf: the mean
    assert float(soft_value(r, 1e-3)) == pytest.approx(1.0, abs=1e-2)  # beta -> 0: the max
    assert float(soft_value(r, 0.0)) == 1.0  # beta = 0: the max itself
    rng = np.random.default_rng(4)
    x = rng.normal(size=9)
    want = 0.3 * math.log(sum(math.exp(v / 0.3) for v in x) / len(x))
    assert float(soft_value(torch.tensor(x), 0.3)) == pytest.approx(want, rel=1e-12)


def test_soft_value_advantages_by_hand_and_telescoping():
    # path of 3 tokens: V(s0)=0.4, V(s1)=0.6, V(s2)=0.1, reward 1 -> A = 0.2, -0.5, 0.9
    V = torch.tensor([[0.4, 0.6, 0.1, 1.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    V[1, 1] = 0.0  # row 1 has one token and reward 0 (V after its last token)
    A = soft_value_advantages(V, mask, nudge=0.01)
    assert torch.allclose(A, torch.tensor([[0.21, -0.49, 0.91], [-0.49, 0.0, 0.0]], dtype=torch.float64))
    rng = np.random.default_rng(5)
    B, T = 7, 6
    lens = rng.integers(1, T + 1, B)
    Vn = rng.normal(size=(B, T + 1))
    m = (np.arange(T)[None] < lens[:, None]).astype(float)
    A = soft_value_advantages(torch.tensor(Vn), torch.tensor(m)).numpy()
    for i in range(B):
        for t in range(T):
            assert A[i, t] == pytest.approx(Vn[i, t + 1] - Vn[i, t] if t < lens[i] else 0.0, abs=1e-12)
        assert A[i].sum() == pytest.approx(Vn[i, lens[i]] - Vn[i, 0], abs=1e-12)  # telescopes to r - V(s0)


def test_soft_value_is_the_kl_regularised_optimum():
    """With V from pi_ref, pi_ref * exp(A / beta) is a normalised distribution (the optimum's one-step ratio)."""
    beta = 0.5
    pref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    r_after = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)  # V(s+a) = terminal reward after action a
    V_s = beta * torch.log((pref * torch.exp(r_after / beta)).sum())
    A = r_after - V_s
    assert float((pref * torch.exp(A / beta)).sum()) == pytest.approx(1.0, rel=1e-12)


def loop_loss_general(logp, blp, ref, adv, mask, clip, beta, est, denom):
    num = 0.0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            a = adv[i][t] if np.ndim(adv) == 2 else adv[i]
            ratio = math.exp(logp[i][t] - blp[i][t])
            surr = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            d = logp[i][t] - ref[i][t]
            k = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[est]
            num += -surr + beta * k
    return num / denom


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("per_token", [False, True])
def test_policy_loss_general_matches_loop(est, per_token):
    rng = np.random.default_rng(6)
    B, T = 4, 5
    logp, blp, ref = (-rng.random((B, T)) * 3 for _ in range(3))
    adv = rng.normal(size=(B, T) if per_token else B)
    mask = (rng.random((B, T)) > 0.3).astype(float)
    loss, _ = policy_loss(*(torch.tensor(x) for x in (logp, blp, ref, adv, mask)), clip_ratio=0.2, kl_coef=0.05,
                          kl_estimator=est, denom=40.0)
    assert float(loss) == pytest.approx(loop_loss_general(logp, blp, ref, adv, mask, 0.2, 0.05, est, 40.0), rel=1e-10)


def test_clipped_ratio_by_hand():
    # rho = e^{0.5} ~ 1.65 > 1.2 with A = +1: clipped to 1.2, no gradient; with A = -1: unclipped -rho
    logp = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    loss, info = policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), logp.detach(), torch.tensor([[1.0, -1.0]], dtype=torch.float64),
                             torch.ones(1, 2, dtype=torch.float64), clip_ratio=0.2, kl_coef=0.0, kl_estimator="k1")
    assert float(loss.detach()) == pytest.approx(-(1.2 - math.exp(0.5)) / 2)
    assert float(info["clip_frac"]) == 1.0
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(math.exp(0.5) / 2)


def test_denom_makes_microbatches_sum_to_full_batch():
    rng = np.random.default_rng(7)
    B, T = 6, 4
    xs = [torch.tensor(-rng.random((B, T))) for _ in range(3)]
    adv = torch.tensor(rng.normal(size=B))
    mask = torch.tensor((rng.random((B, T)) > 0.3).astype(float))
    kw = dict(clip_ratio=0.2, kl_coef=0.1, kl_estimator="k3")
    full, _ = policy_loss(*xs, adv, mask, **kw)
    N = float(mask.sum())
    parts = [policy_loss(*(x[s] for x in xs), adv[s], mask[s], denom=N, **kw)[0] for s in (slice(0, 2), slice(2, 6))]
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-12)


def test_forced_token_is_context_and_gets_no_gradient():
    """A forced branch token is the last context token: masked out, zero gradient, its continuation trained."""
    from protocol.messages import Rollout
    from learner.batch import build_train_batch, collate, token_logprobs
    r = Rollout(request_id=0, root_id="r", prompt_ids=[1, 5], prefix_ids=[4, 9], token_ids=[3, 2], logprobs=[-0.5, -0.5],
                entropy=[0.0] * 2, top1_logprobs=[0.0] * 2, alt_token_ids=[-1] * 2, alt_logprobs=[-1e9] * 2,
                reward=1.0, policy_version=0, actor_id=0, forced=True)
    b = build_train_batch([r, r], advantage="group", nudge=0.5)
    t = collate(b, pad_id=0)
    fm = forced_token_mask(t["context_len"], t["forced"], t["input_ids"].size(1))
    assert fm[0].tolist() == [0, 0, 0, 1, 0, 0]  # token 9 at position 3 was forced
    logits = torch.zeros(2, 6, 16, requires_grad=True)
    lp = token_logprobs(logits, t["input_ids"], t["cont_index"])
    loss, _ = policy_loss(lp, t["behaviour"], lp.detach(), t["advantages"], t["mask"], clip_ratio=0.2, kl_coef=0.1, kl_estimator="k3")
    loss.backward()
    g = logits.grad  # logits at j-1 predict token j: the forced token at 3 is predicted by row 2
    assert g[:, 2].abs().sum() == 0 and g[:, 0:3].abs().sum() == 0
    assert g[:, 3].abs().sum() > 0 and g[:, 4].abs().sum() > 0  # continuation tokens at 4, 5 are trained


def test_soft_value_batch_from_rollouts():
    from protocol.messages import Rollout
    from learner.batch import build_train_batch, collate
    mk = lambda toks, rew: Rollout(request_id=0, root_id="r", prompt_ids=[1], prefix_ids=[], token_ids=toks,  # noqa: E731
                                   logprobs=[-0.1] * len(toks), entropy=[0.0] * len(toks), top1_logprobs=[0.0] * len(toks),
                                   alt_token_ids=[-1] * len(toks), alt_logprobs=[-1e9] * len(toks), reward=rew,
                                   policy_version=0, actor_id=0)
    b = build_train_batch([mk([3, 4], 1.0), mk([5], 0.0)], advantage="soft_value", nudge=0.0, values=[[0.4, 0.7], [0.4]])
    assert b.token_advantages == [pytest.approx([0.3, 0.3]), pytest.approx([-0.4])]
    assert b.advantages == pytest.approx([0.6, -0.4])
    t = collate(b, 0)
    assert t["advantages"].shape == (2, 2) and t["advantages"][1].tolist() == pytest.approx([-0.4, 0.0])
    with pytest.raises(ValueError, match="soft_value"):
        build_train_batch([mk([3, 4], 1.0)], advantage="soft_value", nudge=0.0)


def test_nonfinite_batch_is_detected():
    from learner.batch import TrainBatch
    ok = TrainBatch([[1]], [[2]], [[-0.1]], [0.5], [0], rewards=[1.0])
    assert ok.is_finite()
    for bad in (dict(behaviour_logprobs=[[float("nan")]]), dict(advantages=[float("inf")]), dict(rewards=[float("-inf")]),
                dict(token_advantages=[[float("nan")]])):
        kw = dict(context_ids=[[1]], token_ids=[[2]], behaviour_logprobs=[[-0.1]], advantages=[0.5], versions=[0], rewards=[1.0])
        assert not TrainBatch(**{**kw, **bad}).is_finite()
