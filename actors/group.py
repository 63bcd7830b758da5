"""RolloutGroup: rollout workers as Ray actors, request routing, weight broadcast, fault recovery.

Routing (`actors.routing`): a request for a stored prefix goes to the actor
that last generated for that root (its vLLM prefix cache likely still holds
the KV); otherwise to the actor with the fewest samples queued in this call.

Faults: actors are created with `max_restarts`. When an actor dies during a
call, its requests are retried on the surviving actors (a failed call
returns nothing, so no rollout is lost or counted twice), and the restarted
actor is sent the latest weights before it is given requests again. Every
call carries `min_version`, so an actor that restarted unnoticed refuses to
serve with its initial weights (`StaleWeights`) and is re-synced.
An actor that has not taken the weights `actor_lost_after_s` seconds after
it died (Ray is out of restarts for it, or its engine cannot start) is
given up: the run goes on with the others, or stops with one line
(`RolloutActorLost`) when none is left. Ray's exceptions cannot tell a
final death from a death that will be restarted (calls to a restarting
actor fail too), so the bound is on time without a landed sync.

Bad requests do not fail the call: they come back as `RequestError`s, kept
in `self.errors` until `pop_errors()`.

`rollout.engine` picks the worker class: `sync` (`RolloutWorker`, vLLM's `LLM`)
or `async` (`AsyncRolloutWorker`, vLLM's `AsyncLLM`; Ray runs it as an async
actor, so calls to one actor overlap). The group's API is the same for both.
Benchmarks pass their own subclass (`worker_cls`, bench/workers.py).

Weights: `sync_weights(learner_group, version)` pushes by `rollout.weight_transport` (`actors.weight_sync`);
`update_weights(payload_ref, version)` is the object-store push itself.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time

from protocol.messages import Rollout, RolloutRequest
from actors.routing import route
from actors.rollout_worker import Generated, RequestError, RolloutWorker, StaleWeights
from actors.async_rollout_worker import AsyncRolloutWorker
from protocol.registry import lookup

ENGINES = {"sync": RolloutWorker, "async": AsyncRolloutWorker}
"""The rollout worker class of each `rollout.engine`."""


class RolloutActorLost(RuntimeError):
    """Every rollout actor has died and none took the current weights within `rollout.actor_lost_after_s`."""


def worker_class(engine: str):
    """The rollout worker class of `rollout.engine`."""
    return lookup("rollout engine", ENGINES, engine)


class RolloutGroup:
    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, seed: int, env_vars: dict[str, str] | None = None,
                 worker_cls=None):
        """worker_cls: the actor class (default: `worker_class(rollout_cfg.engine)`; benchmarks pass a subclass)."""
        import ray

        self.cfg = rollout_cfg
        worker_cls = worker_cls or worker_class(rollout_cfg.engine)
        actor_cls = ray.remote(worker_cls).options(
            num_cpus=rollout_cfg.num_cpus_per_actor, num_gpus=rollout_cfg.num_gpus_per_actor,
            max_restarts=rollout_cfg.max_restarts, max_task_retries=0,
            runtime_env={"env_vars": {**(env_vars or {}), "VLLM_CPU_KVCACHE_SPACE": str(rollout_cfg.kv_cache_gib)}})
        self.actors = [actor_cls.remote(model_dir=model_dir, rollout_cfg=rollout_cfg, task_cfg=task_cfg,
                                        actor_id=i, seed=seed + i) for i in range(rollout_cfg.num_actors)]
        ray.get([a.get_version.remote() for a in self.actors])  # wait until every engine is up
        self.root_owner: dict[str, int] = {}
        self.errors: list[RequestError] = []
        self.verifier_errors = 0
        """Samples whose verifier raised, scored 0 (cumulative)."""
        self.last_engine_s = 0.0
        """Seconds the last `generate` call spent inside the engines' own generate (the slowest actor of each round)."""
        self.retried_requests = 0
        """Requests re-sent to another actor after their actor died (cumulative)."""
        self.restarts_seen = 0
        """Actor failures observed (each triggers a weight re-sync of the restarted actor)."""
        self._latest = None  # (payload ref, version) of the last push
        self._version = 0
        self._syncing: dict[int, object] = {}  # actor index -> ref of its pending re-sync
        self._down_since: dict[int, float] = {}  # actor index -> when it died (cleared when a sync lands)
        self.lost: set[int] = set()
        """Actors given up on (no sync landed within `actor_lost_after_s` of their death); never routed to again."""
        self._init_weight_state()

    def _init_weight_state(self) -> None:
        """What the vLLM weight transports add (kept apart so tests can build a group without actors)."""
        from actors.weight_transport import TRANSPORTS

        self._latest_fn = None  # after a vLLM-engine transfer: fetches an object-store copy for a re-sync
        self._weight_sync = None  # actors.weight_sync.WeightSync, made by the first sync_weights
        self._push_lock = threading.RLock()
        self._exclusive = TRANSPORTS[getattr(self.cfg, "weight_transport", "object_store")].vllm_backend is not None
        """A push is three calls per actor (start, update, finish): generate calls wait until it is done."""

    # ----- generation -------------------------------------------------------------------------------------------
    def generate(self, requests: list[RolloutRequest], *, temperature: float | None = None) -> list[Rollout]:
        """Rollouts of every servable request (each exactly once); bad requests go to `self.errors`."""
        with self._serving():
            return self._generate(requests, temperature)

    def _generate(self, requests: list[RolloutRequest], temperature: float | None) -> list[Rollout]:
        import ray
        from ray.exceptions import RayActorError

        rollouts: list[Rollout] = []
        todo, attempt = list(requests), 0
        self.last_engine_s = 0.0
        while todo:
            queues = route(todo, self._available(), self.root_owner, affinity=self.cfg.affinity)
            calls = [(i, q, self.actors[i].generate.remote(q, temperature=temperature, min_version=self._version))
                     for i, q in enumerate(queues) if q]
            todo, round_engine_s = [], 0.0
            for i, q, ref in calls:
                try:
                    out: Generated = ray.get(ref)
                except (RayActorError, StaleWeights) as e:
                    self._resync(i, died=not isinstance(e, StaleWeights))
                    todo += q
                    continue
                rollouts += out.rollouts
                round_engine_s = max(round_engine_s, out.engine_s)
                self.errors += out.errors
                self.verifier_errors += out.verifier_errors
            self.last_engine_s += round_engine_s  # actors run in parallel: a round takes its slowest engine
            if todo:
                attempt += 1
                self.retried_requests += len(todo)
                if attempt > self.cfg.request_retries:
                    raise RuntimeError(f"{len(todo)} requests failed on {attempt} actors in a row; giving up")
        return rollouts

    def pop_errors(self) -> list[RequestError]:
        """Requests that were not served since the last call (bad input), for the driver to count and release."""
        errors, self.errors = self.errors, []
        return errors

    def cache_stats(self, reset: bool = False) -> dict:
        """Prefix-cache queries/hits in tokens summed over actors, and the hit rate."""
        stats = self._get([a.cache_stats.remote(reset) for a in self.actors])
        q, h = sum(s["prompt_tokens"] for s in stats), sum(s["cached_tokens"] for s in stats)
        return {"prompt_tokens": q, "cached_tokens": h, "hit_rate": h / q if q else 0.0}

    # ----- weights -------------------------------------------------------------------------------------------------
    def sync_weights(self, learner, version: int) -> None:
        """Push `learner`'s (a `LearnerGroup`) current weights to every actor by `rollout.weight_transport`; they
        serve as policy `version` afterwards. object_store: `update_weights(learner.async_weights(zero_copy=True),
        version)`; nccl / ipc: vLLM's weight-transfer engines (`actors.weight_sync.WeightSync`)."""
        from actors.weight_sync import WeightSync

        if self._weight_sync is None or self._weight_sync.learner is not learner:
            self._weight_sync = WeightSync(self, learner, getattr(self.cfg, "weight_transport", "object_store"),
                                           getattr(self.cfg, "weight_bucket_mb", 256))
        self._weight_sync.push(version)

    @contextlib.contextmanager
    def pushing(self):
        """Held by a vLLM-engine push: generate and sequence_logprobs wait until the transfer is done."""
        with self._push_lock:
            yield

    def _serving(self):
        return self._push_lock if self._exclusive else contextlib.nullcontext()

    def live_actors(self) -> list:
        """Handles of the actors not given up on, in actor order."""
        return [a for i, a in enumerate(self.actors) if i not in self.lost]

    def engine_workers(self, actors: list) -> list[int]:
        """Engine worker processes of each of `actors` (their ranks in a weight-transfer group)."""
        return self._get([a.engine_workers.remote() for a in actors])

    def transferred(self, version: int, payload_fn) -> None:
        """A push that went around `update_weights` (vLLM's transfer engines) landed on every live actor.

        payload_fn(): an object-store payload (ref) of the learner's weights; called only if a restarted actor needs
        re-syncing before the next push (the learner may have moved on by one update in the async mode: the actor
        then serves those weights under `version`, until the next push)."""
        self._version, self._latest, self._latest_fn = version, None, payload_fn
        self._syncing.clear()
        self._down_since.clear()

    def update_weights(self, payload_ref, version: int) -> None:
        """Every actor loads the same object-store copy of the weights (`PackedWeights` or safetensors bytes, or a
        ref of either); resets its prefix cache."""
        self._latest, self._version, self._latest_fn = (payload_ref, version), version, None
        import ray

        from ray.exceptions import RayActorError

        refs = {i: a.update_weights.remote(payload_ref, version) for i, a in enumerate(self.actors) if i not in self.lost}
        self._syncing.clear()
        for i, ref in refs.items():
            try:
                ray.get(ref)
                self._down_since.pop(i, None)
            except RayActorError:
                self._resync(i, died=True)

    def _resync(self, i: int, *, died: bool) -> None:
        """Actor i restarted (or is stale): send it the latest weights; it takes requests once that has landed."""
        self.restarts_seen += died
        if died:
            self._down_since.setdefault(i, time.monotonic())
        a = self.actors[i]
        if self._latest is None and self._latest_fn is not None:  # the last push went by a vLLM transfer engine
            self._latest = (self._latest_fn(), self._version)
        self._syncing[i] = (a.update_weights.remote(*self._latest) if self._latest is not None
                            else a.get_version.remote())

    def _available(self) -> list[bool]:
        """Actors not waiting for a re-sync; if none is, wait for the first re-sync to land."""
        import ray
        from ray.exceptions import RayActorError

        lost_after = float(self.cfg.actor_lost_after_s)
        while True:
            failed = False
            for i, ref in list(self._syncing.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    try:
                        ray.get(ref)
                        del self._syncing[i]
                        self._down_since.pop(i, None)
                    except RayActorError:  # died again during the sync: try again after its next restart
                        if time.monotonic() - self._down_since.get(i, time.monotonic()) > lost_after:
                            self._give_up(i, lost_after)
                        else:
                            self._resync(i, died=True)
                            failed = True
            ok = [i not in self._syncing and i not in self.lost for i in range(len(self.actors))]
            if any(ok):
                return ok
            if len(self.lost) == len(self.actors):
                raise RolloutActorLost(
                    f"every rollout actor died and none took the weights within rollout.actor_lost_after_s={lost_after:g} s "
                    f"(rollout.max_restarts={self.cfg.max_restarts}); see the actors' logs under the Ray "
                    "session folder")
            if failed:
                time.sleep(0.5)  # a dead actor fails every call at once: do not spin
            else:
                ray.wait(list(self._syncing.values()), num_returns=1, timeout=min(600.0, lost_after))

    def _give_up(self, i: int, lost_after: float) -> None:
        import ray

        ray.kill(self.actors[i], no_restart=True)  # one that is only slow to come back must not hold its CPUs/GPU
        del self._syncing[i]
        self._down_since.pop(i, None)
        self.lost.add(i)
        print(f"[graftrl] warning: rollout actor {i} has not come back {lost_after:g} s after it died; going on "
              f"with {len(self.actors) - len(self.lost)} of {len(self.actors)} actors", file=sys.stderr, flush=True)

    # ----- misc ------------------------------------------------------------------------------------------------------
    def sequence_logprobs(self, token_ids: list[int], actor: int | None = None) -> list[float]:
        """log pi(x_t | x_<t) under actor `actor`'s weights (default: the first actor serving with the latest)."""
        with self._serving():
            if actor is None:
                actor = self._available().index(True)
            return self._get(self.actors[actor].sequence_logprobs.remote(token_ids))

    def pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors])

    def _get(self, refs):
        import ray

        return ray.get(refs)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
