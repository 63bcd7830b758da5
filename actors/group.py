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
Every call to an actor goes through this recovery, not only `generate`:
the wait for the engines at start (a kill while an engine starts), `pids`,
`update_weights` (a death mid-push), `sequence_logprobs` (the final weight
check; it too refuses stale weights) and `cache_stats`. An actor is given
up at once when Ray reports it DEAD (out of `max_restarts`, or its engine
raised while starting), else when it has not taken the weights
`actor_lost_after_s` seconds after it died (a restart that never ends):
the run goes on with the others, or stops with one line
(`RolloutActorLost`, naming each actor, its pid and the call it died in)
when none is left. Each death and each return is one `[graftrl]` line on
stderr (the actor, its pid, the call; the new pid and the weights' version).

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
    """No rollout actor is left (each died and Ray will not restart it, or none took the current weights within
    `rollout.actor_lost_after_s`), or a call failed on `rollout.request_retries` + 1 actors in a row. The message is
    one line naming the actors, their pids and the calls they died in."""


def actor_died_errors() -> tuple[type, ...]:
    """What a call raises when its actor's process is gone: `RayActorError` (ActorDiedError, or
    ActorUnavailableError while Ray restarts it), and `OutOfMemoryError` for an actor Ray's memory monitor killed
    and will not restart."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    return RayActorError, OutOfMemoryError


def worker_class(engine: str):
    """The rollout worker class of `rollout.engine`."""
    return lookup("rollout engine", ENGINES, engine)


class RolloutGroup:
    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, seed: int, env_vars: dict[str, str] | None = None,
                 worker_cls=None, wait: bool = True):
        """worker_cls: the actor class (default: `worker_class(rollout_cfg.engine)`; benchmarks pass a subclass).
        wait=False returns as soon as the actors are created (their engines start in the background): the caller
        starts other components meanwhile and calls `wait_started()` before the first request."""
        import ray

        self.cfg = rollout_cfg
        worker_cls = worker_cls or worker_class(rollout_cfg.engine)
        actor_cls = ray.remote(worker_cls).options(
            num_cpus=rollout_cfg.num_cpus_per_actor, num_gpus=rollout_cfg.num_gpus_per_actor,
            max_restarts=rollout_cfg.max_restarts, max_task_retries=0,
            runtime_env={"env_vars": {**(env_vars or {}), "VLLM_CPU_KVCACHE_SPACE": str(rollout_cfg.kv_cache_gib)}})
        self.actors = [actor_cls.remote(model_dir=model_dir, rollout_cfg=rollout_cfg, task_cfg=task_cfg,
                                        actor_id=i, seed=seed + i) for i in range(rollout_cfg.num_actors)]
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
        """Actors given up on (Ray will not restart them, or no sync landed within `actor_lost_after_s` of their
        death); never routed to again."""
        self._init_fault_state()
        self._init_weight_state()
        if wait:
            self.wait_started()

    def _init_fault_state(self) -> None:
        """What the fault handling keeps besides `_syncing`, `_down_since` and `lost` (tests without actors call it)."""
        self._pids: dict[int, int] = {}  # actor index -> its process id, as last seen (the one that died, after a death)
        self._died_in: dict[int, str] = {}  # actor index -> the call during which its last death was noticed
        self._lost_why: dict[int, str] = {}  # actor index -> one line: why it was given up
        self._state_lock = threading.RLock()  # async mode: the prefetch thread's generate beside the driver's push

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
        died_errors = actor_died_errors()

        rollouts: list[Rollout] = []
        todo, attempt = list(requests), 0
        self.last_engine_s = 0.0
        while todo:
            queues = route(todo, self._available(), self.root_owner, affinity=self.cfg.affinity)
            calls = [(i, q, self.actors[i].generate.remote(q, temperature=temperature, min_version=self._version))
                     for i, q in enumerate(queues) if q]
            todo, round_engine_s, failed = [], 0.0, []
            for i, q, ref in calls:
                try:
                    out: Generated = ray.get(ref)
                except (*died_errors, StaleWeights) as e:
                    self._resync(i, died=not isinstance(e, StaleWeights), call="generate")
                    todo += q
                    failed.append(self._describe(i) + (" was stale" if isinstance(e, StaleWeights) else " died"))
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
                    raise RolloutActorLost(f"generate: {len(todo)} requests failed {attempt} times in a row "
                                           f"(rollout.request_retries={self.cfg.request_retries}); last: "
                                           f"{', '.join(failed)}")
        return rollouts

    def pop_errors(self) -> list[RequestError]:
        """Requests that were not served since the last call (bad input), for the driver to count and release."""
        errors, self.errors = self.errors, []
        return errors

    def cache_stats(self, reset: bool = False) -> dict:
        """Prefix-cache queries/hits in tokens summed over the live actors, and the hit rate (a dead actor's counters
        died with it: it counts 0, and is re-synced)."""
        import ray
        died_errors = actor_died_errors()

        refs = {i: a.cache_stats.remote(reset) for i, a in enumerate(self.actors) if i not in self.lost}
        stats = []
        for i, ref in refs.items():
            try:
                stats.append(ray.get(ref))
            except died_errors:
                self._resync(i, died=True, call="cache_stats")
        q, h = sum(s["prompt_tokens"] for s in stats), sum(s["cached_tokens"] for s in stats)
        return {"prompt_tokens": q, "cached_tokens": h, "hit_rate": h / q if q else 0.0}

    # ----- weights -------------------------------------------------------------------------------------------------
    def sync_weights(self, learner, version: int, payload=None) -> None:
        """Push `learner`'s (a `LearnerGroup`) current weights to every actor by `rollout.weight_transport`; they
        serve as policy `version` afterwards. object_store: `update_weights(payload, version)`, payload the weights
        the learner exported with its update or else `learner.async_weights(zero_copy=True)`; nccl / ipc: vLLM's
        weight-transfer engines (`actors.weight_sync.WeightSync`)."""
        self._weight_sync_for(learner).push(version, payload)

    def takes_exported_weights(self, learner) -> bool:
        """Whether the next push goes through the object store, so the learner should export its weights with the
        update (`LearnerGroup.train_step_and_export`) and hand them to `sync_weights`."""
        return self._weight_sync_for(learner).by_object_store

    def _weight_sync_for(self, learner):
        from actors.weight_sync import WeightSync

        if self._weight_sync is None or self._weight_sync.learner is not learner:
            self._weight_sync = WeightSync(self, learner, getattr(self.cfg, "weight_transport", "object_store"),
                                           getattr(self.cfg, "weight_bucket_mb", 256))
        return self._weight_sync

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

        died_errors = actor_died_errors()

        refs = {i: a.update_weights.remote(payload_ref, version) for i, a in enumerate(self.actors) if i not in self.lost}
        with self._state_lock:
            self._syncing.clear()
        for i, ref in refs.items():
            try:
                ray.get(ref)
                self._landed(i)
            except died_errors:  # died mid-push (or before it, restarting): re-sent until it is back
                self._resync(i, died=True, call=f"update_weights (version {version})")

    def _resync(self, i: int, *, died: bool, call: str = "a call") -> None:
        """Actor i died during `call` (or is stale): send it the latest weights; it takes requests once that has
        landed. Gives it up instead when Ray will not restart it or it has been down `actor_lost_after_s`; raises
        `RolloutActorLost` when that leaves no actor."""
        with self._state_lock:
            if died:
                now, new = time.monotonic(), i not in self._down_since  # (failures while it restarts: not new)
                if new:
                    self._down_since[i] = now
                    self.restarts_seen += 1
                    self._died_in[i] = call
                lost_after = float(self.cfg.actor_lost_after_s)
                dead = self._dead_for_good(i)
                if dead or now - self._down_since[i] > lost_after:
                    self._give_up(i, f"Ray will not restart it ({dead})" if dead else
                                  f"did not take the weights within rollout.actor_lost_after_s={lost_after:g} s")
                    return
                if new:
                    others = "; its requests go to the other actors meanwhile" if len(self.actors) > 1 else ""
                    print(f"[graftrl] warning: {self._describe(i)} died during {call}; it gets the latest weights "
                          f"once Ray has restarted it (rollout.max_restarts={self.cfg.max_restarts}){others}",
                          file=sys.stderr, flush=True)
            a = self.actors[i]
            if self._latest is None and self._latest_fn is not None:  # the last push went by a vLLM transfer engine
                self._latest = (self._latest_fn(), self._version)
            self._syncing[i] = (a.update_weights.remote(*self._latest) if self._latest is not None
                                else a.get_version.remote())

    def _landed(self, i: int) -> None:
        """Actor i took the current weights: it serves again (a restarted one is announced with its new pid)."""
        with self._state_lock:
            self._syncing.pop(i, None)
            down = self._down_since.pop(i, None)
            if down is None:
                return
            state = self._ray_state(i)
            if state and state.get("Pid"):
                self._pids[i] = int(state["Pid"])
            print(f"[graftrl] {self._describe(i)} is back {time.monotonic() - down:.1f} s after it died during "
                  f"{self._died_in.get(i, 'a call')}, serving policy version {self._version}", file=sys.stderr,
                  flush=True)

    def _poll(self) -> bool:
        """Account for the re-syncs that have landed or failed (without waiting); True if one failed."""
        import ray
        died_errors = actor_died_errors()

        failed = False
        for i, ref in list(self._syncing.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(ref)
                self._landed(i)
            except died_errors:  # died again during the sync, or still restarting: again after its restart
                self._resync(i, died=True, call="its weight re-sync")
                failed = True
        return failed

    def _wait_syncs(self, failed: bool, only: list[int] | None = None) -> None:
        import ray

        refs = [r for i, r in self._syncing.items() if only is None or i in only]
        if failed or not refs:
            time.sleep(0.5)  # a dead actor fails every call at once: do not spin
        else:
            ray.wait(refs, num_returns=1, timeout=min(600.0, float(self.cfg.actor_lost_after_s)))

    def _available(self) -> list[bool]:
        """Actors not waiting for a re-sync; if none is, wait for the first re-sync to land."""
        while True:
            failed = self._poll()
            ok = [i not in self._syncing and i not in self.lost for i in range(len(self.actors))]
            if any(ok):
                return ok
            if len(self.lost) == len(self.actors):
                raise RolloutActorLost(self._lost_message())
            self._wait_syncs(failed)

    def _await(self, i: int) -> bool:
        """Wait until actor i serves with the current weights (True) or is given up (False)."""
        while True:
            failed = self._poll()
            if i in self.lost:
                return False
            if i not in self._syncing:
                return True
            self._wait_syncs(failed, [i])

    def _give_up(self, i: int, why: str) -> None:
        import ray

        with self._state_lock:
            with contextlib.suppress(Exception):  # one that is only slow to come back must not hold its CPUs/GPU
                ray.kill(self.actors[i], no_restart=True)
            self._syncing.pop(i, None)
            self._down_since.pop(i, None)
            self.lost.add(i)
            self._lost_why[i] = f"{self._describe(i)} died during {self._died_in.get(i, 'a call')} and {why}"
            left = len(self.actors) - len(self.lost)
            if left == 0:
                raise RolloutActorLost(self._lost_message())
            print(f"[graftrl] warning: {self._lost_why[i]}; going on with {left} of {len(self.actors)} actors",
                  file=sys.stderr, flush=True)

    def _lost_message(self) -> str:
        whys = [self._lost_why.get(i, f"{self._describe(i)} was given up") for i in sorted(self.lost)]
        return "; ".join(whys) + f"; no rollout actor is left (rollout.num_actors={len(self.actors)})"

    def _describe(self, i: int) -> str:
        return f"rollout actor {i} (pid {self._pids.get(i, '?')})"

    def _ray_state(self, i: int) -> dict | None:
        """Ray's record of actor i (its GCS table entry: State, NumRestarts, Pid, ...); None when Ray cannot say."""
        try:
            import ray
            from ray._private.state import actors as actor_table  # what `ray list actors` reads; no dashboard needed

            if not ray.is_initialized():
                return None
            return actor_table(self.actors[i]._actor_id.hex()) or None
        except Exception:  # noqa: BLE001 - a handle without Ray (tests), or an API that moved: fall back on time
            return None

    def _dead_for_good(self, i: int) -> str:
        """Why Ray will never restart actor i (it is DEAD: out of restarts, or its constructor raised), else ''."""
        state = self._ray_state(i)
        if not state or state.get("State") != "DEAD":
            return ""
        if i not in self._pids and state.get("Pid"):
            self._pids[i] = int(state["Pid"])  # died before it ever answered: Ray's record has the pid
        try:
            cause = state["DeathCause"]  # a protobuf ActorDeathCause
            if cause.WhichOneof("context") == "creation_task_failure_context":
                raised = cause.creation_task_failure_context.formatted_exception_string.strip().splitlines()
                return f"its engine raised while starting: {raised[-1].strip()}"
            if cause.WhichOneof("context") == "oom_context":
                return f"Ray's memory monitor killed it, rollout.max_restarts={self.cfg.max_restarts}"
        except Exception:  # noqa: BLE001 - no cause recorded, or another layout: the generic reason
            pass
        return f"out of restarts: rollout.max_restarts={self.cfg.max_restarts}"

    def wait_started(self) -> None:
        """Wait until every engine is up. An actor killed while its engine starts is restarted by Ray: wait for it
        (bounded like any dead actor); one Ray will not restart is given up (the others go on)."""
        import ray
        died_errors = actor_died_errors()

        pending = {i: a.pid.remote() for i, a in enumerate(self.actors)}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1)
            i = next(i for i, r in pending.items() if r == ready[0])
            del pending[i]
            try:
                self._pids[i] = ray.get(ready[0])
                self._landed(i)
            except died_errors:
                self._resync(i, died=True, call="its engine start")  # raises when no actor is left
                if i not in self.lost:
                    self._syncing.pop(i, None)
                    time.sleep(0.5)
                    pending[i] = self.actors[i].pid.remote()

    def _call(self, i: int | None, method: str, *args, **kwargs):
        """`method` on actor i (None: the first one serving), surviving deaths: a dead actor is re-synced and the call
        goes to it again once it is back (i given), or to the next serving actor; at most request_retries + 1 tries."""
        import ray
        died_errors = actor_died_errors()

        for _ in range(self.cfg.request_retries + 1):
            j = self._available().index(True) if i is None else i
            if i is not None and not self._await(i):
                raise RolloutActorLost(self._lost_why[i] + f" (asked for {method})")
            try:
                return ray.get(getattr(self.actors[j], method).remote(*args, **kwargs))
            except (*died_errors, StaleWeights) as e:
                self._resync(j, died=not isinstance(e, StaleWeights), call=method)
        raise RolloutActorLost(f"{method} failed {self.cfg.request_retries + 1} times in a row "
                               f"(rollout.request_retries={self.cfg.request_retries}); last: {self._describe(j)}")

    # ----- misc ------------------------------------------------------------------------------------------------------
    def sequence_logprobs(self, token_ids: list[int], actor: int | None = None) -> list[float]:
        """log pi(x_t | x_<t) under actor `actor`'s weights (default: the first actor serving with the latest).
        An actor that died (or restarted unnoticed) gets the latest weights first: the run's final weight check."""
        with self._serving():
            return self._call(actor, "sequence_logprobs", token_ids, min_version=self._version)

    def pids(self) -> list[int | None]:
        """Process id of each actor (a restarting one's once it is back; None: given up)."""
        for i in range(len(self.actors)):
            if i not in self.lost:
                try:
                    self._pids[i] = self._call(i, "pid")
                except RolloutActorLost:
                    if len(self.lost) == len(self.actors):
                        raise
        return [None if i in self.lost else self._pids.get(i) for i in range(len(self.actors))]

    def _get(self, refs):
        import ray

        return ray.get(refs)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
