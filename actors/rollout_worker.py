"""RolloutWorker: one vLLM engine that samples from the prompt or from any stored prefix.

A plain class: `actors.group.RolloutGroup` makes it a Ray actor; tests may
build it directly. It owns the engine, the task verifier (rewards are
computed here, next to the samples) and its policy version. It does not
know the prefix store or the learner.

What does not depend on the engine's API (request checks, engine inputs, vLLM
outputs -> `Rollout`s, counters, task) lives in `WorkerBase` and module
functions, shared with `actors.async_rollout_worker.AsyncRolloutWorker`
(vLLM's AsyncLLM, `rollout.engine=async`).
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from dataclasses import dataclass

from protocol.messages import Rollout, RolloutRequest
from actors.pause_points import pause_point
from actors.tasks import make_task
from protocol.uncertainty import entropy_from_topk


class RolloutRequestError(ValueError):
    """A request that cannot be served; the worker keeps serving others."""


class StaleWeights(RuntimeError):
    """The engine's policy version is older than the caller requires (a restarted actor before its weight sync)."""


@dataclass
class RequestError:
    """One request that was not served, so the driver can count it and release its branch point."""
    request_id: int
    root_id: str
    branch_ref: int
    """Store handle of the branch point the request re-entered (-1: root start)."""
    actor_id: int
    message: str
    """One line naming the request and what is wrong with it."""


@dataclass
class Generated:
    """What one `RolloutWorker.generate` call returns."""
    rollouts: list[Rollout]
    errors: list[RequestError]
    actor_id: int
    version: int
    """Policy version of the engine that served the call."""
    verifier_errors: int = 0
    """Samples whose verifier raised (scored 0) during this call."""
    engine_s: float = 0.0
    """Seconds spent inside the engine's generate calls (the rest of the call is this actor's own overhead)."""


def _engine_dead(error: Exception) -> bool:
    """vLLM's engine process is gone: no request can be served here; let the group retry elsewhere."""
    return type(error).__name__ in ("EngineDeadError", "EngineGenerateError")


def in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: not an actor
        return False


def exits_if_engine_dead(method):
    """For worker methods that use the engine. vLLM's engine runs in child processes (EngineCore, its workers);
    when one of them dies (killed, out of memory) the engine never serves again, yet Ray sees a live actor, and
    every call would fail with vLLM's EngineDeadError. The actor's process exits instead, as a crash, so Ray
    restarts the actor with a new engine (`rollout.max_restarts`) and the rollout group re-syncs it as after
    any death of the actor itself."""
    def dead(self, e: BaseException) -> bool:
        return (type(e).__name__ == "EngineDeadError" or type(e.__cause__).__name__ == "EngineDeadError"
                or getattr(getattr(self, "engine", None), "errored", False) is True)  # AsyncLLM knows

    def exit_now(self, e: BaseException):
        if not in_ray_actor():  # built directly (tests, benchmarks): the caller gets vLLM's error
            return
        print(f"[graftrl] rollout actor {self.actor_id} (pid {os.getpid()}): vLLM's engine process died "
              f"({type(e).__name__} in {method.__name__}); exiting, for Ray to restart this actor with a new engine",
              file=sys.stderr, flush=True)
        os._exit(70)

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def guarded_async(self, *args, **kwargs):
            try:
                return await method(self, *args, **kwargs)
            except Exception as e:
                if dead(self, e):
                    exit_now(self, e)
                raise
        return guarded_async

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            if dead(self, e):
                exit_now(self, e)
            raise
    return guarded


def engine_kwargs(model_dir: str, rollout_cfg, seed: int, extension: str | None = None) -> dict:
    """Arguments of `vllm.LLM` / `AsyncEngineArgs` (the same engine settings for both variants); a vLLM weight
    transport (`rollout.weight_transport` nccl / ipc) adds vLLM's `weight_transfer_config`, `rollout.speculative`
    its `speculative_config`. `extension`: the engine workers' extension class in place of the served one (a
    subclass of it: the benchmarks' workers add their timing hooks this way)."""
    from actors.speculative import vllm_speculative_kwargs
    from actors.weight_transport import engine_transfer_kwargs

    steering = getattr(rollout_cfg, "steering", "none") == "rebalance"  # ReBalance hooks: actors/rebalance_vllm.py
    return dict(model=model_dir, dtype=rollout_cfg.dtype, enforce_eager=rollout_cfg.enforce_eager,
                gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, enable_prefix_caching=True, seed=seed,
                worker_extension_cls=extension or ("actors.rebalance_vllm.SteeredWeightReceiver" if steering
                                                   else "actors.weight_receiver.WeightReceiver"),
                **({"async_scheduling": False} if steering else {}),
                **({"block_size": rollout_cfg.block_size} if getattr(rollout_cfg, "block_size", None) else {}),
                **engine_transfer_kwargs(getattr(rollout_cfg, "weight_transport", "object_store")),
                **vllm_speculative_kwargs(getattr(rollout_cfg, "speculative", "none"),
                                          getattr(rollout_cfg, "speculative_tokens", 4)))


