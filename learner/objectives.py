"""KL-regularised policy-gradient objectives. Tensors in, tensors out; no Ray, no DeepSpeed.

Objective (per prompt x):  max_pi  E_{y~pi}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)).
Its gradient is what `kl_penalised_rewards` with k1 (the default, learner.kl_mode=reward) gives in expectation;
the per-token KL in the loss optimises another quantity (see KL_ESTIMATORS, tests/learner/test_kl_gradients.py).

Shapes: B samples, T continuation positions (right-padded), `mask` (B, T) is
1 on tokens that are trained on.

Which tokens carry gradient
---------------------------
* Context tokens of a branched rollout (prompt + the stored prefix it
  re-entered) are never in the mask. The continuation was sampled *given*
  them: the sample is an unbiased draw of pi(. | context), so the score
  function sum_t grad log pi(y_t | context, y_<t) is an unbiased policy
  gradient of the conditional objective E[r | context]; the context tokens
  were drawn by an earlier policy (or the store), not by this sample, and
  have no score term of it.
* A token **forced** at a branch point (`store.branch_action=force`: the
  store puts the best top-k alternative there instead of sampling) is the
  last context token, so it is masked like the rest of the context and
  gets **zero gradient**. This is sound and deliberate: its "behaviour
  probability" is that of a deterministic rule (1 for the chosen token),
  so no importance ratio pi(a)/q(a) relates it to the policy, and an
  `A * grad log pi(a|s)` term for it would be a biased estimator that
  pushes up whatever the store chose regardless of how often pi would
  pick it. What the forced token does affect is the conditioning: its
  continuations are on-policy given it, and their sibling group shares it
  (the baseline compares continuations of the same forced prefix). The
  value of the forced action is still learned through the store: its
  statistics flow into V(s+a) of `soft_value_advantages` for sampled
  tokens that later pass through that node, never as a score term of an
  unsampled token. `forced_token_mask` builds the mask and the tests check
  the token has zero gradient.

Registries (dicts name -> function, looked up with `protocol.registry.lookup`):
`SEQUENCE_ADVANTAGES` (rewards, group ids -> one signal per sample) and
`KL_ESTIMATORS` (log rho -> per-token estimate). Their names, with
`soft_value`, are in learner/names.py, which config validation reads without torch.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from learner.names import ADVANTAGES, KL_ESTIMATORS as KL_ESTIMATOR_NAMES
from protocol.registry import check, lookup


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(inv.max()) + 1 if inv.numel() else 0


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize: bool = False,
                     nudge: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_{j in g(i)} r_j   [/ (std_{j in g(i)} r_j + eps) if normalize]   + nudge.

    A group is every continuation sampled from one start: the prompt (the
    root-start, GRPO-style baseline, the comparison point) or one stored
    prefix (the sibling baseline of a branch point: continuations that share
    that prefix). std is the population std (divide by n). `nudge` is the
    affirmative-nudge epsilon added to every signal (Efficient Exploration
    at Scale, arXiv 2603.17378).
    rewards, group_ids: (B,) -> (B,)
    """
    inv, n_groups = _group_index(group_ids)
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, rewards) / count
    adv = rewards - mean[inv]
    if normalize:
        var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, adv**2) / count
        adv = adv / (var.sqrt()[inv] + eps)
    return adv + nudge


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, nudge: float = 0.0) -> torch.Tensor:
    """A_i = r_i - (sum_{j in g(i)} r_j - r_i) / (n_g - 1)   + nudge    (= n/(n-1) (r_i - mean_g)).

    REINFORCE leave-one-out (Ahmadian et al. 2024): the baseline of sample i
    excludes i, so it is independent of y_i and the estimator is unbiased.
    A group of one has no baseline and gets A = 0 (+ nudge), like `group`.
    rewards, group_ids: (B,) -> (B,)
    """
    inv, n_groups = _group_index(group_ids)
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
    total = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, rewards)
    n = count[inv]
    others = (total[inv] - rewards) / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, rewards - others, torch.zeros_like(rewards))
    return adv + nudge


SEQUENCE_ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "group": group_advantages,
    "group_norm": partial(group_advantages, normalize=True),
    "rloo": rloo_advantages,
}
"""Sequence-level advantages by name: f(rewards (B,), group_ids (B,), *, nudge) -> (B,)."""


