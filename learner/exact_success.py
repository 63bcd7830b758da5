"""Exact success by teacher forcing: the probability that the policy writes the right answer. Pure torch.

On a task whose answer is H tokens that must all be right (the chain task), the
policy's probability of success from a prompt is exactly

    P(success | x) = prod_{i < H} pi(a_i | x, a_<i)

with a the right answer: one forward pass over prompt + right answer gives
every factor (each step conditioned on the correct prefix). Averaged over
held-out prompts it is the held-out success that sampling estimates, without
the sampling noise, and it stays measurable far below 1 / (number of samples),
where the sampled estimate reads 0. The learner owns the model
(`Learner.teacher_forced_logprob`); this module owns only the arithmetic.
"""
from __future__ import annotations

import torch


def teacher_forced_logprob(logits: torch.Tensor, input_ids: torch.Tensor, first: torch.Tensor, horizon: int) -> torch.Tensor:
    """log prod_{i < H} pi(x_{f+i} | x_{<f+i}) = sum_{i < H} log_softmax(logits[b, f+i-1])[x_{f+i}], f = first[b].

    logits (B, L, V) of a causal LM over input_ids (B, L) (position p predicts token p+1; right padding after
    f + H - 1 does not matter); first (B,) long, the position of the first answer token of each row (>= 1);
    horizon H: the answer tokens counted. -> (B,) float32 log-probabilities (exp of it: the exact success).
    """
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    if int(first.min()) < 1 or int(first.max()) + horizon > input_ids.size(1):
        raise ValueError(f"answer positions first..first+{horizon - 1} (first in [{int(first.min())}, {int(first.max())}]) "
                         f"must lie in [1, {input_ids.size(1) - 1}]")
    pos = first.unsqueeze(1) + torch.arange(horizon, device=first.device).unsqueeze(0)  # (B, H) answer positions
    pred = logits.gather(1, (pos - 1).unsqueeze(-1).expand(-1, -1, logits.size(-1))).float()  # (B, H, V)
    logp = torch.log_softmax(pred, -1).gather(-1, input_ids.gather(1, pos).unsqueeze(-1)).squeeze(-1)  # (B, H)
    return logp.sum(-1)
