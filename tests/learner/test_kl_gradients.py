"""Which KL each estimator x placement optimises: expected gradients by enumeration against exact KL gradients.

The policy is enumerable (a softmax over a few tokens, or two-step sequences
a, b with pi(a) pi(b | a)), so the expected gradient of the code's per-sample
loss is exact: sum_y pi(y) * grad loss(y), with grad loss(y) taken by autograd
through `policy_loss` / `kl_penalised_rewards` themselves, the sample y held
fixed (what a sampled batch sees). It is compared with autograd of

  reverse KL  KL(pi || pi_ref) = sum_y pi(y) log(pi(y) / pi_ref(y))   (the objective learner/objectives.py states)
  forward KL  KL(pi_ref || pi) = sum_y pi_ref(y) log(pi_ref(y) / pi(y))

and, for sequences, with the per-token versions whose prefix distribution is
held fixed (stop-gradient): sum_t E_{y<t ~ sg(pi)} KL_t(. || .), which is what
a per-token penalty in the loss differentiates to.
"""
import pytest
import torch

from learner.objectives import kl_penalised_rewards, policy_loss

F64 = torch.float64
BETA = 0.7  # any beta: both sides scale with it


def _sample_grad(theta: torch.Tensor, logp_fn, ref: torch.Tensor, ys, *, estimator: str, placement: str) -> torch.Tensor:
    """d loss / d theta of one sample y = ys (a tuple of token ids), through the code's functions.

    loss: `policy_loss` with A = 0 and beta * k in the loss, or with A = r' = 0 - beta * sum_t k (from
    `kl_penalised_rewards`, detached) and no KL term; every token of the sample is trained (denom 1: a sum)."""
    theta = theta.detach().requires_grad_(True)
    logp = logp_fn(theta, ys).unsqueeze(0)  # (1, T)
    mask = torch.ones_like(logp)
    behaviour, ref, zero = logp.detach(), ref.unsqueeze(0), torch.zeros(1, dtype=F64)  # on-policy: rho = 1
    if placement == "loss":
        loss, _ = policy_loss(logp, behaviour, ref, zero, mask, clip_ratio=0.2, kl_coef=BETA, kl_estimator=estimator,
                              denom=1.0)
    else:
        adv = kl_penalised_rewards(zero, behaviour, ref, mask, kl_coef=BETA, estimator=estimator)  # (1,) = -beta sum_t k
        loss, _ = policy_loss(logp, behaviour, ref, adv, mask, clip_ratio=0.2, kl_coef=0.0, kl_estimator=estimator,
                              denom=1.0)
    (g,) = torch.autograd.grad(loss, theta)
    return g / BETA


def _grad(f, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta)
    return g


# ---- one step: y ~ softmax(theta) over K tokens --------------------------------------------------------------
K = 5
THETA = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=F64)
THETA_REF = torch.tensor([-0.5, 0.4, 0.1, 0.9, -0.2], dtype=F64)


def _one_step_logp(theta, ys):
    return torch.log_softmax(theta, -1)[list(ys)]  # (T=1,)


def _one_step_expected(estimator: str, placement: str) -> torch.Tensor:
    pi = torch.softmax(THETA, -1)
    ref = torch.log_softmax(THETA_REF, -1)
    return sum(pi[y] * _sample_grad(THETA, _one_step_logp, ref[[y]], (y,), estimator=estimator, placement=placement)
               for y in range(K))


def _reverse_kl(theta):
    lp, lr = torch.log_softmax(theta, -1), torch.log_softmax(THETA_REF, -1)
    return (lp.exp() * (lp - lr)).sum()


def _forward_kl(theta):
    lp, lr = torch.log_softmax(theta, -1), torch.log_softmax(THETA_REF, -1)
    return (lr.exp() * (lr - lp)).sum()


ONE_STEP = {  # estimator, placement -> which exact gradient its expected gradient equals
    ("k1", "loss"): "zero", ("k2", "loss"): "reverse", ("k3", "loss"): "forward",
    ("k1", "reward"): "reverse", ("k2", "reward"): "neither", ("k3", "reward"): "neither",
}


@pytest.mark.parametrize("estimator,placement", list(ONE_STEP))
def test_one_step_expected_gradient(estimator, placement):
    got = _one_step_expected(estimator, placement)
    exact = {"reverse": _grad(_reverse_kl, THETA), "forward": _grad(_forward_kl, THETA), "zero": torch.zeros(K, dtype=F64)}
    follows = [name for name, g in exact.items() if torch.allclose(got, g, atol=1e-10)]
    assert follows == ([] if ONE_STEP[estimator, placement] == "neither" else [ONE_STEP[estimator, placement]]), \
        (estimator, placement, got, exact)


def test_reverse_and_forward_differ_here():
    """The toy is far enough from pi_ref that the two KLs' gradients are told apart (else the test above proves little)."""
    assert (_grad(_reverse_kl, THETA) - _grad(_forward_kl, THETA)).abs().max() > 0.05


