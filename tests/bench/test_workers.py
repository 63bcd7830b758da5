"""Benchmark-only hooks live on the bench worker classes, not on the served rollout workers."""
import types

from actors.async_rollout_worker import AsyncRolloutWorker
from actors.rollout_worker import RolloutWorker
from bench.workers import BenchAsyncRolloutWorker, BenchRolloutWorker, bench_worker_class

HOOKS = ("set_task", "engine_rpc", "raw_generate")


def test_served_workers_hold_no_benchmark_hooks():
    for cls in (RolloutWorker, AsyncRolloutWorker):
        assert not [h for h in HOOKS if hasattr(cls, h)], cls
    assert all(hasattr(BenchRolloutWorker, h) for h in HOOKS)
    assert all(hasattr(BenchAsyncRolloutWorker, h) for h in ("set_task", "engine_rpc"))
    assert bench_worker_class("sync") is BenchRolloutWorker and bench_worker_class("async") is BenchAsyncRolloutWorker


def test_served_engines_have_no_timing_hook_and_bench_engines_use_the_bench_extension():
    from actors.rebalance_vllm import SteeredWeightReceiver
    from actors.rollout_worker import engine_kwargs
    from actors.weight_receiver import WeightReceiver
    from bench.workers import BenchWeightReceiver
    from launch.config import load_config

    assert not hasattr(WeightReceiver, "time_reload_from_file") and not hasattr(SteeredWeightReceiver, "time_reload_from_file")
    assert issubclass(BenchWeightReceiver, SteeredWeightReceiver) and hasattr(BenchWeightReceiver, "time_reload_from_file")
    rollout = load_config(None, []).rollout
    assert RolloutWorker.engine_extension is None and AsyncRolloutWorker.engine_extension is None
    assert engine_kwargs("m", rollout, 0)["worker_extension_cls"] == "actors.weight_receiver.WeightReceiver"
    for cls in (BenchRolloutWorker, BenchAsyncRolloutWorker):
        kw = engine_kwargs("m", rollout, 0, cls.engine_extension)
        assert kw["worker_extension_cls"] == "bench.workers.BenchWeightReceiver"


def test_engine_rpc_and_raw_generate_leave_the_served_counters_alone():
    class LLM:
        def collective_rpc(self, method, args=()):
            return [(method, args), "second worker"]

        def generate(self, prompts, params, use_tqdm=False):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[1, 2, 3])], num_cached_tokens=0)
                    for _ in prompts]

    w = BenchRolloutWorker.__new__(BenchRolloutWorker)
    w.llm, w.engine_s, w.prompt_tokens, w.cached_tokens = LLM(), 0.25, 0, 0
    w.cfg = types.SimpleNamespace(temperature=1.0, top_k_logprobs=2)
    w._inputs = lambda req, temperature: ({"prompt_token_ids": [1]}, None)
    assert w.engine_rpc("time_reload_from_file", "/dev/shm/x") == ("time_reload_from_file", ("/dev/shm/x",))
    tokens, seconds = w.raw_generate([types.SimpleNamespace(prompt_ids=[1], prefix_ids=[])] * 2)
    assert tokens == 6 and seconds >= 0 and w.engine_s == 0.25
