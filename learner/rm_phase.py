"""The `preferences` phase of a training step: score -> select queries -> ask the rater -> train the reward model
-> the policy's signal. Driver side; no Ray, no DeepSpeed (the reward model is behind `rm`, a RewardModelClient or
anything with its score / add / train / save / load calls).

Per step, for the step's rollouts grouped by request (the responses sampled for one prompt):
1. score every response with the reward model: point reward r (B,) and particle rewards R (B, K);
2. online, while labels remain: for up to `queries_per_step` groups (in a seeded random order) the selector
   (`preference.query_selection`) picks one pair, the rater chooses, the choice is kept;
   before training on them the new choices measure the reward model (`rm/heldout_accuracy`: is the point head's
   order the rater's? progressive validation: every choice is held out once, at no extra label cost);
3. the reward model trains `updates_per_step` times on all choices so far, then scores the responses again;
4. the signal of response i is s_i = mean_{j in its group, j != i} sigmoid(r_i - r_j) (learner.reward_model.
   preference_signal); the batch's `group` advantage turns it into s_i - 1/2 and learner.nudge adds epsilon.
Offline mode asks nothing during training: the first call draws all `max_labels` queries from base-policy
rollouts of fresh prompts (`generate_base`), trains the reward model `offline_updates` times and freezes it.
Online mode with `warmup_labels` > 0 first asks that many queries the same way, but with its own query selection
and `updates_per_step` reward-model updates after every batch, so the policy's first update follows a reward
model that has already seen data; these labels count against the budget like every other.

Metrics (`rm/`): labels_used, new_labels, heldout_accuracy, chosen_pair_variance (var_k of the preference
probability of the asked pairs, before training), pair_variance_mean (the same over every distinct pair of the
step), loss / point_loss / ensemble_loss / accuracy of the updates, signal_std, unanswerable (file rater).
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import OrderedDict

import torch

from learner.query_selection import pair_variances, select_pair
from learner.reward_model import preference_signal


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class PreferencePhase:
    def __init__(self, rm, rater, pref_cfg, *, seed: int, generate_base=None):
        """generate_base(): base-policy rollouts of a batch of fresh prompts (offline mode and the online warm-up)."""
        self.rm, self.rater, self.cfg = rm, rater, pref_cfg
        self.generate_base = generate_base
        self.rng = random.Random(f"queries:{seed}")
        self.offline_done = False  # offline: the collection ran; online: the warm-up ran
        self.unanswerable = 0

    def _remaining(self) -> float:
        left = self.rater.labels.remaining()
        return math.inf if left is None else left

    def _ask(self, rollouts, point, particles, groups, limit: int) -> tuple[list, dict]:
        """Up to `limit` queries, one per group; the new choices and what they measured before training."""
        new, chosen_var, agree, all_var = [], [], [], []
        order = list(groups)
        self.rng.shuffle(order)
        from actors.raters import Unanswerable

        for gid in order:
            idx = groups[gid]
            keys = [tuple(rollouts[i].prefix_ids + rollouts[i].token_ids) for i in idx]
            P = torch.tensor([particles[i] for i in idx], dtype=torch.float64)  # (n, K)
            V = pair_variances(P)
            all_var += [float(V[a, b]) for a in range(len(idx)) for b in range(a + 1, len(idx)) if keys[a] != keys[b]]
            if len(new) >= limit or self._remaining() <= 0:
                continue
            pair = select_pair(self.cfg.query_selection, P, self.rng, keys)
            if pair is None:
                continue
            a, b = idx[pair[0]], idx[pair[1]]
            ra, rb = rollouts[a], rollouts[b]
            try:
                choice = self.rater.ask(ra.prompt_ids, ra.prefix_ids + ra.token_ids, rb.prefix_ids + rb.token_ids)
            except Unanswerable:
                self.unanswerable += 1
                continue
            new.append((ra.prompt_ids + ra.prefix_ids + ra.token_ids, rb.prompt_ids + rb.prefix_ids + rb.token_ids, choice))
            chosen_var.append(float(V[pair]))
            agree.append(float((point[a] > point[b]) == (choice == 0)))
        return new, {"rm/new_labels": len(new), "rm/heldout_accuracy": _mean(agree),
                     "rm/chosen_pair_variance": _mean(chosen_var), "rm/pair_variance_mean": _mean(all_var)}

    @staticmethod
    def _groups(rollouts) -> OrderedDict:
        groups: OrderedDict = OrderedDict()
        for i, r in enumerate(rollouts):
            groups.setdefault(r.request_id, []).append(i)
        return groups

    def _ask_base(self, labels: float, per_batch: float, updates_per_batch: int) -> tuple[dict, int]:
        """Queries about base-policy batches of fresh prompts until `labels` are asked or the budget is spent,
        at most `per_batch` per batch, `updates_per_batch` reward-model updates after each; (metrics, batches)."""
        metrics, batches, used = {}, 0, self.rater.labels.used
        while self._remaining() > 0 and self.rater.labels.used - used < labels and batches < 1000:
            rollouts = self.generate_base()
            batches += 1
            point, particles = self.rm.score([r.prompt_ids + r.prefix_ids + r.token_ids for r in rollouts])
            limit = min(per_batch, labels - (self.rater.labels.used - used))
            new, metrics = self._ask(rollouts, point, particles, self._groups(rollouts), limit=limit)
            self.rm.add(new)
            if new and updates_per_batch:
                metrics.update(self.rm.train(updates_per_batch))
        return metrics, batches

    def _offline(self) -> dict:
        """All labels from base-policy rollouts, then `offline_updates` reward-model updates; once."""
        self.offline_done = True
        metrics, batches = self._ask_base(math.inf, math.inf, 0)
        metrics.update(self.rm.train(self.cfg.offline_updates))
        metrics["rm/offline_batches"] = batches
        return metrics

    def _warmup(self) -> dict:
        """Online: `warmup_labels` queries about base-policy rollouts, `updates_per_step` updates after each batch."""
        self.offline_done = True
        metrics, batches = self._ask_base(self.cfg.warmup_labels, self.cfg.queries_per_step, self.cfg.updates_per_step)
        metrics["rm/warmup_batches"] = batches
        return metrics

    def __call__(self, rollouts, step: int) -> tuple[list[float], dict]:
        """The preference signal of every rollout (to replace its reward in the batch) and the step's rm/ metrics."""
        metrics: dict = {}
        if self.cfg.mode == "offline" and not self.offline_done:
            metrics.update(self._offline())
        elif self.cfg.mode == "online" and self.cfg.warmup_labels > 0 and not self.offline_done:
            metrics.update(self._warmup())
        groups = self._groups(rollouts)
        seqs = [r.prompt_ids + r.prefix_ids + r.token_ids for r in rollouts]
        point, particles = self.rm.score(seqs)
        if self.cfg.mode == "online" and self._remaining() > 0:
            new, asked = self._ask(rollouts, point, particles, groups, limit=self.cfg.queries_per_step)
            metrics.update(asked)
            self.rm.add(new)
            if new:  # once the budget is spent the reward model is fixed
                trained = self.rm.train(self.cfg.updates_per_step)
                metrics.update(trained)
                if trained.get("rm/loss") is not None:
                    point, _ = self.rm.score(seqs)
        gids = torch.tensor([r.request_id for r in rollouts])
        signal = preference_signal(torch.tensor(point, dtype=torch.float64), gids)
        metrics.update({"rm/labels_used": self.rater.labels.used, "rm/unanswerable": self.unanswerable,
                        "rm/signal_std": float(signal.std()) if len(rollouts) > 1 else 0.0})
        return signal.tolist(), metrics

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """<path>/rm/ (the reward model and its choices) and <path>/phase.json (rater, query RNG, counters)."""
        os.makedirs(path, exist_ok=True)
        self.rm.save(path)
        state = {"rater": self.rater.state_dict(), "rng": repr(self.rng.getstate()), "offline_done": self.offline_done,
                 "unanswerable": self.unanswerable}
        with open(os.path.join(path, "phase.json"), "w") as f:
            json.dump(state, f)

    def restore(self, path: str) -> None:
        import ast

        self.rm.load(path)
        with open(os.path.join(path, "phase.json")) as f:
            state = json.load(f)
        self.rater.load_state_dict(state["rater"])
        self.rng.setstate(ast.literal_eval(state["rng"]))
        self.offline_done, self.unanswerable = state["offline_done"], state["unanswerable"]


def make_preference_phase(comp, cfg, generate) -> PreferencePhase:
    """The phase of a run: its rater (`preference.rater`), its reward model (comp.reward_model) and, for offline
    mode, base-policy batches of fresh prompts drawn from their own stream (`generate(requests) -> rollouts`)."""
    import itertools

    from actors.raters import make_rater
    from launch.trainer import make_requests

    tc = cfg.train
    rng, batch_no = random.Random(f"offline:{tc.seed}"), itertools.count()

    def generate_base():
        step = 10_000_000 + next(batch_no)  # request ids of their own, never a training step's
        return generate(make_requests(comp.task, rng, [], prompts=tc.prompts_per_step, n=tc.samples_per_request,
                                      step=step))

    return PreferencePhase(comp.reward_model, make_rater(cfg.preference, comp.task, seed=tc.seed), cfg.preference,
                           seed=tc.seed, generate_base=generate_base)
