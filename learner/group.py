"""LearnerGroup: `learner_cfg.world_size` data-parallel Learner ranks as Ray actors, or one in-process.

Every rank receives the whole batch (one object in the Ray store) and keeps
its shard; all ranks run every call that may be a collective (train step,
weight export and log-probs under ZeRO-3, checkpoints) and rank 0 answers.
The ranks are created first, rank 0 names the master address and a free
port on its node, then all ranks build their DeepSpeed engine concurrently
(`deepspeed.initialize` blocks until every rank has joined).
"""
from __future__ import annotations

import os
import socket

from learner.batch import TrainBatch
from learner.learner import Learner


class _Rank:
    """The Ray-side holder of one Learner rank (constructed in two phases, see the module docstring)."""

    def master(self) -> tuple[str, int]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, **kwargs) -> int:
        self.learner = Learner(**kwargs)
        return os.getpid()

    def call(self, method: str, *args, **kwargs):
        return getattr(self.learner, method)(*args, **kwargs)


class LearnerDied(RuntimeError):
    """A learner rank's process died (killed, out of memory, crashed); the group cannot go on without it."""


class LearnerGroup:
    def __init__(self, *, model_dir: str, learner_cfg, seed: int, micro_batch_size: int, env_vars: dict[str, str] | None = None,
                 local: bool = False):
        """local=True: one Learner in this process (world size 1), same API, for tests and debugging."""
        self.world_size = 1 if local else int(learner_cfg.world_size)
        self.zero_stage = learner_cfg.zero_stage
        kwargs = dict(model_dir=model_dir, learner_cfg=learner_cfg, seed=seed, micro_batch_size=micro_batch_size)
        if local:
            self.local, self.actors = Learner(**kwargs), []
            self.pids = [os.getpid()]
            return
        import ray

        self.local = None
        actor_cls = ray.remote(_Rank).options(num_cpus=learner_cfg.num_cpus, num_gpus=learner_cfg.num_gpus,
                                              runtime_env={"env_vars": env_vars or {}})
        self.actors = [actor_cls.remote() for _ in range(self.world_size)]
        addr, port = ray.get(self.actors[0].master.remote())
        self.pids: list[int] = ray.get([a.init.remote(rank=r, world_size=self.world_size, master_addr=addr,
                                                      master_port=port, **kwargs) for r, a in enumerate(self.actors)])
        """Process id of each rank (rank r at index r)."""

    def _all(self, method: str, *args, **kwargs):
        """Run `method` on every rank (collectives need all); rank 0's result (an ObjectRef when remote)."""
        if self.local is not None:
            return getattr(self.local, method)(*args, **kwargs)
        refs = [a.call.remote(method, *args, **kwargs) for a in self.actors]
        return refs[0], refs

    def _get(self, method: str, *args, **kwargs):
        if self.local is not None:
            return self._all(method, *args, **kwargs)
        first, refs = self._all(method, *args, **kwargs)
        return self._wait(method, first, refs)

    def _wait(self, method: str, first, refs: list):
        """rank 0's result `first` once every rank's `refs` is done; LearnerDied naming the rank that died."""
        import ray

        from ray.exceptions import RayActorError

        # Results as they come, not in rank order: when rank r > 0 dies, rank 0's collective fails (or hangs) first,
        # and the dead rank, not the collective's error, is what the driver must report.
        pending, failure = list(refs), None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=None if failure is None else 30.0)
            if not ready:  # still running 30 s after another rank failed: report that failure
                break
            try:
                ray.get(ready[0])
            except RayActorError:  # no restart: the rank's DeepSpeed state is gone with its process
                r = refs.index(ready[0])
                raise LearnerDied(f"learner rank {r} (pid {self.pids[r]}) died during {method}") from None
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure
        return ray.get(first)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        if self.local is None:
            import ray

            batch = ray.put(batch)  # one copy in the object store, shared by all ranks
        return self._get("train_step", batch)

    def train_step_and_export(self, batch: TrainBatch):
        """`train_step`, and the updated weights exported in the same call: (metrics, ref of `weights_packed`).

        What an object-store push needs, without the two more round trips to the ranks that `async_weights` takes
        after a separate `train_step` (an export call, then a liveness check). The metrics are waited for like any
        collective, so a rank that died raises LearnerDied before the engines read the weights."""
        if self.local is not None:
            metrics, data = self.local.train_step_and_export(batch)
            import ray

            return metrics, ray.put(data) if ray.is_initialized() else data
        import ray

        batch = ray.put(batch)
        pairs = [a.call.options(num_returns=2).remote("train_step_and_export", batch) for a in self.actors]
        metrics = self._wait("train_step_and_export", pairs[0][0], [m for m, _ in pairs])
        return metrics, pairs[0][1]

    def async_weights(self, *, zero_copy: bool = False):
        """Object ref of the current weights as safetensors bytes (serialised once, shared by all actors).

        zero_copy=True: the same format in pieces (`Learner.weights_packed`: header + numpy views of the tensors),
        which Ray copies once into the object store and hands to every reader without a copy: what the driver
        pushes to the rollout actors (bench/rollout.py measures both).
        Local mode: the data itself put in the Ray object store when Ray is up, else the data."""
        method = "weights_packed" if zero_copy else "weights_bytes"
        if self.local is not None:
            data = getattr(self.local, method)()
            try:
                import ray

                return ray.put(data) if ray.is_initialized() else data
            except ImportError:
                return data
        ref = self.actors[0].call.remote(method) if self.zero_stage < 3 else self._all(method)[0]
        # Calls to an actor run in order: if the ranks still answer, the weights are out. Checked here so a rank that
        # died mid-export raises LearnerDied, instead of the engines reading its death as their own (they would retry).
        self._get("get_version")
        return ref

    def init_weight_transfer(self, transport: str, client, *, world_size: int, buffer_bytes: int) -> None:
        """vLLM's trainer-side transfer engine on every rank (`Learner.init_weight_transfer`); the rendezvous (nccl)
        is a free port on rank 0's node. `client`: an `actors.weight_sync.RolloutSyncClient`."""
        if self.local is not None:
            addr, port = _Rank().master()
        else:
            import ray

            addr, port = ray.get(self.actors[0].master.remote())
        self._get("init_weight_transfer", transport, client, world_size=world_size, master_address=addr,
                  master_port=port, buffer_bytes=buffer_bytes)

    def send_weights(self, version: int) -> None:
        """One push through vLLM's transfer engine (every rank; rank 0 sends); the engines adopt `version`."""
        self._get("send_weights", version)

    def version(self) -> int:
        return self.local.get_version() if self.local is not None else self._get("get_version")

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        if self.local is None and self.zero_stage < 3:
            import ray

            return ray.get(self.actors[0].call.remote("sequence_logprobs", token_ids))
        return self._get("sequence_logprobs", token_ids)

    def teacher_forced_logprob(self, token_ids: list[list[int]], first: list[int], horizon: int) -> list[float]:
        """`Learner.teacher_forced_logprob` (rank 0's answer; every rank runs it, as ZeRO-3 needs)."""
        return self._get("teacher_forced_logprob", token_ids, first, horizon)

    def save_checkpoint(self, ckpt_dir: str, *, extra: dict | None = None, keep: int = 2, hf: bool = True,
                        commit: bool = True) -> str:
        """DeepSpeed state + RNG + `extra` (data position) + an hf/ folder under ckpt_dir/step<version>; keeps the
        newest `keep`. commit=False: the caller adds files, then calls learner.learner.commit_checkpoint."""
        return self._get("save_checkpoint", ckpt_dir, extra=extra, keep=keep, hf=hf, commit=commit)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> dict:
        """Restore every rank from ckpt_dir (tag None: latest); returns the `extra` saved with it."""
        return self._get("load_checkpoint", ckpt_dir, tag)

    def shutdown(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
