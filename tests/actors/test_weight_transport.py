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
