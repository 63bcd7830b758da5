"""The weight push of each `rollout.weight_transport`, on CPU, with recording fakes (no Ray, no engine start).

object_store: the push the driver always made. nccl / ipc: vLLM's own trainer-side engines
(`NCCLTrainerWeightTransferEngine`, `IPCTrainerWeightTransferEngine`, built by `WeightTransferTrainerFactory`) run
inside `Learner.init_weight_transfer` / `send_weights` with only their CUDA pieces stubbed (NCCL endpoint and
broadcast, IPC handles), and drive our `RolloutSyncClient` -> the actors' `transfer_*` methods (the real
`RolloutWorker` ones) -> a fake `vllm.LLM` that records vLLM's engine-side API calls. What this cannot show: that
the NCCL group forms and the bytes arrive on a GPU (not run in this project; docs/ROLLOUT.md).
"""
from __future__ import annotations

import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from actors.group import RolloutGroup
from actors.rollout_worker import RolloutWorker
from actors.weight_sync import RolloutSyncClient, WeightSync, transfer_ranks
from learner.learner import Learner

TIMEOUT = 20.0


class Log:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def add(self, *event):
        with self.lock:
            self.events.append(event)

    def names(self, who=None):
        return [e[1] for e in self.events if who is None or e[0] == who]


class FakeLLM:
    """vLLM's `LLM` weight-transfer API (entrypoints/rl/offline.py), recording what the actor calls."""

    def __init__(self, name: str, log: Log, workers: int = 1, on_update=None):
        self.name, self.log, self.on_update = name, log, on_update
        self.llm_engine = types.SimpleNamespace(
            vllm_config=types.SimpleNamespace(parallel_config=types.SimpleNamespace(world_size=workers)))

    def init_weight_transfer_engine(self, request):
        self.log.add(self.name, "init_weight_transfer_engine", dict(request.init_info))

    def start_weight_update(self):
        self.log.add(self.name, "start_weight_update")

    def update_weights(self, request):
        self.log.add(self.name, "update_weights", request.update_info)
        if self.on_update:
            self.on_update()

    def finish_weight_update(self, weight_version=None):
        self.log.add(self.name, "finish_weight_update", weight_version)

    def reset_prefix_cache(self):
        self.log.add(self.name, "reset_prefix_cache")

    def shutdown_weight_transfer_engine(self):
        self.log.add(self.name, "shutdown_weight_transfer_engine")


def make_worker(llm: FakeLLM, actor_id: int) -> RolloutWorker:
    w = RolloutWorker.__new__(RolloutWorker)
    w.llm, w.actor_id, w.version, w.transferring = llm, actor_id, 0, False
    return w


class Handle:
    """A Ray actor handle's shape: `handle.method.remote(*args)` runs the method on a thread, returns a future."""

    def __init__(self, worker, pool: ThreadPoolExecutor):
        self._worker, self._pool = worker, pool

    def __getattr__(self, method):
        fn = getattr(self._worker, method)
        return types.SimpleNamespace(remote=lambda *a, **kw: self._pool.submit(fn, *a, **kw))


def get(refs):
    if isinstance(refs, Future):
        return refs.result(timeout=TIMEOUT)
    return [r.result(timeout=TIMEOUT) if isinstance(r, Future) else r for r in refs]


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(7, 4)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(4)


def make_learner(rank: int = 0) -> Learner:
    """A `Learner` without DeepSpeed: the real transfer methods and `weight_source` over a plain module (ZeRO 1)."""
    L = Learner.__new__(Learner)
    L.rank, L.zero_stage, L.weight_transfer = rank, 1, None
    L.engine = types.SimpleNamespace(module=Policy())
    return L


class FakeLearnerGroup:
    """`LearnerGroup`'s weight API over one in-process rank (a local group), recording the driver-side calls."""

    def __init__(self, log: Log):
        self.log, self.rank0 = log, make_learner()

    def async_weights(self, *, zero_copy: bool = False):
        self.log.add("learner", "async_weights", zero_copy)
        return "payload-ref"

    def init_weight_transfer(self, transport, client, *, world_size, buffer_bytes):
        self.log.add("learner", "init_weight_transfer", transport, world_size, buffer_bytes)
        self.rank0.init_weight_transfer(transport, client, world_size=world_size, master_address="10.0.0.1",
                                        master_port=29555, buffer_bytes=buffer_bytes)

    def send_weights(self, version):
        self.log.add("learner", "send_weights", version)
        self.rank0.send_weights(version)


