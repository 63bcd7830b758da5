"""Pure parts of the weight transports: bucket plan, packing round trip, NCCL ranks, transport names (CPU)."""
from __future__ import annotations

import random

import pytest
import torch

from actors.weight_transport import (ALIGN, check_transport, nccl_world, pack_bucket, plan_buckets, state_metas,
                                     unpack_bucket)


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


@pytest.mark.parametrize("seed", range(25))
def test_pack_unpack_round_trip_is_exact(seed):
    state = random_state(seed)
    bucket_bytes = random.Random(seed).choice([ALIGN, 2 * ALIGN, 4096, 1 << 20])
    plan = plan_buckets(state_metas(state), bucket_bytes)
    got = {}
    for b in plan:
        flat = pack_bucket(b, state)
        assert flat.dtype == torch.uint8 and flat.numel() == b.nbytes
        got.update(unpack_bucket(b, flat))
    assert list(got) == list(state)  # order kept
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)


@pytest.mark.parametrize("seed", range(25))
def test_plan_respects_budget_order_and_alignment(seed):
    state = random_state(seed)
    metas = state_metas(state)
    budget = 1024
    plan = plan_buckets(metas, budget)
    flat = [m for b in plan for m in b.tensors]
    assert [m.name for m in flat] == [n for n, *_ in metas]
    for b in plan:
        assert b.nbytes <= budget or len(b.tensors) == 1  # only an oversized tensor exceeds the budget, alone
        ends = [m.offset + m.nbytes for m in b.tensors]
        assert all(m.offset % ALIGN == 0 for m in b.tensors)
        assert all(e <= o for e, o in zip(ends, [m.offset for m in b.tensors][1:]))  # no overlap
        assert max(ends) <= b.nbytes
    # greedy: the next bucket's first tensor would not have fitted into the previous bucket
    for prev, nxt in zip(plan, plan[1:]):
        assert prev.nbytes + -(-nxt.tensors[0].nbytes // ALIGN) * ALIGN > budget


def test_metadata_names_shapes_dtypes():
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}
    assert state_metas(state) == [("a", (2, 3), "float32", 24), ("b", (5,), "bfloat16", 10)]


def test_pack_rejects_mismatched_tensor():
    plan = plan_buckets(state_metas({"a": torch.zeros(2)}), 1024)
    with pytest.raises(ValueError, match="does not match the plan"):
        pack_bucket(plan[0], {"a": torch.zeros(3)})


def test_bad_budget_and_transport_names():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], 0)
    assert plan_buckets([], 10) == []
    assert check_transport("nccl") == "nccl"
    with pytest.raises(ValueError, match="object_store, nccl"):
        check_transport("tcp")


def test_nccl_ranks():
    assert nccl_world([1, 1, 1]) == (4, [1, 2, 3])
    assert nccl_world([2, 4]) == (7, [1, 3])
    with pytest.raises(ValueError):
        nccl_world([0])


def test_plan_wire_round_trip():
    from actors.weight_transport import plan_from_wire, plan_to_wire

    plan = plan_buckets(state_metas(random_state(3)), 512)
    wire = plan_to_wire(plan)
    assert all(isinstance(x, (int, list)) for b in wire for x in b)
    assert plan_from_wire(wire) == plan


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(3))
def test_nccl_buckets_pack_and_unpack_on_the_gpu(seed):
    """The `nccl` path's buffers live on the GPU: a bucket packed there from GPU (learner) or CPU tensors reads
    back exactly through views of the received buffer."""
    state = random_state(seed)
    plan = plan_buckets(state_metas(state), 4096)
    cuda = torch.device("cuda", torch.cuda.current_device())
    for source in ({k: v.to(cuda) for k, v in state.items()}, state):
        got = {}
        for b in plan:
            flat = pack_bucket(b, source, device=cuda)
            assert flat.is_cuda and flat.numel() == b.nbytes
            got.update(unpack_bucket(b, flat))
        assert all(got[k].is_cuda and got[k].dtype == v.dtype and torch.equal(got[k].cpu(), v) for k, v in state.items())
