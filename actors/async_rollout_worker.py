"""AsyncRolloutWorker: the rollout worker around vLLM's asynchronous engine (`AsyncLLM`), `rollout.engine=async`.

Same interface and return types as `actors.rollout_worker.RolloutWorker` (request checks, engine inputs, output
-> `Rollout` conversion, counters and task come from the shared `WorkerBase`), but every method that touches the
engine is a coroutine, so Ray runs this class as an async actor: several `generate` calls (a training batch and
an evaluation, say) are served at once, and within one call every request is its own engine request, scheduled
together by vLLM's continuous batching. A request vLLM rejects fails alone (its coroutine raises; the others
finish); no re-serving one by one as the synchronous worker must.

Weight updates and generation exclude each other (`VersionGate`): an update waits for the calls in flight to
finish and holds new ones back until the new weights are loaded, so every rollout of a call carries the version
that generated all of its tokens, as with the synchronous engine.

It does not know the prefix store, the learner or the driver's loop; `actors.group.RolloutGroup` creates it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os

from protocol.messages import RolloutRequest
from actors.rollout_worker import (Generated, WorkerBase, engine_kwargs, exits_if_engine_dead, init_request,
                                   sequence_inputs, sequence_logprobs_of, update_request)


class VersionGate:
    """Readers (generate calls) share the engine; a writer (weight update) waits for them and blocks new ones.

    Writer preference: once an update is waiting, new generate calls wait behind it (no starvation of pushes)."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._active = 0
        self._updating = False

    @contextlib.asynccontextmanager
    async def generating(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._updating)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    async def until(self, predicate, timeout: float) -> None:
        """Wait (outside any generate slot) until `predicate()` holds after an update, or `timeout` seconds pass."""
        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
        except TimeoutError:
            pass

    async def begin_update(self) -> None:
        """Take the writer's side: wait for another update to end, hold new calls back, wait for the calls in flight."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._updating)
            self._updating = True
            await self._cond.wait_for(lambda: self._active == 0)

    async def end_update(self) -> None:
        """Let calls in again (idempotent)."""
        async with self._cond:
            self._updating = False
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def updating(self):
        await self.begin_update()
        try:
            yield
        finally:
            await self.end_update()


class AsyncRolloutWorker(WorkerBase):
    _steering_path: str | None = None
    """`rollout.steering=rebalance`: the calibration file whose hooks are still to be installed (None: none, or done)."""
    stale_grace_s: float = 5.0
    """A call that needs a newer version than this engine holds waits this long for a push to land before it raises
    `StaleWeights`: calls to an async actor may start out of submission order, so a generate sent right after a
    push can begin while the push's payload is still being fetched (a sync actor runs them in order)."""

    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, actor_id: int, seed: int):
        self._setup(model_dir=model_dir, rollout_cfg=rollout_cfg, task_cfg=task_cfg, actor_id=actor_id)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir, rollout_cfg, seed, self.engine_extension),
                                                                disable_log_stats=True))
        self.vocab_size = self.engine.model_config.get_vocab_size()
        self.max_len = self.engine.model_config.max_model_len
        self.gate = VersionGate()
        self._ids = itertools.count()  # vLLM request ids must be unique among the requests in flight
        if getattr(rollout_cfg, "steering", "none") == "rebalance":
            self._steering_path = os.path.expanduser(rollout_cfg.steering_path)
            self._steering_lock = asyncio.Lock()

    async def _steering_ready(self) -> None:
        """`rollout.steering=rebalance`: install the hooks in the engine's workers before its first call, so every
        generate and every logprob check is steered (as the sync worker's constructor does; here `collective_rpc`
        is a coroutine, which a constructor cannot await)."""
        if self._steering_path is None:
            return
        async with self._steering_lock:
            if self._steering_path is not None:
                await self.engine.collective_rpc("rebalance_setup", args=(self._steering_path,))
                self._steering_path = None

    @exits_if_engine_dead
    async def generate(self, requests: list[RolloutRequest], *, temperature: float | None = None,
                       min_version: int = 0) -> Generated:
        """As `RolloutWorker.generate`: n continuations per request, scored; bad requests become `RequestError`s.

        The requests run concurrently in the engine. Raises `StaleWeights` when this engine's version is below
        `min_version` (after `stale_grace_s`), and re-raises when the engine itself is dead (the group retries
        elsewhere)."""
        await self._steering_ready()
        if self.version < min_version:
            await self.gate.until(lambda: self.version >= min_version, self.stale_grace_s)
        async with self.gate.generating():
            good, errors = self._split(requests, min_version)
            temperature = self.cfg.temperature if temperature is None else temperature
            results = await asyncio.gather(*(self._one(req, temperature) for req in good), return_exceptions=True)
            served, outputs = [], []
            for req, res in zip(good, results):
                if isinstance(res, BaseException):
                    if not isinstance(res, Exception) or self.engine.errored:
                        raise res
                    cause = res.__cause__ or res  # EngineGenerateError wraps what went wrong
                    errors.append(self._error(req, f"request {req.request_id}: {type(cause).__name__}: {cause}"))
                else:
                    served.append(req)
                    outputs.append(res)
            return self._generated(self._to_rollouts(served, outputs), errors)

    async def _one(self, req: RolloutRequest, temperature: float):
        """The finished `RequestOutput` of one request (all n samples)."""
        from vllm.sampling_params import RequestOutputKind

        prompt, params = self._inputs(req, temperature, output_kind=RequestOutputKind.FINAL_ONLY)
        final = await self._final(prompt, params)
        self._count(req, final)
        return final

    async def _final(self, prompt, params):
        final = None
        async for out in self.engine.generate(prompt, params, request_id=f"a{self.actor_id}-{next(self._ids)}"):
            final = out
        return final

    @exits_if_engine_dead
    async def update_weights(self, payload, version: int) -> int:
        """As `RolloutWorker.update_weights` (staged in /dev/shm, mapped by the workers), once the calls in flight
        have finished; new calls wait until the weights are in and the prefix cache is reset."""
        from actors.weight_transport import payload_bytes, staged_in_shm

        async with self.gate.updating():
            with staged_in_shm(payload, str(version)) as path:
                n = (await self.engine.collective_rpc("load_weights_from_file", args=(path,)))[0] if path else None
            if n is None:
                n = (await self.engine.collective_rpc("load_weights_from_bytes", args=(payload_bytes(payload),)))[0]
            await self.engine.reset_prefix_cache()
            self.version = version
            return n

    # ----- vLLM weight transfer (rollout.weight_transport nccl / ipc; actors.weight_sync drives it) -----
    def engine_workers(self) -> int:
        """Worker processes of this engine (tensor x pipeline parallel): its ranks in a transfer group."""
        return self.engine.vllm_config.parallel_config.world_size

    @exits_if_engine_dead
    async def transfer_init(self, init_info: dict) -> None:
        """vLLM's `init_weight_transfer_engine` (nccl: blocks until learner rank 0 joins the group)."""
        await self.engine.init_weight_transfer_engine(init_request(init_info))

    @exits_if_engine_dead
    async def transfer_start(self) -> None:
        """Once the calls in flight have finished, vLLM's `start_weight_update`; new calls wait until
        `transfer_finish` (the gate spans the three calls of a transfer)."""
        await self.gate.begin_update()
        try:
            await self.engine.start_weight_update()
        except BaseException:
            await self.gate.end_update()
            raise

    @exits_if_engine_dead
    async def transfer_update(self, update_info) -> None:
        """vLLM's `update_weights`: receive one update (nccl: the learner broadcasts meanwhile) and load it."""
        try:
            await self.engine.update_weights(update_request(update_info))
        except BaseException:
            await self.gate.end_update()  # vLLM ends the update session on a failed chunk
            raise

    @exits_if_engine_dead
    async def transfer_finish(self, version: int) -> int:
        """vLLM's `finish_weight_update`, prefix cache reset, the learner's version adopted; calls go on."""
        try:
            await self.engine.finish_weight_update()
            await self.engine.reset_prefix_cache()
            self.version = version
        finally:
            await self.gate.end_update()
        return version

    async def transfer_shutdown(self) -> None:
        await self.engine.shutdown_weight_transfer_engine()

    @exits_if_engine_dead
    async def sequence_logprobs(self, token_ids: list[int], min_version: int = 0) -> list[float]:
        """log pi(x_t | x_<t) for t >= 1 of a fixed sequence (prompt logprobs), to compare with the learner.
        Raises `StaleWeights` below `min_version` (a restarted actor before its re-sync), as `generate` does."""
        await self._steering_ready()
        if self.version < min_version:
            await self.gate.until(lambda: self.version >= min_version, self.stale_grace_s)
        async with self.gate.generating():
            self._check_version(min_version)
            prompt, params = sequence_inputs(token_ids)
            return sequence_logprobs_of(token_ids, await self._final(prompt, params))

    def shutdown(self) -> None:
        self.engine.shutdown()