def make_group(transport: str, handles: list, log: Log) -> RolloutGroup:
    """A `RolloutGroup` around the given handles, without Ray (the fields `__init__` would set)."""
    g = RolloutGroup.__new__(RolloutGroup)
    g.cfg = types.SimpleNamespace(weight_transport=transport, weight_bucket_mb=4, affinity=True, request_retries=2,
                                  actor_lost_after_s=600.0, max_restarts=3)
    g.actors, g.lost, g._latest, g._version, g._syncing, g._down_since = handles, set(), None, 0, {}, {}
    g.restarts_seen, g.root_owner, g.errors, g.verifier_errors, g.retried_requests = 0, {}, [], 0, 0
    g._init_fault_state()
    g._init_weight_state()
    g._get = get

    def update_weights(payload_ref, version):  # the object-store push itself (needs Ray): recorded
        log.add("rollout", "update_weights", payload_ref, version)
        g._latest, g._version = (payload_ref, version), version

    g.update_weights = update_weights
    return g


def attach(group: RolloutGroup, learner) -> None:
    """What `group.sync_weights(learner, v)` makes on its first call, with the client waiting on futures, not Ray."""
    group._weight_sync = WeightSync(group, learner, group.cfg.weight_transport, group.cfg.weight_bucket_mb, get=get)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as p:
        yield p


@pytest.fixture
def nccl_stubs(monkeypatch):
    """vLLM's NCCL trainer engine on CPU: the endpoint (NCCL rank 0) and the packed broadcast are stubbed; the
    broadcast consumes the source through vLLM's own metadata check and waits until every engine is inside
    `update_weights`, which waits for the broadcast: the two sides must run concurrently, or this times out."""
    from vllm.distributed.weight_transfer import nccl_engine

    state = types.SimpleNamespace(log=None, engines=0, inside=threading.Condition(), broadcasting=threading.Event())

    def endpoint(init_info):
        state.log.add("learner", "open_nccl_rank0", init_info.master_address, init_info.master_port,
                      init_info.world_size)
        return types.SimpleNamespace(destroy=lambda: None)

    def broadcast(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        with state.inside:
            assert state.inside.wait_for(lambda: state.engines_in >= state.engines, TIMEOUT), "engines not receiving"
        state.broadcasting.set()
        names = [name for name, _ in iterator]  # vLLM's _checked_iter: iteration must agree with metadata()
        state.log.add("learner", "broadcast", names, buffer_size_bytes)

    def engine_inside():
        with state.inside:
            state.engines_in += 1
            state.inside.notify_all()
        assert state.broadcasting.wait(TIMEOUT), "broadcast did not start while the engine received"

    state.engines_in = 0
    state.engine_inside = engine_inside
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", endpoint)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", broadcast)
    return state


def test_transfer_ranks():
    assert transfer_ranks([1, 1, 1]) == (4, [1, 2, 3])
    assert transfer_ranks([2, 4]) == (7, [1, 3])
    with pytest.raises(ValueError):
        transfer_ranks([0])


def test_object_store_push_is_the_drivers_old_call(pool):
    log = Log()
    group = make_group("object_store", [Handle(make_worker(FakeLLM("a0", log), 0), pool)], log)
    learner = FakeLearnerGroup(log)
    group.sync_weights(learner, 1)
    group.sync_weights(learner, 2)
    assert log.events == [("learner", "async_weights", True), ("rollout", "update_weights", "payload-ref", 1),
                          ("learner", "async_weights", True), ("rollout", "update_weights", "payload-ref", 2)]
    assert group._serving() is not group._push_lock  # generate calls do not wait on object-store pushes
    # weights the learner exported with its update (Trainer.update) are pushed as they are: no export call
    assert group.takes_exported_weights(learner)
    group.sync_weights(learner, 3, "exported-ref")
    assert log.events[4:] == [("rollout", "update_weights", "exported-ref", 3)]


