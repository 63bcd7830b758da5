"""A real RolloutGroup on the default tiny base model in a fresh local Ray, for the slow engine tests."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def local_rollout_group(**rollout_over):
    """Yields (group, model_dir); `rollout_over` are RolloutConfig fields. Ray and the actors stop afterwards."""
    import ray

    from actors.group import RolloutGroup
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars
    from launch.config import ModelConfig, RolloutConfig, TaskConfig

    model_dir = os.environ.get("GRAFTRL_TINY_MODEL") or ensure_base_model(ModelConfig(), TaskConfig())
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             log_to_driver=False)
    cfg = RolloutConfig(**rollout_over)
    group = RolloutGroup(model_dir=model_dir, rollout_cfg=cfg, task_cfg=TaskConfig(), seed=0,
                         env_vars=actor_env_vars(cfg.kv_cache_gib))
    try:
        yield group, model_dir
    finally:
        group.shutdown()
        ray.shutdown()