# ---- two steps: y = (a, b), pi(a) = softmax(theta[0]), pi(b | a) = softmax(theta[1 + a]) ------------------------
A = 3
THETA2 = torch.tensor([[0.5, -0.7, 0.2], [1.0, -0.3, 0.0], [-0.6, 0.4, 0.9], [0.2, 0.2, -1.1]], dtype=F64)  # (1 + A, A)
THETA2_REF = torch.tensor([[-0.4, 0.6, 0.0], [0.1, 0.8, -0.5], [0.7, -0.2, 0.3], [-0.9, 0.5, 0.4]], dtype=F64)


def _two_step_logp(theta, ys):
    a, b = ys
    return torch.stack([torch.log_softmax(theta[0], -1)[a], torch.log_softmax(theta[1 + a], -1)[b]])  # (T=2,)


def _seq_logprob_table(theta):
    """log pi(a, b) as an (A, A) table, and the per-step tables log pi(a) (A,), log pi(b | a) (A, A)."""
    l1 = torch.log_softmax(theta[0], -1)
    l2 = torch.log_softmax(theta[1:], -1)
    return l1[:, None] + l2, l1, l2


def _two_step_expected(estimator: str, placement: str) -> torch.Tensor:
    lp, _, _ = _seq_logprob_table(THETA2)
    _, r1, r2 = _seq_logprob_table(THETA2_REF)
    total = torch.zeros_like(THETA2)
    for a in range(A):
        for b in range(A):
            ref = torch.stack([r1[a], r2[a, b]])
            total += lp[a, b].exp() * _sample_grad(THETA2, _two_step_logp, ref, (a, b), estimator=estimator,
                                                   placement=placement)
    return total


def _seq_reverse_kl(theta):
    lp, _, _ = _seq_logprob_table(theta)
    lr, _, _ = _seq_logprob_table(THETA2_REF)
    return (lp.exp() * (lp - lr)).sum()


def _seq_forward_kl(theta):
    lp, _, _ = _seq_logprob_table(theta)
    lr, _, _ = _seq_logprob_table(THETA2_REF)
    return (lr.exp() * (lr - lp)).sum()


def _per_token_kl(theta, *, forward: bool):
    """KL_1 + sum_a sg(pi(a)) KL_2(. | a): the prefix distribution held fixed."""
    _, l1, l2 = _seq_logprob_table(theta)
    _, r1, r2 = _seq_logprob_table(THETA2_REF)
    kl = (lambda p, q: (q.exp() * (q - p)).sum(-1)) if forward else (lambda p, q: (p.exp() * (p - q)).sum(-1))
    return kl(l1, r1) + (l1.exp().detach() * kl(l2, r2)).sum()


TWO_STEP = {
    ("k1", "loss"): "zero", ("k2", "loss"): "per_token_reverse", ("k3", "loss"): "per_token_forward",
    ("k1", "reward"): "reverse", ("k2", "reward"): "neither", ("k3", "reward"): "neither",
}


@pytest.mark.parametrize("estimator,placement", list(TWO_STEP))
def test_two_step_expected_gradient(estimator, placement):
    """Sequences: only k1 in the reward follows the sequence-level KL(pi || pi_ref) the objective states; k2 in the
    loss follows the reverse KL of each step with the prefix distribution held fixed (it misses the cross term
    E[(sum_{t > s} log rho_t) grad log pi_s], what an earlier token costs in later KL), k3 in the loss the same
    for the forward KL."""
    got = _two_step_expected(estimator, placement)
    exact = {"reverse": _grad(_seq_reverse_kl, THETA2), "forward": _grad(_seq_forward_kl, THETA2),
             "per_token_reverse": _grad(lambda t: _per_token_kl(t, forward=False), THETA2),
             "per_token_forward": _grad(lambda t: _per_token_kl(t, forward=True), THETA2),
             "zero": torch.zeros_like(THETA2)}
    follows = [name for name, g in exact.items() if torch.allclose(got, g, atol=1e-10)]
    assert follows == ([] if TWO_STEP[estimator, placement] == "neither" else [TWO_STEP[estimator, placement]]), \
        (estimator, placement, follows)


def test_default_config_follows_the_stated_objective():
    """The default learner configuration's expected gradient is that of beta * KL(pi || pi_ref) over whole sequences."""
    from launch.config import LearnerConfig

    cfg = LearnerConfig()
    assert TWO_STEP[cfg.kl_estimator, cfg.kl_mode] == "reverse" and ONE_STEP[cfg.kl_estimator, cfg.kl_mode] == "reverse"
    assert torch.allclose(_two_step_expected(cfg.kl_estimator, cfg.kl_mode), _grad(_seq_reverse_kl, THETA2), atol=1e-10)


def test_soft_value_needs_the_kl_in_the_loss():
    """Per-token advantages cannot carry a sequence penalty: the config says so in one line, and k2 in the loss passes."""
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="learner.advantage=soft_value .* learner.kl_mode=loss learner.kl_estimator=k2"):
        load_config(None, ["learner.advantage=soft_value"])
    cfg = load_config(None, ["learner.advantage=soft_value", "learner.kl_mode=loss", "learner.kl_estimator=k2"])
    assert (cfg.learner.kl_mode, cfg.learner.kl_estimator) == ("loss", "k2")