def sequence_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, name: str, *, nudge: float = 0.0) -> torch.Tensor:
    """Sequence-level advantage by registry name (`group`, `group_norm`, `rloo`).  (B,), (B,) -> (B,)"""
    if check("advantage", ADVANTAGES, name) == "soft_value":
        raise ValueError("advantage 'soft_value' is per token: use soft_value_advantages with the store's V along each path")
    return SEQUENCE_ADVANTAGES[name](rewards, group_ids, nudge=nudge)


def soft_value(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """V = beta * log mean_j exp(r_j / beta) over continuations r_j from one state.  (n,) -> scalar.

    The value of the KL-regularised objective at state s when the
    continuations are drawn from the reference policy:
    V(s) = max_pi E_pi[r] - beta KL(pi || pi_ref) = beta log E_{pi_ref}[exp(r / beta)].
    It lies between mean(r) (beta -> inf) and max(r) (beta -> 0, returned at beta = 0).
    """
    if beta == 0:
        return rewards.max()
    n = torch.tensor(float(rewards.numel()), dtype=rewards.dtype)
    return beta * (torch.logsumexp(rewards / beta, dim=0) - n.log())


def soft_value_advantages(values: torch.Tensor, mask: torch.Tensor, *, nudge: float = 0.0) -> torch.Tensor:
    """A_t = V(s_{t+1}) - V(s_t) + nudge along each path; V from the prefix store's statistics.

    s_t is the context followed by the first t continuation tokens; s_0 is the
    start the continuation was sampled from (prompt or stored prefix) and the
    value after the last token is the outcome reward itself, V(s_n) = r.
    Under the KL-regularised optimum pi*(a|s) = pi_ref(a|s) exp((V(s+a) - V(s)) / beta),
    so A_t / beta is the log-ratio the optimum puts on token a_t; the sum
    telescopes: sum_t A_t = r - V(s_0) (the sequence signal with the soft
    value of the start as baseline). The store estimates V(s) =
    beta log mean exp(r / beta) from the rollouts that passed through s
    (`PrefixStore.soft_values`, along each rollout's path); they come from recent
    policies, not pi_ref, so V is an estimate, accurate when pi is near pi_ref.
    values: (B, T+1) with values[i, :n_i+1] = V(s_0..s_{n_i}) (the entry after the
    last token of row i must be its reward); mask (B, T) -> (B, T), 0 off the mask.
    """
    adv = values[:, 1:] - values[:, :-1]  # (B, T)
    return (adv + nudge) * mask


def kl_k1(log_rho: torch.Tensor) -> torch.Tensor:
    """k1 = log rho: unbiased estimate of KL(pi || pi_ref) from y ~ pi, of either sign (high variance).

    Expected gradient (tests/learner/test_kl_gradients.py): in the reward (r - beta sum_t k1_t, score function)
    E[(sum_t log rho_t) grad log pi(y)] = grad KL(pi || pi_ref) of whole sequences, the objective's own term; in
    the loss E[grad log pi(y)] = 0: k1 in the loss does nothing in expectation."""
    return log_rho


def kl_k2(log_rho: torch.Tensor) -> torch.Tensor:
    """k2 = (log rho)^2 / 2: >= 0, a biased estimate of KL(pi || pi_ref), low variance.

    Expected gradient in the loss: sum_t E_{y<t ~ pi}[sum_a pi(a) log rho(a) grad log pi(a)], the gradient of
    each token's reverse KL(pi_t || pi_ref_t) with the prefix distribution held fixed: for one token the exact
    reverse KL gradient, for sequences it misses E[(sum_{t>s} log rho_t) grad log pi_s], what an earlier token
    costs in later KL. In the reward it follows neither KL."""
    return 0.5 * log_rho**2


def kl_k3(log_rho: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-log rho) - 1 + log rho: an unbiased, >= 0 estimate of the *value* of KL(pi || pi_ref) (Schulman 2020).

    Its gradient is another KL's: in the loss, d k3 / d log pi = 1 - pi_ref / pi, so the expected gradient is
    sum_a (pi(a) - pi_ref(a)) grad log pi(a) = grad KL(pi_ref || pi), the *forward* KL of each token (prefix
    distribution held fixed). In the reward it follows neither KL. Use it to report the KL, not to optimise it."""
    return torch.expm1(-log_rho) + log_rho


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Per-token estimators of the value of KL(pi || pi_ref) from a token sampled from pi, as functions of log rho = logp -
ref_logp. Which KL the *gradient* follows depends on estimator and placement: k1 in the reward, the sequence-level
reverse KL (the stated objective, the default); k2 in the loss, the per-token reverse KL; k3 in the loss, the
per-token forward KL(pi_ref || pi); k1 in the loss, none (zero); k2/k3 in the reward, neither."""
assert tuple(KL_ESTIMATORS) == KL_ESTIMATOR_NAMES, (tuple(KL_ESTIMATORS), KL_ESTIMATOR_NAMES)
assert (*SEQUENCE_ADVANTAGES, "soft_value") == ADVANTAGES, ((*SEQUENCE_ADVANTAGES, "soft_value"), ADVANTAGES)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref): KL_ESTIMATORS[estimator](logp - ref_logp).  (B, T) -> (B, T)"""
    return lookup("KL estimator", KL_ESTIMATORS, estimator)(logp - ref_logp)


def kl_penalised_rewards(rewards: torch.Tensor, behaviour_logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float, estimator: str) -> torch.Tensor:
    """KL in the reward: r'_i = r_i - beta * sum_t mask_it * k(behaviour_it, ref_it).

    The sampled sequence's own log-ratio (classic RLHF-PPO): with k1 the
    score-function gradient of E[r'] is exactly grad (E[r] - beta KL(pi || pi_ref))
    of whole sequences, up to the baseline (the default configuration); k2/k3
    in the reward follow neither KL (tests/learner/test_kl_gradients.py). Detached: the penalty is a reward, not a loss
    term. Then baseline r' like any reward (group / rloo).
    rewards (B,); behaviour_logp, ref_logp, mask (B, T) -> (B,)
    """
    kl = kl_estimate(behaviour_logp, ref_logp, estimator) * mask  # (B, T)
    return (rewards - kl_coef * kl.sum(-1)).detach()


def forced_token_mask(context_lens: torch.Tensor, forced: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) 1 at the position of the forced branch token (the last context token) of forced rows.

    Not a training mask: it names the tokens that must get zero gradient
    (see the module docstring), for checks and diagnostics.
    context_lens (B,) long, forced (B,) bool -> (B, L) float.
    """
    pos = torch.arange(length, device=context_lens.device).unsqueeze(0)  # (1, L)
    return ((pos == (context_lens - 1).unsqueeze(1)) & forced.unsqueeze(1)).float()


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, ref_logp: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, *, clip_ratio: float, kl_coef: float,
                kl_estimator: str, denom: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = (1/N) sum_{masked t} [ -min(rho_t A_t, clip(rho_t, 1-c, 1+c) A_t) + beta * k(logp_t, ref_logp_t) ].

    rho_t = pi(y_t) / pi_behaviour(y_t) corrects for samples drawn by an older
    policy version; the clip bounds how far one step moves on them (PPO).
    A_t is the sample's advantage on every token (advantages (B,)) or a
    per-token one (advantages (B, T), e.g. soft-value). N is the number of
    masked tokens, or `denom` when given (the token count of the whole
    global batch, so that micro-batches and data-parallel ranks sum to the
    full-batch token mean). Set kl_coef=0 here when the KL is in the reward.
    The KL term's expected gradient is beta/N times: 0 for k1; the per-token reverse KL(pi || pi_ref) gradient for
    k2; the per-token *forward* KL(pi_ref || pi) gradient for k3 (see KL_ESTIMATORS). For the sequence-level
    objective put k1 in the reward instead (`kl_penalised_rewards`).
    logp, behaviour_logp, ref_logp, mask: (B, T) -> scalar loss, metrics (token sums / N).
    """
    n = mask.sum().clamp(min=1) if denom is None else denom
    ratio = torch.exp(logp - behaviour_logp)  # (B, T)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv)
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    pg_loss = -(surrogate * mask).sum() / n
    kl_mean = (kl * mask).sum() / n
    loss = pg_loss + kl_coef * kl_mean if kl_coef else pg_loss
    clipped = ((ratio - 1).abs() > clip_ratio).to(logp.dtype)
    return loss, {"pg_loss": pg_loss.detach(), "kl": kl_mean.detach(), "clip_frac": ((clipped * mask).sum() / n).detach(),
                  "ratio_mean": ((ratio * mask).sum() / n).detach()}
