import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed's own detection assumes CUDA; the learner tests run on a GPU where one is seen
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`): a module's tests stay on one worker, so
    its module-scoped run starts once; the modules that load the real model into an engine or a learner
    (`real_model` mark) share one group, so no two of them hold ~10 GB at the same time."""
    import pytest

    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        heavy = item.get_closest_marker("real_model") is not None
        item.add_marker(pytest.mark.xdist_group("real_model" if heavy else item.nodeid.split("::")[0]))
