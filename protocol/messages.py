"""Typed messages that cross actor boundaries (driver <-> rollout actors <-> store <-> learner).

Plain dataclasses of Python lists and scalars: cheap to pickle through Ray,
readable in a debugger, no tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutRequest:
    request_id: int
    """Unique per step; continuations of one request form one baseline group."""
    root_id: str
    """Task prompt identity (the key of its prefix tree)."""
    prompt_ids: list[int]
    """Token ids of the task prompt (never trained on)."""
    prefix_ids: list[int] = field(default_factory=list)
    """Stored continuation prefix to re-enter; empty for a root start (never trained on)."""
    forced: bool = False
    """The last prefix token was forced at the branch point (a top-k alternative), not sampled there."""
    n: int = 1
    """Number of continuations to sample from prompt + prefix."""
    branch_ref: int = -1
    """Store handle of the branch point this request re-enters (-1 for a root start)."""


@dataclass
class Rollout:
    request_id: int
    root_id: str
    prompt_ids: list[int]
    prefix_ids: list[int]
    """Context continuation tokens taken from the store (masked from the loss)."""
    token_ids: list[int]
    """Newly sampled tokens (trained on)."""
    logprobs: list[float]
    """Behaviour-policy logprob of each new token."""
    entropy: list[float]
    """Entropy estimate of the sampling distribution at each new token (from top-k)."""
    top1_logprobs: list[float]
    """Logprob of the most likely token at each new position (1 - max prob = 1 - exp of it)."""
    alt_token_ids: list[int]
    """Most likely token other than the sampled one at each new position (-1 if top-k had none)."""
    alt_logprobs: list[float]
    """Its logprob (-inf... stored as -1e9 when absent); what a forced branch would start from."""
    reward: float
    """Outcome reward of prefix + new tokens from the task verifier."""
    policy_version: int
    """Learner update count of the weights that generated the new tokens."""
    actor_id: int
    """Which rollout actor generated it."""
    branch_ref: int = -1
    forced: bool = False
    """Copied from the request: prefix_ids[-1] was forced at the branch point."""
    cached_tokens: int = 0
    """Prompt + prefix tokens whose KV the engine took from its prefix cache (same for all continuations of a request)."""

    @property
    def continuation(self) -> list[int]:
        """Full continuation after the prompt: stored prefix + new tokens."""
        return self.prefix_ids + self.token_ids


@dataclass
class BranchPoint:
    root_id: str
    prompt_ids: list[int]
    prefix_ids: list[int]
    """Continuation tokens before the branch position; sampling resumes after them."""
    token_id: int
    """The token stored at the branch position (resampling may replace it)."""
    forced_token: int
    """Action `force`: the top-k alternative to put at the branch position; -1 for `resample`."""
    score: float
    """Scorer value that ranked this position."""
    ref: int
    """Handle to release once the continuations are inserted."""
    entropy: float = float("nan")
    """Entropy estimate of the policy at the fork when it was stored (what the tree/ metrics report)."""
