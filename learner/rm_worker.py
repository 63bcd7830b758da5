"""RewardModelWorker: the epistemic reward model (learner/reward_model.py) on the real stack, with its own DeepSpeed
engine, its choices and its checkpoints. `RewardModelClient` makes it a Ray actor or runs it in-process.

Why its own Ray actor, not a rank inside the learner group:
* it is a different model with a different optimizer, batch (pairs of sequences, not token-level rollouts) and
  learning rate, updated in its own phase (`preferences`) between generation and the policy update; inside the
  learner group every rank would have to carry both models and every collective would have to know which one it
  serves;
* on a cluster it gets its own resources (`preference.num_gpus`): a reward model as large as the policy should
  not take memory from the policy's ZeRO shards, and a small one can share a GPU (a fraction);
* the policy learner stays as it is: it receives a TrainBatch whose per-response rewards are the preference
  signal, and knows nothing of raters or reward models.
The cost is one process and one copy of the backbone (the tiny chain model: ~1 MB; SmolLM2-135M: ~0.5 GB plus
AdamW state). On this 2-core box it reserves no CPU (`preference.num_cpus=0`): it only runs while the rollout
actor and the learner wait for it.

The engine is DeepSpeed ZeRO stage 0 on one rank (the reward model's data are a few thousand pairs: no data
parallelism needed); DeepSpeed gives it the same checkpoint format, accelerator choice and (on GPUs) bf16 path as
the learner. Checkpoints hold the engine state, the choices so far and the minibatch RNG, all without pickles
(learner.learner.safe_load).
"""
from __future__ import annotations

import os
import random
import socket
import time

from learner.reward_model import RewardModel, pad_sequences, pair_losses

_SCORE_CHUNK = 256  # sequences per scoring forward pass


