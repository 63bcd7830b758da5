"""A Bradley-Terry reward model that knows what it does not know. Torch only: no Ray, no DeepSpeed.

    p(Y > Y' | X) = sigmoid(r(X, Y) - r(X, Y'))                                    (Bradley-Terry)

r reads the backbone's last-layer embedding e = phi(X, Y) (the final hidden state at the sequence's last token,
layer-normalised without parameters; the backbone is the policy's own architecture, initialised from the base
model). On top of e sit

    point head    r(e)            = w . e + b                                        trained, with the backbone
    K particles   r_k(e)          = sg[r(e)] + s * prior_k(sg[e]) + diff_k(sg[e])     k = 1..K

an epistemic neural network in the epinet form of Osband et al. (arXiv 2107.08924): prior_k are small MLPs with
random weights that never train (they make the particles disagree where there is no data), diff_k are MLPs of
the same shape that train (initialised with a zero output layer, so at the start r_k = r + s prior_k), and sg is
stop-gradient. Both losses are the Bradley-Terry negative log-likelihood of the observed choices,

    L_point = mean_i  softplus(-(r(w_i) - r(l_i)))
    L_ens   = mean_i mean_k  softplus(-(r_k(w_i) - r_k(l_i)))                       (w_i: the chosen response)

and the update minimises L_point + L_ens: the point head and the backbone get gradient only from L_point, the
differential heads only from L_ens (the backbone is detached there), the priors from neither. Where choices were
observed every particle is pulled to the same fit and their preference probabilities agree; elsewhere the priors
keep them apart. That disagreement, var_k sigmoid(r_k(Y) - r_k(Y')), is what query selection reads.

What the reward model does not know: where its inputs came from (the rater, the rollouts), how it is optimised
(learner/rm_worker.py owns the optimizer and the DeepSpeed engine).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(d_in: int, hidden: int) -> nn.Sequential:
    """d_in -> hidden -> ReLU -> 1."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class RewardModel(nn.Module):
    """backbone (input_ids, attention_mask) -> last hidden states (B, L, d); point head + K prior/differential heads.

    `backbone` is any module whose output has `.last_hidden_state` (a transformers base model, e.g. LlamaModel
    from `AutoModel.from_pretrained(policy_dir)`) or is that tensor."""

    def __init__(self, backbone: nn.Module, hidden_size: int, *, ensemble_size: int = 8, head_hidden: int = 64,
                 prior_scale: float = 1.0, seed: int = 0):
        super().__init__()
        if ensemble_size < 2:
            raise ValueError(f"reward model: ensemble_size={ensemble_size} must be >= 2 (the spread is the uncertainty)")
        self.backbone, self.hidden_size, self.prior_scale = backbone, hidden_size, float(prior_scale)
        gen = torch.Generator().manual_seed(seed)  # the heads depend on the seed only, not on the global RNG
        self.point = nn.Linear(hidden_size, 1)
        self.priors = nn.ModuleList(mlp(hidden_size, head_hidden) for _ in range(ensemble_size))
        self.diffs = nn.ModuleList(mlp(hidden_size, head_hidden) for _ in range(ensemble_size))
        with torch.no_grad():
            for m in [self.point, *self.priors, *self.diffs]:
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) / hidden_size**0.5 if p.dim() > 1 else torch.zeros(p.shape))
            for prior in self.priors:  # priors: unit-scale random functions of e (fan-in scaling on each layer)
                prior[2].weight.mul_(hidden_size**0.5 / head_hidden**0.5)
            for d in self.diffs:
                d[2].weight.zero_()
        self.priors.requires_grad_(False)

    @property
    def ensemble_size(self) -> int:
        return len(self.priors)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """e = layer_norm(h), h the last layer's hidden state at each row's last real token.  (B, L) -> (B, d).

        The parameter-free layer norm puts e at unit scale whatever the backbone's final norm weights are, so the
        priors' spread (and `prior_scale`) means the same thing on every backbone."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        h = getattr(out, "last_hidden_state", out).float()  # (B, L, d)
        last = attention_mask.long().sum(1) - 1  # (B,) rows are right-padded
        e = h[torch.arange(h.size(0), device=h.device), last]  # (B, d)
        return F.layer_norm(e, (e.size(-1),))

    def heads(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(point rewards (B,), particle rewards (B, K)); the particles see e and the point reward detached."""
        point = self.point(e).squeeze(-1)  # (B,)
        e_sg = e.detach()
        prior = torch.cat([p(e_sg) for p in self.priors], -1)  # (B, K)
        diff = torch.cat([d(e_sg) for d in self.diffs], -1)  # (B, K)
        return point, point.detach().unsqueeze(-1) + self.prior_scale * prior + diff

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.embed(input_ids, attention_mask))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone, point head and differential heads (never the priors)."""
        return [p for p in self.parameters() if p.requires_grad]


def bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry NLL, mean over pairs (and particles): softplus(-(r_w - r_l)), w the chosen one.

    r_a, r_b: (N,) or (N, K); choice (N,) with 0 = A chosen, 1 = B chosen."""
    sign = (1.0 - 2.0 * choice.to(r_a.dtype))  # +1: A won, -1: B won
    if r_a.dim() == 2:
        sign = sign.unsqueeze(-1)
    return F.softplus(-sign * (r_a - r_b)).mean()


