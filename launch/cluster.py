"""Connect to Ray: an existing cluster when one is given, else a local loopback-only one."""
from __future__ import annotations

import os

from actors.pause_points import forwarded_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def actor_env_vars(kv_cache_gib: int) -> dict[str, str]:
    """Environment every actor needs (the vLLM CPU cache size, a DeepSpeed accelerator set by the user, imports of this
    repo, a fault-injection test's pause points)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if "DS_ACCELERATOR" in os.environ:  # else each learner picks CUDA when Ray gave it a GPU, the CPU otherwise
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    env.update(forwarded_env())
    if not os.environ.get("RAY_JOB_ID"):  # under `ray job submit` the working_dir is already importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return env


def connect(ray_cfg) -> str:
    """ray.init(); returns 'cluster' or 'local'. A local cluster binds to 127.0.0.1 and runs no dashboard."""
    import ray

    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True, configure_logging=True, logging_level="WARNING")
    return "local"