def test_nccl_push_order_on_both_sides(pool, nccl_stubs):
    log = Log()
    nccl_stubs.log, nccl_stubs.engines = log, 2
    llms = [FakeLLM("a0", log, workers=1, on_update=nccl_stubs.engine_inside),
            FakeLLM("a1", log, workers=2, on_update=nccl_stubs.engine_inside)]
    group = make_group("nccl", [Handle(make_worker(llm, i), pool) for i, llm in enumerate(llms)], log)
    learner = FakeLearnerGroup(log)
    attach(group, learner)

    assert not group.takes_exported_weights(learner)  # the transfer engine reads the learner's weights itself
    group.sync_weights(learner, 1)
    # init once: the learner opens NCCL rank 0 of 1 + 1 + 2 ranks; each engine joins at its own rank offset
    assert log.events[0] == ("learner", "init_weight_transfer", "nccl", 4, 4 << 20)
    inits = sorted(e for e in log.events if e[1] == "init_weight_transfer_engine")
    assert [(e[0], e[2]["rank_offset"], e[2]["world_size"], e[2]["master_port"], e[2]["packed"],
             e[2]["packed_buffer_size_bytes"]) for e in inits] == [("a0", 1, 4, 29555, True, 4 << 20),
                                                                  ("a1", 2, 4, 29555, True, 4 << 20)]
    assert ("learner", "open_nccl_rank0", "10.0.0.1", 29555, 4) in log.events
    push1 = log.events[log.events.index(("learner", "send_weights", 1)):]
    names = list(learner.rank0.engine.module.state_dict())
    for a in ("a0", "a1"):  # per engine: vLLM's start / update / finish, then ours: prefix cache reset
        assert [e[1] for e in push1 if e[0] == a] == ["start_weight_update", "update_weights", "finish_weight_update",
                                                     "reset_prefix_cache"]
        update = next(e[2] for e in push1 if e[0] == a and e[1] == "update_weights")
        assert update["names"] == names and update["dtype_names"] == ["float32"] * len(names)
    order = [e[1] for e in push1 if e[0] in ("a0", "a1")]
    assert order.index("update_weights") > max(i for i, n in enumerate(order) if n == "start_weight_update")
    assert min(i for i, n in enumerate(order) if n == "finish_weight_update") > \
        max(i for i, n in enumerate(order) if n == "update_weights")  # every engine received before any finishes
    assert ("learner", "broadcast", names, 4 << 20) in push1
    assert [group.actors[i]._worker.version for i in (0, 1)] == [1, 1] and group._version == 1

    nccl_stubs.engines_in = 0
    nccl_stubs.broadcasting.clear()
    n_before = len(log.events)
    group.sync_weights(learner, 2)
    push2 = log.events[n_before:]
    assert [e[1] for e in push2 if e[0] == "learner"] == ["send_weights", "broadcast"]  # no second init
    assert sorted(e[0] for e in push2 if e[1] == "finish_weight_update") == ["a0", "a1"]
    assert [group.actors[i]._worker.version for i in (0, 1)] == [2, 2]
    assert "async_weights" not in log.names("learner")  # no object-store copy unless an actor must be re-synced


def test_ipc_push_order_on_both_sides(pool, monkeypatch):
    """vLLM's IPC trainer engine with the CUDA calls stubbed: no rendezvous, one update carrying the handles."""
    from vllm.distributed.weight_transfer import ipc_engine

    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="GPU-0"))
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    monkeypatch.setattr(ipc_engine, "reduce_tensor", lambda t: (None, ("ipc-args", tuple(t.shape))))
    log = Log()
    group = make_group("ipc", [Handle(make_worker(FakeLLM("a0", log), 0), pool)], log)
    learner = FakeLearnerGroup(log)
    attach(group, learner)
    group.sync_weights(learner, 5)
    group.sync_weights(learner, 6)
    state = learner.rank0.engine.module.state_dict()
    assert [(e[0], e[1]) for e in log.events] == [
        ("learner", "init_weight_transfer"), ("a0", "init_weight_transfer_engine"),
        *[x for v in (5, 6) for x in (("learner", "send_weights"), ("a0", "start_weight_update"),
                                      ("a0", "update_weights"), ("a0", "finish_weight_update"),
                                      ("a0", "reset_prefix_cache"))]]
    assert log.events[1][2] == {"packed": False}  # no rank_offset: IPC has no group
    update = next(e[2] for e in log.events if e[1] == "update_weights")
    assert update["names"] == list(state) and update["ipc_handles"] == [
        {"GPU-0": ("ipc-args", tuple(t.shape))} for t in state.values()]
    assert group.actors[0]._worker.version == 6


def test_a_restarted_actor_is_resynced_by_object_store_and_pushes_fall_back(pool, nccl_stubs):
    log = Log()
    nccl_stubs.log, nccl_stubs.engines = log, 1
    group = make_group("nccl", [Handle(make_worker(FakeLLM("a0", log, on_update=nccl_stubs.engine_inside), 0), pool)],
                       log)
    learner = FakeLearnerGroup(log)
    attach(group, learner)
    group.sync_weights(learner, 1)
    # actor 0 died and came back: its re-sync fetches an object-store copy of the learner's weights once
    resyncs = []
    group.actors = [types.SimpleNamespace(update_weights=types.SimpleNamespace(
        remote=lambda ref, v: resyncs.append((ref, v)) or "sync-ref"))]
    group._resync(0, died=True)
    assert resyncs == [("payload-ref", 1)] and group.restarts_seen == 1 and group._syncing == {0: "sync-ref"}
    n_before = len(log.events)
    warnings = []
    group._weight_sync.log = warnings.append
    group.sync_weights(learner, 2)  # the transfer group lacks the new process: object store from now on
    group.sync_weights(learner, 3)
    assert log.events[n_before:] == [("learner", "async_weights", True), ("rollout", "update_weights", "payload-ref", 2),
                                     ("learner", "async_weights", True), ("rollout", "update_weights", "payload-ref", 3)]
    assert len(warnings) == 1 and "object store from now on" in warnings[0]
    assert group.takes_exported_weights(learner)  # from now on the learner exports with its update


