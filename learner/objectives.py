"""KL-regularised policy-gradient objectives. Tensors in, tensors out; no Ray, no DeepSpeed.

Shapes: B samples, T continuation positions (right-padded), `mask` (B, T) is
1 on tokens that are trained on. Context tokens of a branched rollout (the
stored prefix it re-entered) are never in the mask: the continuation was
sampled *given* them, so they carry no gradient signal of this sample.

Objective (per prompt x):  max_pi  E_{y~pi}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)).
"""
from __future__ import annotations

import torch

ADVANTAGES = ("group", "group_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize: bool = False,
                     nudge: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_{j in g(i)} r_j   [/ (std_{j in g(i)} r_j + eps) if normalize]   + nudge.

    A group is every continuation sampled from one start: the prompt (the
    root-start, GRPO-style baseline) or one stored prefix (the sibling
    baseline of a branch point). `nudge` is the affirmative-nudge epsilon
    added to every signal (Efficient Exploration at Scale, arXiv 2603.17378).
    rewards, group_ids: (B,) -> (B,)
    """
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, rewards) / count
    adv = rewards - mean[inv]
    if normalize:
        var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, adv**2) / count
        adv = adv / (var.sqrt()[inv] + eps)
    return adv + nudge


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from a token sampled from pi; log rho = logp - ref_logp.

    k1 = log rho;  k2 = (log rho)^2 / 2;  k3 = exp(-log rho) - 1 + log rho  (unbiased, >= 0; Schulman 2020).
    """
    log_rho = logp - ref_logp
    if estimator == "k1":
        return log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    if estimator == "k3":
        return torch.expm1(-log_rho) + log_rho
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, ref_logp: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, *, clip_ratio: float, kl_coef: float,
                kl_estimator: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = mean_t [ -min(rho_t A, clip(rho_t, 1-c, 1+c) A) + beta * k(logp_t, ref_logp_t) ]  over masked tokens.

    rho_t = pi(y_t) / pi_behaviour(y_t) corrects for samples drawn by an older
    policy version; the clip bounds how far one step moves on them.
    logp, behaviour_logp, ref_logp, mask: (B, T); advantages: (B,) -> scalar loss.
    """
    ratio = torch.exp(logp - behaviour_logp)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv)
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    pg_loss = -masked_mean(surrogate, mask)
    kl_mean = masked_mean(kl, mask)
    loss = pg_loss + kl_coef * kl_mean
    clipped = ((ratio - 1).abs() > clip_ratio).to(logp.dtype)
    return loss, {"pg_loss": pg_loss.detach(), "kl": kl_mean.detach(), "clip_frac": masked_mean(clipped, mask).detach(),
                  "ratio_mean": masked_mean(ratio, mask).detach()}