def init_request(init_info: dict):
    """vLLM's `WeightTransferInitRequest` (what `LLM` and `AsyncLLM.init_weight_transfer_engine` take)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    return WeightTransferInitRequest(init_info=init_info)


def update_request(update_info):
    """vLLM's `WeightTransferUpdateRequest` (what `LLM` and `AsyncLLM.update_weights` take)."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    return WeightTransferUpdateRequest(update_info=update_info)


def check_request(req: RolloutRequest, *, vocab_size: int, max_len: int) -> None:
    """Raise `RolloutRequestError` (one line) if the engine cannot serve `req`."""
    ids = req.prompt_ids + req.prefix_ids
    if req.n <= 0:
        raise RolloutRequestError(f"request {req.request_id}: n={req.n} must be >= 1")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RolloutRequestError(f"request {req.request_id}: token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(ids) + 1 > max_len:
        raise RolloutRequestError(f"request {req.request_id}: prompt+prefix of {len(ids)} tokens leaves no room in the model context of {max_len}")


def engine_inputs(req: RolloutRequest, *, temperature: float, top_k: int, max_new_tokens: int, max_len: int,
                  **sampling):
    """(TokensPrompt, SamplingParams) of one request: n samples after prompt + prefix, top-k logprobs, no text.

    The task's token budget counts the stored prefix, so a deeper branch point gets fewer new tokens."""
    from vllm import SamplingParams, TokensPrompt

    ids = req.prompt_ids + req.prefix_ids
    budget = max(1, max_new_tokens - len(req.prefix_ids))
    return (TokensPrompt(prompt_token_ids=ids),
            SamplingParams(n=req.n, temperature=temperature, max_tokens=min(budget, max_len - len(ids)),
                           logprobs=top_k, detokenize=False, **sampling))


def to_rollouts(req: RolloutRequest, out, *, top_k: int, task, version: int, actor_id: int) -> list[Rollout]:
    """One `Rollout` per completion of a finished vLLM `RequestOutput`, scored by the task's verifier."""
    rollouts = []
    for comp in out.outputs:
        tokens = list(comp.token_ids)
        lps, ents, top1s, alts, alt_lps = [], [], [], [], []
        for tok, pos in zip(tokens, comp.logprobs):
            lps.append(pos[tok].logprob)
            # vLLM returns the top-k plus the sampled token; keep exactly the top-k.
            topk = sorted(((lp.logprob, t) for t, lp in pos.items()), reverse=True)[:top_k]
            ents.append(entropy_from_topk([lp for lp, _ in topk]))
            top1s.append(topk[0][0])
            alt = next(((lp, t) for lp, t in topk if t != tok), (-1e9, -1))
            alts.append(alt[1])
            alt_lps.append(alt[0])
        rollouts.append(Rollout(
            request_id=req.request_id, root_id=req.root_id, prompt_ids=req.prompt_ids,
            prefix_ids=req.prefix_ids, token_ids=tokens, logprobs=lps, entropy=ents, top1_logprobs=top1s,
            alt_token_ids=alts, alt_logprobs=alt_lps,
            reward=task.reward(req.prompt_ids, req.prefix_ids + tokens),
            policy_version=version, actor_id=actor_id, branch_ref=req.branch_ref,
            forced=req.forced, cached_tokens=out.num_cached_tokens or 0))
    return rollouts


def sequence_inputs(token_ids: list[int]):
    """(TokensPrompt, SamplingParams) that score a fixed sequence: the logprob of every token after the first."""
    from vllm import SamplingParams, TokensPrompt

    return TokensPrompt(prompt_token_ids=token_ids), SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)


def sequence_logprobs_of(token_ids: list[int], out) -> list[float]:
    return [pos[tok].logprob for tok, pos in zip(token_ids[1:], out.prompt_logprobs[1:])]