def pair_losses(model: RewardModel, ids_a, mask_a, ids_b, mask_b, choice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_point + L_ens on a batch of N pairs (both responses of every pair in one backbone pass).

    ids_*, mask_* (N, L); choice (N,) -> loss, metrics {point_loss, ensemble_loss, accuracy (point head)}."""
    n = ids_a.size(0)
    width = max(ids_a.size(1), ids_b.size(1))
    ids = torch.cat([F.pad(ids_a, (0, width - ids_a.size(1))), F.pad(ids_b, (0, width - ids_b.size(1)))])  # (2N, L)
    mask = torch.cat([F.pad(mask_a, (0, width - mask_a.size(1))), F.pad(mask_b, (0, width - mask_b.size(1)))])
    point, particles = model(ids, mask)  # (2N,), (2N, K)
    l_point = bt_loss(point[:n], point[n:], choice)
    l_ens = bt_loss(particles[:n], particles[n:], choice)
    acc = ((point[:n] > point[n:]).long() == (1 - choice.long())).float().mean()
    return l_point + l_ens, {"point_loss": l_point.detach(), "ensemble_loss": l_ens.detach(), "accuracy": acc}


def preference_probs(rewards: torch.Tensor) -> torch.Tensor:
    """P[..., i, j] = sigmoid(r_i - r_j) for the n responses of one prompt.  (n,) -> (n, n); (n, K) -> (K, n, n)."""
    r = rewards.T if rewards.dim() == 2 else rewards  # (K, n) or (n,)
    return torch.sigmoid(r.unsqueeze(-1) - r.unsqueeze(-2))


def preference_signal(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """s_i = mean_{j in g(i), j != i} sigmoid(r_i - r_j): response i's probability of being preferred to another
    response of its group (1/2 for a group of one).  rewards, group_ids (B,) -> (B,).

    The group mean of s is exactly 1/2 (p_ij + p_ji = 1), so the `group` advantage of s is s_i - 1/2, the paper's
    signal p(Y > Y') - 1/2, and `learner.nudge` adds the epsilon."""
    same = group_ids.unsqueeze(0) == group_ids.unsqueeze(1)  # (B, B)
    same.fill_diagonal_(False)
    p = torch.sigmoid(rewards.unsqueeze(1) - rewards.unsqueeze(0))  # (B, B): p[i, j] = p(i > j)
    count = same.sum(1)
    wins = (p * same).sum(1)
    return torch.where(count > 0, wins / count.clamp(min=1), torch.full_like(rewards, 0.5))


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask (N, L) of token sequences (prompt + response)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
