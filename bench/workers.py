"""Rollout workers with the hooks only the benchmarks use; the served workers (actors/) do not carry them.

    RolloutGroup(..., worker_cls=bench_worker_class(cfg.engine))   # then set_task(group, task_cfg), actor.raw_generate ...

- `set_task`: score with another task from now on (bench/gap reuses one engine across horizons).
- `engine_rpc`: call a method of the engine workers' extension in every worker; the bench engines' extension is
  `BenchWeightReceiver` (the served one plus `time_reload_from_file`, bench/rollout's floor of a weight update).
- `raw_generate` (sync engine): the bare `llm.generate` baseline of bench/rollout's actor-vs-raw ratio.
"""
from __future__ import annotations

import time

from actors.async_rollout_worker import AsyncRolloutWorker
from actors.group import ENGINES
from actors.rollout_worker import RolloutWorker
from actors.tasks import make_task
from actors.rebalance_vllm import SteeredWeightReceiver
from protocol.registry import lookup

BENCH_EXTENSION = "bench.workers.BenchWeightReceiver"


class BenchWeightReceiver(SteeredWeightReceiver):
    """The served worker extension (weight loading; ReBalance hooks, inert until `rebalance_setup`) plus the
    benchmarks' timing hook."""

    def time_reload_from_file(self, path: str) -> float:
        """Floor of a weight update (bench/rollout.py): seconds of `reload_weights` alone, tensors already in memory."""
        from safetensors.torch import load_file

        state = load_file(path)
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return time.perf_counter() - t0


class BenchRolloutWorker(RolloutWorker):
    engine_extension = BENCH_EXTENSION

    def set_task(self, task_cfg, model_dir: str | None = None) -> None:
        """Score with another task from now on (benchmarks reuse one engine across horizons)."""
        self.task = make_task(task_cfg, tokenizer_dir=model_dir)

    def engine_rpc(self, method: str, *args):
        """Call a `WeightReceiver` method in every engine worker; the first worker's answer."""
        return self.llm.collective_rpc(method, args=args)[0]

    def raw_generate(self, requests, temperature: float | None = None) -> tuple[int, float]:
        """The same `llm.generate` call as `generate`, nothing around it: (generated tokens, seconds inside it)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        engine_s = self.engine_s  # not counted as a served call's engine time
        t0 = time.perf_counter()
        outputs = self._engine_generate(requests, temperature)
        dt = time.perf_counter() - t0
        self.engine_s = engine_s
        return sum(len(c.token_ids) for o in outputs for c in o.outputs), dt


class BenchAsyncRolloutWorker(AsyncRolloutWorker):
    engine_extension = BENCH_EXTENSION

    def set_task(self, task_cfg, model_dir: str | None = None) -> None:
        """Score with another task from now on."""
        self.task = make_task(task_cfg, tokenizer_dir=model_dir)

    async def engine_rpc(self, method: str, *args):
        """Call a `WeightReceiver` method in every engine worker; the first worker's answer."""
        return (await self.engine.collective_rpc(method, args=args))[0]


BENCH_ENGINES = {"sync": BenchRolloutWorker, "async": BenchAsyncRolloutWorker}
"""The benchmark subclass of each worker class of actors.group.ENGINES."""
assert BENCH_ENGINES.keys() == ENGINES.keys(), (list(BENCH_ENGINES), list(ENGINES))


def bench_worker_class(engine: str = "sync"):
    """The benchmark worker class of `rollout.engine`."""
    return lookup("rollout engine", BENCH_ENGINES, engine)


def set_task(group, task_cfg, model_dir: str | None = None) -> None:
    """Every actor of a `RolloutGroup` built with a bench worker class scores with `task_cfg` from now on."""
    import ray

    ray.get([a.set_task.remote(task_cfg, model_dir) for a in group.actors])
