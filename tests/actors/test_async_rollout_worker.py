"""AsyncRolloutWorker without an engine (fake AsyncLLM): same rollouts as the sync worker, requests concurrent,
bad requests fail alone, weight updates wait for the calls in flight. The real engine: test_async_engine.py (slow)."""
from __future__ import annotations

import asyncio
import dataclasses
import sys
import types

import pytest

from actors.async_rollout_worker import AsyncRolloutWorker
from actors.rollout_worker import StaleWeights
from tests.actors.test_rollout_worker import FakeLLM, FakeTask, _Out, make_worker, req


class FakeAsyncLLM:
    """Mimics `AsyncLLM.generate` (one request per call, an async generator of outputs); rejects `poison`."""

    def __init__(self, vocab=15, poison=None, dead_on=None):
        self.vocab, self.poison, self.dead_on = vocab, poison, dead_on
        self.in_flight = self.max_in_flight = 0
        self.release = None  # an asyncio.Event: hold every request until it is set
        self.errored = False
        self.loaded = []

    async def generate(self, prompt, params, request_id):
        ids = prompt["prompt_token_ids"]
        if self.poison is not None and self.poison in ids:
            raise ValueError("engine rejected the prompt")
        if self.dead_on is not None and self.dead_on in ids:
            self.errored = True
            raise RuntimeError("engine core died")
        assert params.output_kind == "FINAL_ONLY"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            if self.release is not None:
                await self.release.wait()
            yield _Out(params.n, self.vocab, cached=len(ids) // 2)
        finally:
            self.in_flight -= 1

    async def collective_rpc(self, method, args=()):
        with open(args[0], "rb") as f:
            self.loaded.append((method, f.read()))
        return [3]

    async def reset_prefix_cache(self):
        return True


def make_async_worker(engine=None) -> AsyncRolloutWorker:
    from actors.async_rollout_worker import VersionGate

    sync = make_worker()
    w = AsyncRolloutWorker.__new__(AsyncRolloutWorker)
    w.__dict__.update({k: v for k, v in sync.__dict__.items() if k != "llm"})
    w.task, w.engine, w.gate = FakeTask(), engine or FakeAsyncLLM(), VersionGate()
    w._ids = iter(range(10**6))
    return w


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    install_fake_vllm(monkeypatch)


def install_fake_vllm(monkeypatch) -> None:
    """The `vllm` names the async worker imports, without starting anything heavy."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(**{"output_kind": None, **kw})
    mod.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    sp = types.ModuleType("vllm.sampling_params")
    sp.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="FINAL_ONLY")
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)


def test_same_rollouts_as_the_sync_worker_and_requests_run_concurrently():
    requests = [req(0), req(1, prefix=[3], n=3), req(2, n=1)]
    want = make_worker(FakeLLM()).generate(requests)
    w = make_async_worker()
    got = asyncio.run(w.generate(requests))
    assert want.engine_s >= 0.0  # the sync worker times its engine calls; the async one does not (they overlap)
    assert dataclasses.replace(got, engine_s=0.0) == dataclasses.replace(want, engine_s=0.0)  # field by field
    assert w.engine.max_in_flight == 3
    assert w.cache_stats() == {"prompt_tokens": 10, "cached_tokens": 4}


def test_bad_and_rejected_requests_fail_alone():
    w = make_async_worker(FakeAsyncLLM(poison=9))
    out = asyncio.run(w.generate([req(0), req(1, prompt=(1, 9)), req(2, n=0), req(3, prompt=(1, 15))]))
    assert sorted({r.request_id for r in out.rollouts}) == [0]
    msgs = {e.request_id: e.message for e in out.errors}
    assert set(msgs) == {1, 2, 3}
    assert "engine rejected" in msgs[1] and "n=0" in msgs[2] and "outside the vocabulary" in msgs[3]
    assert len(asyncio.run(w.generate([req(4)])).rollouts) == 2  # still serving


def test_dead_engine_and_stale_weights_raise():
    w = make_async_worker(FakeAsyncLLM(dead_on=8))
    with pytest.raises(RuntimeError, match="died"):
        asyncio.run(w.generate([req(0), req(1, prompt=(1, 8))]))
    w = make_async_worker()
    w.stale_grace_s = 0.05
    with pytest.raises(StaleWeights):
        asyncio.run(w.generate([req(0)], min_version=4))


def test_a_call_that_starts_before_the_push_it_needs_waits_for_it():
    import numpy as np

    async def scenario():
        w = make_async_worker()
        call = asyncio.create_task(w.generate([req(0)], min_version=4))  # started first (out of submission order)
        await asyncio.sleep(0.01)
        assert not call.done()
        await w.update_weights(np.arange(8, dtype=np.uint8), 4)
        return await call

    out = asyncio.run(scenario())
    assert out.version == 4 and {r.policy_version for r in out.rollouts} == {4}


def test_weight_update_waits_for_the_calls_in_flight_and_holds_new_ones():
    import numpy as np

    async def scenario():
        w = make_async_worker()
        w.engine.release = asyncio.Event()
        first = asyncio.create_task(w.generate([req(0), req(1)]))
        await asyncio.sleep(0.01)
        update = asyncio.create_task(w.update_weights(np.arange(16, dtype=np.uint8), 4))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(w.generate([req(2)]))
        await asyncio.sleep(0.01)
        assert not update.done() and w.version == 3 and w.engine.in_flight == 2  # the update waits, `second` too
        w.engine.release.set()
        out1, n, out2 = await first, await update, await second
        return w, out1, n, out2

    w, out1, n, out2 = asyncio.run(scenario())
    assert {r.policy_version for r in out1.rollouts} == {3} and out1.version == 3
    assert n == 3 and w.engine.loaded == [("load_weights_from_file", bytes(range(16)))]
    assert {r.policy_version for r in out2.rollouts} == {4} and w.version == 4
