"""TrainBatch: what the learner needs from rollouts, and how it is built. Pure Python/torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from protocol.messages import Rollout
from learner.objectives import sequence_advantages, soft_value_advantages


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
    rewards: list[float] | None = None
    """Outcome reward of each sample (needed when the learner puts the KL in the reward)."""
    group_ids: list[int] | None = None
    """Baseline group of each sample (continuations of one start); needed with the KL in the reward."""
    forced: list[bool] | None = None
    """The last context token was forced at a branch point (masked, zero gradient; see objectives)."""
    token_advantages: list[list[float]] | None = None
    """Per-token advantages (soft-value); when set they replace `advantages` in the loss."""

    def __len__(self) -> int:
        return len(self.token_ids)

    def is_finite(self) -> bool:
        rows = [self.advantages, self.rewards or []] + self.behaviour_logprobs + (self.token_advantages or [])
        return all(math.isfinite(x) for row in rows for x in row)

    def select(self, idx: list[int]) -> "TrainBatch":
        """The samples at `idx` (a data-parallel shard or a micro-batch)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return TrainBatch(context_ids=pick(self.context_ids), token_ids=pick(self.token_ids),
                          behaviour_logprobs=pick(self.behaviour_logprobs), advantages=pick(self.advantages),
                          versions=pick(self.versions), rewards=pick(self.rewards), group_ids=pick(self.group_ids),
                          forced=pick(self.forced), token_advantages=pick(self.token_advantages))


def build_train_batch(rollouts: list[Rollout], *, advantage: str, nudge: float,
                      values: list[list[float]] | None = None, rewards: list[float] | None = None) -> TrainBatch:
    """Group continuations by request (same start), compute baselined advantages.

    `advantage` is one of learner.names.ADVANTAGES. For `soft_value`,
    `values[i]` holds V(s_0), ..., V(s_{n-1}) along rollout i's n new tokens
    (s_t = its context + first t new tokens; from the prefix store's
    `soft_values`); V after the last token is its reward.
    The sequence advantage is then r - V(s_0) + nudge.
    `rewards[i]`, when given, replaces rollout i's outcome reward (learner.signal=preference: its preference
    signal mean_j p(Y_i > Y_j) against its group, whose `group` advantage is p - 1/2 + nudge).
    """
    rewards = torch.tensor([r.reward for r in rollouts] if rewards is None else rewards, dtype=torch.float64)
    groups = torch.tensor([r.request_id for r in rollouts])
    token_adv = None
    if advantage == "soft_value":
        if values is None or len(values) != len(rollouts) or any(len(v) != len(r.token_ids) for v, r in zip(values, rollouts)):
            raise ValueError("advantage 'soft_value' needs values[i] = V along each rollout's new tokens (one per token)")
        T = max(len(r.token_ids) for r in rollouts)
        V = torch.zeros((len(rollouts), T + 1), dtype=torch.float64)
        mask = torch.zeros((len(rollouts), T), dtype=torch.float64)
        for i, (v, r) in enumerate(zip(values, rollouts)):
            n = len(r.token_ids)
            V[i, :n] = torch.tensor(v, dtype=torch.float64)
            V[i, n] = r.reward
            mask[i, :n] = 1
        A = soft_value_advantages(V, mask, nudge=nudge)
        token_adv = [A[i, : len(r.token_ids)].tolist() for i, r in enumerate(rollouts)]
        adv = rewards - V[:, 0] + nudge
    else:
        adv = sequence_advantages(rewards, groups, advantage, nudge=nudge)
    return TrainBatch(context_ids=[r.prompt_ids + r.prefix_ids for r in rollouts],
                      token_ids=[r.token_ids for r in rollouts],
                      behaviour_logprobs=[r.logprobs for r in rollouts],
                      advantages=adv.tolist(), versions=[r.policy_version for r in rollouts],
                      rewards=rewards.tolist(), group_ids=groups.tolist(), forced=[r.forced for r in rollouts],
                      token_advantages=token_adv)


def collate(batch: TrainBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad context + continuation into tensors.

    input_ids (B, L); cont_index (B, T) positions in input_ids of continuation
    tokens; mask (B, T); behaviour (B, T); advantages (B,), or (B, T) when the
    batch has per-token advantages; context_len (B,); forced (B,) bool.
    Context (prompt + stored prefix, including a forced branch token) is
    never in `mask`.
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
    tok_adv = torch.zeros((B, T)) if batch.token_advantages is not None else None
    for i, (ctx, tok, blp) in enumerate(zip(batch.context_ids, batch.token_ids, batch.behaviour_logprobs)):
        n = len(ctx) + len(tok)
        input_ids[i, :n] = torch.tensor(ctx + tok)
        attn[i, :n] = 1
        cont_index[i, : len(tok)] = torch.arange(len(ctx), n)
        mask[i, : len(tok)] = 1
        behaviour[i, : len(tok)] = torch.tensor(blp)
        if tok_adv is not None:
            tok_adv[i, : len(tok)] = torch.tensor(batch.token_advantages[i])
    adv = tok_adv if tok_adv is not None else torch.tensor(batch.advantages, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attn, "cont_index": cont_index, "mask": mask,
            "behaviour": behaviour, "advantages": adv,
            "context_len": torch.tensor([len(c) for c in batch.context_ids]),
            "forced": torch.tensor(batch.forced if batch.forced is not None else [False] * B)}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, cont_index: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """log pi(x_j | x_<j) at the continuation positions j = cont_index.  logits (B, L - offset, V) -> (B, T).

    logits[:, i] are the logits at input position offset + i (offset > 0: the model kept only the last ones)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L - offset, V)
    prev = (cont_index - 1 - offset).clamp(min=0)  # logits at j-1 predict token j
    tok = input_ids.gather(1, cont_index)  # (B, T)
    rows = logp.gather(1, prev.unsqueeze(-1).expand(-1, -1, logp.size(-1)))  # (B, T, V)
    return rows.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
