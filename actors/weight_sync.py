"""WeightSync: one weight push from the learner group to the rollout group, by `rollout.weight_transport`.

    sync = WeightSync(rollout_group, learner_group, rollout_cfg.weight_transport, rollout_cfg.weight_bucket_mb)
    sync.push(version)          # every update; `RolloutGroup.sync_weights(learner_group, version)` keeps one

`object_store`: exactly the path the driver always took,
`rollout.update_weights(learner.async_weights(zero_copy=True), version)`.

`nccl` / `ipc` (GPU only): vLLM's own weight-transfer engines. The trainer side runs in the learner ranks
(`Learner.init_weight_transfer` builds it through vLLM's `WeightTransferTrainerFactory.trainer_init`;
`Learner.send_weights` calls its `send_weights()`), and vLLM's trainer engine drives the inference side itself,
through a client with the four methods of vLLM's `VLLMWeightSyncClient` protocol. `RolloutSyncClient` is that
client over our rollout actors: it fans every call out to all of them at once and waits for all. The order is
vLLM's (nccl_engine.py / ipc_engine.py, vLLM 0.32):

    first push    trainer_init: client.init_weight_transfer_engine(init_info)  -> every actor's transfer_init
                  (nccl: concurrently with learner rank 0 opening NCCL rank 0; each actor gets its own rank_offset)
    every push    client.start_weight_update()   -> every actor's transfer_start
                  client.update_weights(info)    -> every actor's transfer_update (nccl: concurrently with the
                                                    learner's broadcast; ipc: carries the IPC handles)
                  client.finish_weight_update()  -> every actor's transfer_finish(version): layerwise reload
                                                    finalised, prefix cache reset, the version adopted

The rollout group's generate calls and a vLLM-backend push exclude each other (`RolloutGroup.pushing`): a
synchronous actor would otherwise serve a generate that arrives between start and finish from a half-loaded model.

Faults: vLLM's transfer group is fixed at init. A restarted rollout actor is re-synced through the object store
(`RolloutGroup.transferred` keeps a way to fetch the weights), and from then on every push goes through the object
store (one warning line): the old NCCL group lacks the new process. Not run on a GPU: see docs/ROLLOUT.md.
"""
from __future__ import annotations

import sys

from actors.weight_transport import TRANSPORTS


def transfer_ranks(workers_per_actor: list[int]) -> tuple[int, list[int]]:
    """Transfer-group size (learner rank 0 + every engine worker) and each actor's rank offset (its first worker's
    rank). workers_per_actor[i]: tensor-parallel x pipeline-parallel size of actor i's engine."""
    offsets, rank = [], 1
    for n in workers_per_actor:
        if n < 1:
            raise ValueError(f"an engine has {n} workers; each has at least 1")
        offsets.append(rank)
        rank += n
    return rank, offsets


class RolloutSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over rollout actors (Ray handles): each call goes to every actor at
    once and returns when all have answered. It travels to learner rank 0 (pickled with the handles), where vLLM's
    trainer engine calls it.

    `version` is set by `Learner.send_weights` before each push: vLLM's trainer engines call
    `finish_weight_update()` without one, and the actors must adopt the learner's."""

    def __init__(self, actors: list, rank_offsets: list[int], get=None):
        self.actors, self.rank_offsets = list(actors), list(rank_offsets)
        self.version: int | None = None
        self._get_fn = get
        """How to wait for the calls (default `ray.get`; tests pass their own)."""

    def _get(self, refs):
        if self._get_fn is not None:
            return self._get_fn(refs)
        import ray

        return ray.get(refs)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """nccl: every actor joins the transfer group at its own ranks (vLLM's trainer writes rank_offset=1, which
        holds for one engine only); ipc: records the wire parameters."""
        infos = [{**init_info, "rank_offset": off} if "rank_offset" in init_info else dict(init_info)
                 for off in self.rank_offsets]
        self._get([a.transfer_init.remote(info) for a, info in zip(self.actors, infos)])

    def start_weight_update(self) -> None:
        self._get([a.transfer_start.remote() for a in self.actors])

    def update_weights(self, update_info) -> None:
        self._get([a.transfer_update.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        if version is None:
            raise RuntimeError("RolloutSyncClient.finish_weight_update: no version set (Learner.send_weights sets it)")
        self._get([a.transfer_finish.remote(version) for a in self.actors])

    def shutdown_weight_transfer_engine(self) -> None:
        self._get([a.transfer_shutdown.remote() for a in self.actors])


class WeightSync:
    """The push of `rollout.weight_transport` between one rollout group and one learner group (see the module doc).

    rollout: a `RolloutGroup` (or anything with its `update_weights`, `engine_workers`, `live_actors`,
    `pushing`, `transferred` and `restarts_seen`); learner: a `LearnerGroup` (`async_weights`,
    `init_weight_transfer`, `send_weights`)."""

    def __init__(self, rollout, learner, transport: str, bucket_mb: int = 256, log=None, get=None):
        """get: how the client waits for actor calls (default `ray.get`; tests pass their own)."""
        self.rollout, self.learner, self.get = rollout, learner, get
        self.transport = TRANSPORTS[transport]
        self.bucket_bytes = int(bucket_mb) << 20
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.initialised = False
        self.fell_back = False
        """A rollout actor restarted after the transfer group was built: every push goes by the object store."""
        self._restarts = 0

    @property
    def by_object_store(self) -> bool:
        """Pushes go through the object store (`object_store`, or a vLLM transport that fell back)."""
        return self.transport.vllm_backend is None or self.fell_back

    def push(self, version: int, payload=None) -> None:
        """The learner's current weights into every rollout engine, which then serve as policy `version`.
        payload: the weights already exported (`LearnerGroup.train_step_and_export`), used by an object-store push."""
        if self.transport.vllm_backend is not None and not self.fell_back:
            with self.rollout.pushing():
                if self.initialised and self.rollout.restarts_seen != self._restarts:
                    self.fell_back = True
                    self.log(f"[graftrl] warning: a rollout actor restarted; vLLM's {self.transport.name} transfer "
                             "group cannot take the new process in, so weights go by the object store from now on")
                else:
                    if not self.initialised:
                        self._init()
                    self.learner.send_weights(version)
                    self.rollout.transferred(version, lambda: self.learner.async_weights(zero_copy=True))
                    return
        self.rollout.update_weights(payload if payload is not None else self.learner.async_weights(zero_copy=True),
                                    version)

    def _init(self) -> None:
        """Once, before the first push: the transfer group over the live actors (vLLM's trainer_init)."""
        actors = self.rollout.live_actors()
        world_size, offsets = transfer_ranks(self.rollout.engine_workers(actors))
        self.learner.init_weight_transfer(self.transport.name, RolloutSyncClient(actors, offsets, get=self.get),
                                          world_size=world_size, buffer_bytes=self.bucket_bytes)
        self._restarts = self.rollout.restarts_seen
        self.initialised = True
