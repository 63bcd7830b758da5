"""LearnerGroup: the Learner as a Ray actor (one data-parallel rank on the default path)."""
from __future__ import annotations

import ray

from learner.batch import TrainBatch
from learner.learner import Learner


class LearnerGroup:
    def __init__(self, *, model_dir: str, learner_cfg, seed: int, micro_batch_size: int, env_vars: dict[str, str]):
        actor_cls = ray.remote(Learner).options(num_cpus=learner_cfg.num_cpus, num_gpus=learner_cfg.num_gpus,
                                                runtime_env={"env_vars": env_vars})
        self.actor = actor_cls.remote(model_dir=model_dir, learner_cfg=learner_cfg, seed=seed,
                                      micro_batch_size=micro_batch_size)
        ray.get(self.actor.get_version.remote())

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return ray.get(self.actor.train_step.remote(batch))

    def async_weights(self) -> ray.ObjectRef:
        """Object ref of the current weights as safetensors bytes (serialised once, shared by all actors)."""
        return self.actor.weights_bytes.remote()

    def version(self) -> int:
        return ray.get(self.actor.get_version.remote())

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        return ray.get(self.actor.sequence_logprobs.remote(token_ids))

    def shutdown(self) -> None:
        ray.kill(self.actor)