class WorkerBase:
    """State and methods both engine variants share: config, actor id, policy version, task, cache counters."""

    engine_extension: str | None = None
    """The vLLM worker extension class of this actor's engine (None: the served one, see `engine_kwargs`)."""

    def _setup(self, *, model_dir: str, rollout_cfg, task_cfg, actor_id: int) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.kv_cache_gib))
        self.cfg = rollout_cfg
        self.actor_id = actor_id
        self.version = 0
        self.prompt_tokens = 0
        """Prompt + prefix tokens submitted to the engine (prefix-cache queries)."""
        self.cached_tokens = 0
        """Of those, tokens whose KV came from the prefix cache (hits)."""
        self.engine_s = 0.0
        """Seconds inside engine generate calls since the last `Generated` was returned."""
        self.task = make_task(task_cfg, tokenizer_dir=model_dir)

    def _check(self, req: RolloutRequest) -> None:
        check_request(req, vocab_size=self.vocab_size, max_len=self.max_len)

    def _split(self, requests: list[RolloutRequest], min_version: int) -> tuple[list[RolloutRequest], list[RequestError]]:
        """Servable requests and one `RequestError` per bad one; `StaleWeights` if this engine is too old."""
        self._check_version(min_version)
        good, errors = [], []
        for req in requests:
            try:
                self._check(req)
                good.append(req)
            except RolloutRequestError as e:
                errors.append(self._error(req, str(e)))
        return good, errors

    def _check_version(self, min_version: int) -> None:
        if self.version < min_version:
            raise StaleWeights(f"actor {self.actor_id} holds version {self.version} < {min_version}")

    def _error(self, req: RolloutRequest, message: str) -> RequestError:
        return RequestError(request_id=req.request_id, root_id=req.root_id, branch_ref=req.branch_ref,
                            actor_id=self.actor_id, message=message)

    def _inputs(self, req: RolloutRequest, temperature: float, **sampling):
        return engine_inputs(req, temperature=temperature, top_k=self.cfg.top_k_logprobs,
                             max_new_tokens=self.task.max_new_tokens, max_len=self.max_len, **sampling)

    def _count(self, req: RolloutRequest, out) -> None:
        self.prompt_tokens += len(req.prompt_ids) + len(req.prefix_ids)
        self.cached_tokens += out.num_cached_tokens or 0

    def _to_rollouts(self, requests: list[RolloutRequest], outputs: list) -> list[Rollout]:
        top_k = self.cfg.top_k_logprobs  # read once: an OmegaConf lookup costs ~20 us
        return [r for req, out in zip(requests, outputs)
                for r in to_rollouts(req, out, top_k=top_k, task=self.task, version=self.version,
                                     actor_id=self.actor_id)]

    def _generated(self, rollouts: list[Rollout], errors: list[RequestError]) -> Generated:
        engine_s, self.engine_s = self.engine_s, 0.0
        return Generated(rollouts=rollouts, errors=errors, actor_id=self.actor_id, version=self.version,
                         verifier_errors=self.task.pop_verifier_errors(), engine_s=engine_s)

    def get_version(self) -> int:
        return self.version

    def cache_stats(self, reset: bool = False) -> dict:
        """Prefix-cache queries and hits in tokens since the start (or the last reset)."""
        stats = {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens}
        if reset:
            self.prompt_tokens = self.cached_tokens = 0
        return stats

    def pid(self) -> int:
        """OS process id of this actor (fault-injection tests kill it)."""
        return os.getpid()