class RewardModelWorker:
    """One process: backbone (AutoModel of the policy's folder) + heads, a DeepSpeed engine, the choices so far."""

    def __init__(self, *, model_dir: str, pref_cfg, seed: int):
        from learner.learner import _dist_env, _weights_only_checkpoint_engine

        with socket.socket() as s:  # its own process group of one: any free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _dist_env(0, 1, port)
        import deepspeed
        import torch
        from transformers import AutoModel

        self.torch = torch
        torch.manual_seed(seed)
        backbone = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        self.pad_id = backbone.config.pad_token_id or 0
        model = RewardModel(backbone, backbone.config.hidden_size, ensemble_size=pref_cfg.ensemble_size,
                            head_hidden=pref_cfg.head_hidden, prior_scale=pref_cfg.prior_scale, seed=seed)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=pref_cfg.lr)
        ds_config = {"train_micro_batch_size_per_gpu": pref_cfg.batch_size, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine._config)
        self.model: RewardModel = self.engine.module
        self.device = self.engine.device
        self.batch_size = int(pref_cfg.batch_size)
        self.pairs: list[tuple[list[int], list[int], int]] = []
        """Every choice so far: (prompt + response A, prompt + response B, 0 if A was chosen else 1)."""
        self.rng = random.Random(f"rm:{seed}")
        self.updates = 0

    def pid(self) -> int:
        return os.getpid()

    def score(self, seqs: list[list[int]]) -> tuple[list[float], list[list[float]]]:
        """Point rewards (N,) and particle rewards (N, K) of token sequences (prompt + response)."""
        torch = self.torch
        self.engine.eval()
        point, particles = [], []
        with torch.no_grad():
            for i in range(0, len(seqs), _SCORE_CHUNK):
                ids, mask = pad_sequences(seqs[i:i + _SCORE_CHUNK], self.pad_id)
                p, k = self.model(ids.to(self.device), mask.to(self.device))
                point += p.float().cpu().tolist()
                particles += k.float().cpu().tolist()
        return point, particles

    def add(self, pairs: list[tuple[list[int], list[int], int]]) -> int:
        """Append choices; returns how many are held."""
        self.pairs += [(list(a), list(b), int(c)) for a, b, c in pairs]
        return len(self.pairs)

    def train(self, updates: int) -> dict[str, float]:
        """`updates` steps of L_point + L_ens, each on `batch_size` choices drawn (with replacement) from all so far."""
        torch, t0 = self.torch, time.perf_counter()
        if not self.pairs or updates <= 0:
            return {"rm/pairs": len(self.pairs), "rm/updates": self.updates}
        self.engine.train()
        sums = {"loss": 0.0, "point_loss": 0.0, "ensemble_loss": 0.0, "accuracy": 0.0}
        for _ in range(updates):
            batch = [self.pairs[self.rng.randrange(len(self.pairs))] for _ in range(min(self.batch_size, len(self.pairs)))]
            ia, ma = pad_sequences([b[0] for b in batch], self.pad_id)
            ib, mb = pad_sequences([b[1] for b in batch], self.pad_id)
            choice = torch.tensor([b[2] for b in batch], device=self.device)
            loss, info = pair_losses(self.engine, ia.to(self.device), ma.to(self.device), ib.to(self.device),
                                     mb.to(self.device), choice)
            self.engine.backward(loss)
            self.engine.step()
            sums["loss"] += float(loss.detach())
            for k in ("point_loss", "ensemble_loss", "accuracy"):
                sums[k] += float(info[k])
        self.updates += updates
        return {**{f"rm/{k}": v / updates for k, v in sums.items()}, "rm/pairs": len(self.pairs),
                "rm/updates": self.updates, "rm/train_s": time.perf_counter() - t0}

    def save(self, ckpt_dir: str) -> str:
        """<ckpt_dir>/rm/: DeepSpeed state (weights, optimizer) + the choices, the minibatch RNG, the update count."""
        client = {"graftrl_rm": {"pairs": self.pairs, "rng": repr(self.rng.getstate()), "updates": self.updates}}
        self.engine.save_checkpoint(ckpt_dir, tag="rm", client_state=client, save_latest=False)
        return os.path.join(ckpt_dir, "rm")

    def load(self, ckpt_dir: str) -> int:
        """Inverse of save; returns the number of choices restored."""
        import ast

        path, client = self.engine.load_checkpoint(ckpt_dir, tag="rm")
        if path is None:
            from learner.learner import CheckpointError

            raise CheckpointError(f"no reward-model checkpoint under {ckpt_dir!r}")
        state = client["graftrl_rm"]
        self.pairs = [(list(a), list(b), int(c)) for a, b, c in state["pairs"]]
        self.rng.setstate(ast.literal_eval(state["rng"]))
        self.updates = int(state["updates"])
        return len(self.pairs)


class RewardModelClient:
    """The reward model as a Ray actor (default) or in this process (local=True, for tests); same calls."""

    def __init__(self, *, model_dir: str, pref_cfg, seed: int, env_vars: dict[str, str] | None = None,
                 local: bool = False):
        kwargs = dict(model_dir=model_dir, pref_cfg=pref_cfg, seed=seed)
        if local:
            self.local, self.actor = RewardModelWorker(**kwargs), None
            return
        import ray

        self.local = None
        cls = ray.remote(RewardModelWorker).options(num_cpus=pref_cfg.num_cpus, num_gpus=pref_cfg.num_gpus,
                                                    max_restarts=0, runtime_env={"env_vars": env_vars or {}})
        self.actor = cls.remote(**kwargs)

    def _call(self, method: str, *args):
        if self.local is not None:
            return getattr(self.local, method)(*args)
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def score(self, seqs):
        return self._call("score", seqs)

    def add(self, pairs):
        return self._call("add", pairs)

    def train(self, updates: int):
        return self._call("train", updates)

    def save(self, ckpt_dir: str) -> str:
        return self._call("save", ckpt_dir)

    def load(self, ckpt_dir: str) -> int:
        return self._call("load", ckpt_dir)

    def pid(self) -> int:
        return self._call("pid")

    def shutdown(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor)
            self.actor = None