def test_generate_waits_for_a_vllm_transfer_push(pool):
    log = Log()
    group = make_group("nccl", [], log)
    done = threading.Event()
    with group.pushing():
        t = threading.Thread(target=lambda: (group.generate([]), done.set()))
        t.start()
        assert not done.wait(0.2)  # held back while the push runs
    assert done.wait(TIMEOUT)
    t.join()


def test_sync_worker_refuses_to_generate_mid_transfer():
    log = Log()
    w = make_worker(FakeLLM("a0", log), 0)
    w.transfer_start()
    with pytest.raises(RuntimeError, match="during a weight transfer"):
        w.generate([])
    assert w.transfer_finish(4) == 4 and w.version == 4 and not w.transferring
    assert log.names() == ["start_weight_update", "finish_weight_update", "reset_prefix_cache"]


def test_async_worker_transfer_holds_generate_calls_until_finish(monkeypatch):
    """AsyncRolloutWorker: transfer_start waits for the calls in flight, new calls wait until transfer_finish."""
    import asyncio

    from tests.actors.test_async_rollout_worker import FakeAsyncLLM, install_fake_vllm, make_async_worker
    from tests.actors.test_rollout_worker import req

    install_fake_vllm(monkeypatch)

    class Engine(FakeAsyncLLM):
        calls = []

        async def start_weight_update(self):
            self.calls.append(("start", self.in_flight))

        async def finish_weight_update(self, weight_version=None):
            self.calls.append(("finish", self.in_flight))

        async def reset_prefix_cache(self):
            self.calls.append(("reset", self.in_flight))

    async def scenario():
        w = make_async_worker(Engine())
        w.engine_s = getattr(w, "engine_s", 0.0)
        w.engine.release = asyncio.Event()
        first = asyncio.create_task(w.generate([req(0)]))
        await asyncio.sleep(0.01)
        start = asyncio.create_task(w.transfer_start())
        await asyncio.sleep(0.01)
        assert not start.done()  # waits for `first`
        w.engine.release.set()
        out1 = await first
        await start
        second = asyncio.create_task(w.generate([req(1)]))
        await asyncio.sleep(0.01)
        assert not second.done() and w.engine.in_flight == 0  # held back mid-transfer
        await w.transfer_finish(4)
        return out1, await second, w

    out1, out2, w = asyncio.run(scenario())
    assert out1.version == 3 and out2.version == 4 and w.version == 4
    assert Engine.calls == [("start", 0), ("finish", 0), ("reset", 0)]


def test_client_is_the_vllm_protocol_and_pickles():
    import pickle

    from vllm.distributed.weight_transfer import VLLMWeightSyncClient

    client = RolloutSyncClient(["h0", "h1"], [1, 2])
    assert isinstance(client, VLLMWeightSyncClient)
    again = pickle.loads(pickle.dumps(client))  # it travels to learner rank 0 with the actor handles
    assert again.actors == ["h0", "h1"] and again.rank_offsets == [1, 2]
    with pytest.raises(RuntimeError, match="no version set"):
        RolloutSyncClient([], [], get=get).finish_weight_update()


def test_the_vllm_names_we_use_exist_in_the_installed_vllm():
    """An API rename in vLLM breaks this test, not a GPU run."""
    from vllm import LLM
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.worker.gpu_worker import Worker

    from actors.weight_transport import TRANSPORTS, engine_transfer_kwargs, trainer_init_info

    for t in TRANSPORTS.values():
        if t.vllm_backend is None:
            continue
        assert t.vllm_backend in WeightTransferTrainerFactory._registry  # trainer side (learner rank 0)
        assert t.vllm_backend in WeightTransferEngineFactory._registry  # worker side (each engine worker)
        info = trainer_init_info(t.name, rank=0, world_size=3, master_address="h", master_port=1, buffer_bytes=1 << 20)
        assert info.backend == t.vllm_backend and info.is_sender and info.packed_buffer_size_bytes == 1 << 20
        kw = engine_transfer_kwargs(t.name)["weight_transfer_config"]
        assert EngineArgs(model="m", weight_transfer_config=kw).weight_transfer_config == WeightTransferConfig(**kw)
    for cls in (LLM, AsyncLLM, Worker):
        for m in ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                  "shutdown_weight_transfer_engine"):
            assert callable(getattr(cls, m)), (cls, m)
