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


import pytest  # noqa: E402 - after the environment above


@pytest.fixture(autouse=True, scope="module")
def _one_real_model_module_at_a_time(request):
    """`make test` runs two pytest-xdist workers (`--dist loadscope`: a module's tests stay on one worker, so its
    module-scoped run starts once). A module marked `real_model` loads SmolLM2 into an engine or a learner (up to
    ~16 GB): it holds this lock while it runs, so the other worker waits before it starts another such module."""
    if request.node.get_closest_marker("real_model") is None:
        yield
        return
    import fcntl

    with open(os.path.join("/tmp", f"graftrl-tests-real-model-{os.getuid()}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
