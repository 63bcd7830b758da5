"""TrainBatch: what the learner needs from rollouts, and how it is built. Pure Python/torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actors.messages import Rollout
from learner.objectives import group_advantages


@dataclass
class TrainBatch:
    context_ids: list[list[int]]
    """Prompt + stored prefix of each sample (not trained on)."""
    token_ids: list[list[int]]
    """Sampled continuation tokens (trained on)."""
    behaviour_logprobs: list[list[float]]
    """Logprob of each continuation token under the policy that sampled it."""
    advantages: list[float]
    """One advantage per sample (applied to each of its tokens)."""
    versions: list[int]
    """Policy version that generated each sample."""

    def __len__(self) -> int:
        return len(self.token_ids)

    def is_finite(self) -> bool:
        return all(math.isfinite(a) for a in self.advantages) and all(
            math.isfinite(x) for row in self.behaviour_logprobs for x in row)


def build_train_batch(rollouts: list[Rollout], *, advantage: str, nudge: float) -> TrainBatch:
    """Group continuations by request (same start), compute group-baselined advantages."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    groups = torch.tensor([r.request_id for r in rollouts])
    adv = group_advantages(rewards, groups, normalize=(advantage == "group_norm"), nudge=nudge)
    return TrainBatch(context_ids=[r.prompt_ids + r.prefix_ids for r in rollouts],
                      token_ids=[r.token_ids for r in rollouts],
                      behaviour_logprobs=[r.logprobs for r in rollouts],
                      advantages=adv.tolist(), versions=[r.policy_version for r in rollouts])


def collate(batch: TrainBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad context + continuation into tensors.

    input_ids (B, L); cont_index (B, T) positions in input_ids of continuation
    tokens; mask (B, T); behaviour (B, T); advantages (B,).
    """
    seqs = [c + t for c, t in zip(batch.context_ids, batch.token_ids)]
    L = max(map(len, seqs))
    T = max(len(t) for t in batch.token_ids)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    cont_index = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    behaviour = torch.zeros((B, T))
    for i, (ctx, tok, blp) in enumerate(zip(batch.context_ids, batch.token_ids, batch.behaviour_logprobs)):
        n = len(ctx) + len(tok)
        input_ids[i, :n] = torch.tensor(ctx + tok)
        attn[i, :n] = 1
        cont_index[i, : len(tok)] = torch.arange(len(ctx), n)
        mask[i, : len(tok)] = 1
        behaviour[i, : len(tok)] = torch.tensor(blp)
    return {"input_ids": input_ids, "attention_mask": attn, "cont_index": cont_index, "mask": mask,
            "behaviour": behaviour, "advantages": torch.tensor(batch.advantages, dtype=torch.float32)}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, cont_index: torch.Tensor) -> torch.Tensor:
    """log pi(x_j | x_<j) at the continuation positions j = cont_index.  logits (B, L, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    prev = (cont_index - 1).clamp(min=0)  # logits at j-1 predict token j
    tok = input_ids.gather(1, cont_index)  # (B, T)
    rows = logp.gather(1, prev.unsqueeze(-1).expand(-1, -1, logp.size(-1)))  # (B, T, V)
    return rows.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