class RolloutWorker(WorkerBase):
    """`rollout.engine=sync`: `vllm.LLM`; one `generate` call at a time, its requests batched in one engine call."""

    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, actor_id: int, seed: int):
        self._setup(model_dir=model_dir, rollout_cfg=rollout_cfg, task_cfg=task_cfg, actor_id=actor_id)
        from vllm import LLM

        self.llm = LLM(**engine_kwargs(model_dir, rollout_cfg, seed, self.engine_extension))
        if getattr(rollout_cfg, "steering", "none") == "rebalance":  # every generate (rollouts, eval) is steered
            self.llm.collective_rpc("rebalance_setup", args=(os.path.expanduser(rollout_cfg.steering_path),))
        self.transferring = False
        """Between `transfer_start` and `transfer_finish` (a vLLM weight transfer): the model is half loaded."""
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_len = self.llm.llm_engine.model_config.max_model_len

    @exits_if_engine_dead
    def generate(self, requests: list[RolloutRequest], *, temperature: float | None = None,
                 min_version: int = 0) -> Generated:
        """Sample `req.n` continuations after prompt + prefix for every request; score each.

        A bad request (n <= 0, token ids outside the vocabulary, no room in the
        context) becomes one `RequestError`; the others are served. Raises
        `StaleWeights` when this engine's version is below `min_version` (a
        restarted actor that has not received the current weights yet).
        """
        if getattr(self, "transferring", False):
            raise RuntimeError(f"actor {self.actor_id}: generate during a weight transfer (between transfer_start "
                               "and transfer_finish); the rollout group holds generate calls back during a push")
        good, errors = self._split(requests, min_version)
        temperature = self.cfg.temperature if temperature is None else temperature
        try:
            outputs = self._engine_generate(good, temperature)
        except Exception as batch_error:  # noqa: BLE001 - an input vLLM rejects fails the batch: serve one by one
            if _engine_dead(batch_error):
                raise
            outputs, served = [], []
            for req in good:
                try:
                    outputs += self._engine_generate([req], temperature)
                    served.append(req)
                except Exception as e:  # noqa: BLE001 - that request alone fails; report it, keep serving
                    if _engine_dead(e):
                        raise
                    errors.append(self._error(req, f"request {req.request_id}: {type(e).__name__}: {e}"))
            good = served
        return self._generated(self._to_rollouts(good, outputs), errors)

    def _engine_generate(self, requests: list[RolloutRequest], temperature: float) -> list:
        if not requests:
            return []
        prompts, params = zip(*(self._inputs(req, temperature) for req in requests))
        t0 = time.perf_counter()
        outputs = self.llm.generate(list(prompts), list(params), use_tqdm=False)
        self.engine_s += time.perf_counter() - t0
        for req, out in zip(requests, outputs):
            self._count(req, out)
        return outputs

    @exits_if_engine_dead
    def update_weights(self, payload, version: int) -> int:
        """Load new weights (safetensors format: a uint8 array or bytes), drop the now-stale KV prefix cache, adopt
        the learner's version.

        The engine workers are child processes on this node: the weights reach them as a file in /dev/shm that
        they map (`staged_in_shm`), not through vLLM's RPC, which would pickle and copy them several times (5x
        slower for 100M parameters). Falls back to the RPC when /dev/shm is missing or full."""
        from actors.weight_transport import payload_bytes, staged_in_shm

        pause_point(f"update_weights@v{version}")
        with staged_in_shm(payload, str(version)) as path:
            n = self.llm.collective_rpc("load_weights_from_file", args=(path,))[0] if path else None
        if n is None:
            n = self.llm.collective_rpc("load_weights_from_bytes", args=(payload_bytes(payload),))[0]
        self.llm.reset_prefix_cache()
        self.version = version
        return n

    # ----- vLLM weight transfer (rollout.weight_transport nccl / ipc; actors.weight_sync drives it) -----
    def engine_workers(self) -> int:
        """Worker processes of this engine (tensor x pipeline parallel): its ranks in a transfer group."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    @exits_if_engine_dead
    def transfer_init(self, init_info: dict) -> None:
        """vLLM's `init_weight_transfer_engine` (nccl: blocks until learner rank 0 joins the group)."""
        self.llm.init_weight_transfer_engine(init_request(init_info))

    @exits_if_engine_dead
    def transfer_start(self) -> None:
        """vLLM's `start_weight_update` (layerwise reload begins); `generate` refuses until `transfer_finish`."""
        self.transferring = True
        try:
            self.llm.start_weight_update()
        except BaseException:
            self.transferring = False
            raise

    @exits_if_engine_dead
    def transfer_update(self, update_info) -> None:
        """vLLM's `update_weights`: receive one update (nccl: the learner broadcasts meanwhile) and load it."""
        try:
            self.llm.update_weights(update_request(update_info))
        except BaseException:
            self.transferring = False  # vLLM ends the update session on a failed chunk
            raise

    @exits_if_engine_dead
    def transfer_finish(self, version: int) -> int:
        """vLLM's `finish_weight_update` (layerwise reload finalised), then as after `update_weights`: the prefix
        cache is reset and the learner's version adopted."""
        try:
            self.llm.finish_weight_update()
            self.llm.reset_prefix_cache()
            self.version = version
        finally:
            self.transferring = False
        return version

    def transfer_shutdown(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    @exits_if_engine_dead
    def sequence_logprobs(self, token_ids: list[int], min_version: int = 0) -> list[float]:
        """log pi(x_t | x_<t) for t >= 1 of a fixed sequence (prompt logprobs), to compare with the learner.
        Raises `StaleWeights` below `min_version` (a restarted actor before its re-sync), as `generate` does."""
        self._check_version(min_version)
        pause_point(f"sequence_logprobs@v{self.version}")
        prompt, params = sequence_inputs(token_ids)
        return sequence_logprobs_of(token_ids, self.llm.generate([prompt], params, use_tqdm=False)[0])
