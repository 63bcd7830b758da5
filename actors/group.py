"""RolloutGroup: rollout workers as Ray actors, request routing, weight broadcast.

Routing: a request for a stored prefix goes to the actor that last generated
for that root (its vLLM prefix cache likely still holds the KV); otherwise to
the actor with the fewest samples queued in this call.
"""
from __future__ import annotations

import ray

from actors.messages import Rollout, RolloutRequest
from actors.rollout_worker import RolloutWorker


class RolloutGroup:
    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, seed: int, env_vars: dict[str, str]):
        self.cfg = rollout_cfg
        actor_cls = ray.remote(RolloutWorker).options(
            num_cpus=rollout_cfg.num_cpus_per_actor, num_gpus=rollout_cfg.num_gpus_per_actor,
            runtime_env={"env_vars": {**env_vars, "VLLM_CPU_KVCACHE_SPACE": str(rollout_cfg.kv_cache_gib)}})
        self.actors = [actor_cls.remote(model_dir=model_dir, rollout_cfg=rollout_cfg, task_cfg=task_cfg,
                                        actor_id=i, seed=seed + i) for i in range(rollout_cfg.num_actors)]
        ray.get([a.get_version.remote() for a in self.actors])  # wait until every engine is up
        self.root_owner: dict[str, int] = {}

    def route(self, requests: list[RolloutRequest]) -> list[list[RolloutRequest]]:
        """Assign each request to an actor: prefix affinity first, then least queued samples."""
        queues: list[list[RolloutRequest]] = [[] for _ in self.actors]
        load = [0] * len(self.actors)
        for req in sorted(requests, key=lambda r: not r.prefix_ids):  # place affinity-bound requests first
            owner = self.root_owner.get(req.root_id) if req.prefix_ids else None
            i = owner if owner is not None else min(range(len(load)), key=load.__getitem__)
            queues[i].append(req)
            load[i] += req.n
            self.root_owner[req.root_id] = i
        return queues

    def generate(self, requests: list[RolloutRequest], *, temperature: float | None = None) -> list[Rollout]:
        queues = self.route(requests)
        refs = [a.generate.remote(q, temperature=temperature) for a, q in zip(self.actors, queues) if q]
        return [r for batch in ray.get(refs) for r in batch]

    def update_weights(self, payload_ref: ray.ObjectRef, version: int) -> None:
        """Every actor loads the same object-store copy of the weights."""
        ray.get([a.update_weights.remote(payload_ref, version) for a in self.actors])

    def sequence_logprobs(self, token_ids: list[int], actor: int = 0) -> list[float]:
        return ray.get(self.actors[actor].sequence_logprobs.remote(token_ids))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
