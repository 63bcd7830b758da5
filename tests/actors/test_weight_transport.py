"""Pure parts of the weight transports (CPU): the registry and its checks, the object store's safetensors packing,
views and /dev/shm staging. The vLLM backends' call sequence: test_weight_sync.py."""
from __future__ import annotations

import random

import pytest
import torch


def random_state(seed: int) -> dict:
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    state = {}
    for i in range(rng.randint(1, 12)):
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 3)))
        dt = rng.choice(dtypes)
        t = torch.randn(shape) * 10
        state[f"model.layers.{i}.w"] = t.to(dt)
    return state


# ----- the registry rollout.weight_transport is validated against -----

def test_transport_names_and_what_they_need():
    from actors.weight_transport import TRANSPORTS, check_transport

    assert list(TRANSPORTS) == ["object_store", "nccl", "ipc"]
    assert check_transport("object_store").vllm_backend is None  # runs anywhere, CPU included
    for name in ("nccl", "ipc"):
        assert TRANSPORTS[name].vllm_backend == name and TRANSPORTS[name].needs_gpu
        for rollout_gpus, learner_gpus in ((0, 0), (0, 1), (1, 0)):
            with pytest.raises(ValueError, match=f"weight_transport={name} needs GPUs on both sides") as e:
                check_transport(name, rollout_gpus=rollout_gpus, learner_gpus=learner_gpus)
            assert "\n" not in str(e.value) and "use object_store on CPU" in str(e.value)
    assert check_transport("nccl", rollout_gpus=1, learner_gpus=1).name == "nccl"
    assert check_transport("ipc", rollout_gpus=0.5, learner_gpus=0.5).name == "ipc"
    with pytest.raises(ValueError, match="shares one GPU"):
        check_transport("ipc", rollout_gpus=1, learner_gpus=1)
    with pytest.raises(ValueError, match="choose one of object_store, nccl, ipc"):
        check_transport("tcp")


def test_config_validates_against_the_registry():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="choose one of object_store, nccl, ipc"):
        load_config(None, ["rollout.weight_transport=tcp"])
    with pytest.raises(ConfigError, match="needs GPUs on both sides"):
        load_config(None, ["rollout.weight_transport=nccl"])  # the CPU defaults: no GPUs
    cfg = load_config(None, ["rollout.weight_transport=nccl", "rollout.num_gpus_per_actor=1", "learner.num_gpus=1"])
    assert cfg.rollout.weight_transport == "nccl"


def test_engine_kwargs_carry_vllm_weight_transfer_config_only_for_vllm_backends():
    from types import SimpleNamespace

    from actors.rollout_worker import engine_kwargs

    base = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, block_size=None)
    plain = engine_kwargs("m", SimpleNamespace(**base, weight_transport="object_store"), 0)
    assert "weight_transfer_config" not in plain and plain["worker_extension_cls"] == "actors.weight_receiver.WeightReceiver"
    for name in ("nccl", "ipc"):
        kw = engine_kwargs("m", SimpleNamespace(**base, weight_transport=name), 0)
        assert kw["weight_transfer_config"] == {"backend": name}
        assert {k: v for k, v in kw.items() if k != "weight_transfer_config"} == plain


# ----- safetensors packing (object_store transport) -----

def with_int_and_empty(state: dict) -> dict:
    return {**state, "z.empty": torch.zeros(0, 3), "z.idx": torch.arange(7, dtype=torch.int32), "z.mask": torch.tensor([True, False])}


@pytest.mark.parametrize("seed", range(15))
def test_packed_weights_are_safetensors_and_views_read_them_back_exactly(seed):
    from safetensors.torch import load

    from actors.weight_transport import pack_weights, safetensors_views

    state = with_int_and_empty(random_state(seed))
    data = pack_weights(state).tobytes()
    for got in (load(data), dict(safetensors_views(data))):  # the reference reader, and ours
        assert set(got) == set(state)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


@pytest.mark.parametrize("seed", range(5))
def test_views_read_files_written_by_safetensors(seed):
    from safetensors.torch import save

    from actors.weight_transport import safetensors_views

    state = with_int_and_empty(random_state(seed))
    got = dict(safetensors_views(save(state)))
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())


def test_parts_view_the_tensors_and_views_view_the_buffer():
    import numpy as np

    from actors.weight_transport import pack_weights, safetensors_views

    state = {"w": torch.randn(4, 3), "h": torch.randn(5).to(torch.bfloat16), "i": torch.arange(3)}
    packed = pack_weights(state)
    ptrs = {p.ctypes.data for p in packed.parts}
    assert ptrs == {t.data_ptr() for t in state.values()}  # no copies on the learner side
    conv = pack_weights(state, dtype=torch.float32)  # bf16 -> f32 needs a copy; integers keep their dtype
    got = dict(safetensors_views(conv.tobytes()))
    assert got["h"].dtype == torch.float32 and torch.equal(got["h"], state["h"].float()) and got["i"].dtype == torch.int64
    buf = np.frombuffer(bytearray(packed.tobytes()), dtype=np.uint8)
    views = dict(safetensors_views(buf))
    base = buf.ctypes.data
    assert all(base <= t.data_ptr() < base + buf.nbytes for t in views.values())  # views, no copies
    buf[buf.size - 10:] = 0  # largest element first: i (int64), w (f32), then h (bf16): h's 5 values
    assert views["h"].tolist() == [0.0] * 5 and torch.equal(views["w"], state["w"])


def test_staged_in_shm_holds_the_payload_then_goes():
    import os

    from actors.weight_transport import pack_weights, staged_in_shm

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    packed = pack_weights(random_state(1))
    for payload in (packed, packed.tobytes()):
        with staged_in_shm(payload, "t") as path:
            with open(path, "rb") as f:
                assert f.read() == packed.tobytes()
        assert not os.path.exists(path)
    with pytest.raises(RuntimeError), staged_in_shm(b"abc", "t2") as path:
        raise RuntimeError("load failed")
    assert not os.path.exists(path)


def test_rpc_fallback_bytes_of_every_payload_kind():
    """Without /dev/shm the workers send `payload_bytes(payload)` by RPC: the same file for packed and raw payloads."""
    from actors.weight_transport import pack_weights, payload_bytes

    packed = pack_weights(random_state(2))
    assert payload_bytes(packed) == packed.tobytes() == payload_bytes(bytearray(packed.tobytes()))
    with pytest.raises(TypeError):
        bytes(packed)  # why the fallback needs payload_bytes
