"""The learner on a CUDA GPU gives the CPU learner's update; skipped where no GPU is visible (CI's CPU box).

Each learner runs in its own process because DeepSpeed fixes its accelerator (DS_ACCELERATOR) at import.
The other learner tests are device-agnostic and exercise the CUDA path when run on a GPU machine.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.learner.conftest import learner_cfg, make_batch

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def three_steps(model_dir: str, out: str, **over) -> None:
    """Three updates on the test batch; writes the weights (also through weights_packed), metrics and logprobs."""
    from safetensors.torch import save_file

    from actors.weight_transport import safetensors_views
    from learner.learner import Learner

    L = Learner(model_dir=model_dir, learner_cfg=learner_cfg(**over), seed=0, micro_batch_size=4)
    metrics = [L.train_step(make_batch()) for _ in range(3)]
    state = L.state_dict()
    packed = L.weights_packed()
    buf = bytearray(packed.header) + b"".join(bytes(p) for p in packed.parts)
    from_packed = dict(safetensors_views(buf))
    save_file({**state, **{f"packed.{k}": v.clone() for k, v in from_packed.items()}}, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"device": str(L.device), "ref_device": str(next(L.ref.parameters()).device), "metrics": metrics,
                   "logprobs": L.sequence_logprobs([1, 5, 3, 4, 2])}, f)


def run_learner(accelerator: str, model_dir: str, out: str, **over) -> dict:
    code = f"from tests.learner.test_learner_gpu import three_steps; three_steps({model_dir!r}, {out!r}, **{over!r})"
    env = {**os.environ, "DS_ACCELERATOR": accelerator, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=600)
    from safetensors.torch import load_file

    with open(out + ".json") as f:
        return {**json.load(f), "tensors": load_file(out + ".safetensors")}


@needs_cuda
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_cuda_update_equals_cpu_update(tiny_model_dir, tmp_path, zero_stage):
    cpu = run_learner("cpu", tiny_model_dir, str(tmp_path / "cpu"), zero_stage=zero_stage, kl_mode="reward")
    gpu = run_learner("cuda", tiny_model_dir, str(tmp_path / "gpu"), zero_stage=zero_stage, kl_mode="reward")
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda") and gpu["ref_device"].startswith("cuda")
    for mc, mg in zip(cpu["metrics"], gpu["metrics"]):
        assert mg["learner/version"] == mc["learner/version"]
        assert mg["learner/loss"] == pytest.approx(mc["learner/loss"], rel=1e-4, abs=1e-6)
    names = [k for k in cpu["tensors"] if not k.startswith("packed.")]
    for k in names:  # same update on both devices (float rounding differs, Adam amplifies it a little)
        assert torch.allclose(gpu["tensors"][k], cpu["tensors"][k], atol=1e-4, rtol=0), k
        assert torch.equal(gpu["tensors"][f"packed.{k}"], gpu["tensors"][k]), k  # the push carries the GPU weights
    assert gpu["logprobs"] == pytest.approx(cpu["logprobs"], abs=1e-4)


@needs_cuda
def test_cuda_bf16_learner_trains(tiny_model_dir, tmp_path):
    gpu = run_learner("cuda", tiny_model_dir, str(tmp_path / "bf16"), dtype="bfloat16")
    losses = [m["learner/loss"] for m in gpu["metrics"]]
    assert gpu["device"].startswith("cuda") and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert all(v.dtype == torch.float32 for v in gpu["tensors"].values())  # weights leave the learner in fp32
