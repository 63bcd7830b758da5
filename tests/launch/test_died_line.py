"""The one-line error when a process of the run dies (fast, no Ray cluster): it names the actor (index and pid, or
Ray's class and pid) and the phase the run was in; the rollout group's own bookkeeping of a death."""
from __future__ import annotations

import types

import pytest

from launch.train import ACTOR_NOTE, PHASE_NOTE, component_died
from launch.trainer import PhaseTimer


def test_ray_unavailable_error_is_named_by_the_actor_table_and_phase():
    from ray.exceptions import ActorUnavailableError

    # what Ray 2.60 raises for a call in flight when the actor is SIGKILLed (or a call while it restarts):
    # no class, no pid in the text; `train` adds both (from Ray's actor table) and the phase as notes
    e = ActorUnavailableError("The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14.",
                              bytes.fromhex("42dc3cb7a041b59e7f03c64c01000000"))
    bare = component_died(e)
    assert bare.startswith("a Ray actor of the run died (unknown class, pid ?; Ray actor id 42dc3cb7a041b59e7f03c6")
    assert "\n" not in bare
    e.add_note(PHASE_NOTE + "step 3/4, push_weights")
    e.add_note(ACTOR_NOTE + "RolloutWorker, pid 1234, RESTARTING")
    line = component_died(e)
    assert line.startswith("a Ray actor of the run died (RolloutWorker, pid 1234, RESTARTING; Ray actor id 42dc")
    assert line.endswith("; the run stopped in step 3/4, push_weights") and "\n" not in line


def test_rollout_and_learner_deaths_carry_the_phase():
    from actors.group import RolloutActorLost
    from learner.group import LearnerDied

    e = RolloutActorLost("rollout actor 0 (pid 77) died during sequence_logprobs and Ray will not restart it")
    e.add_note(PHASE_NOTE + "the final weight check")
    assert component_died(e) == ("rollout actor 0 (pid 77) died during sequence_logprobs and Ray will not restart "
                                 "it; the run stopped in the final weight check")
    assert component_died(LearnerDied("learner rank 0 (pid 5) died during train_step")) == \
        "learner rank 0 (pid 5) died during train_step"
    assert component_died(ValueError("x")) is None


def test_phase_timer_knows_the_phase_being_timed():
    t = PhaseTimer()
    assert t.current is None
    with t("update"):
        assert t.current == "update"
        with t("inner"):
            assert t.current == "inner"
        assert t.current == "update"
    assert t.current is None and set(t.pop()) == {"timing/update_s", "timing/inner_s"}


def fake_group(n: int, dead: dict[int, str] | None = None):
    """A RolloutGroup without Ray: handles that record re-syncs; `dead[i]`: Ray's table says actor i is DEAD."""
    from actors.group import RolloutGroup

    g = RolloutGroup.__new__(RolloutGroup)
    g.cfg = types.SimpleNamespace(actor_lost_after_s=600.0, max_restarts=0, request_retries=2)
    g.actors = [types.SimpleNamespace(update_weights=types.SimpleNamespace(remote=lambda *a: "sync-ref"),
                                      get_version=types.SimpleNamespace(remote=lambda: "version-ref"))
                for _ in range(n)]
    g.lost, g._latest, g._latest_fn, g._version, g._syncing, g._down_since = set(), None, None, 0, {}, {}
    g.restarts_seen = 0
    g._init_fault_state()
    g._pids = {i: 100 + i for i in range(n)}
    g._ray_state = lambda i: {"State": "DEAD", "Pid": 100 + i} if i in (dead or {}) else None
    return g


def test_a_death_is_one_line_and_counted_once_while_the_actor_restarts(capsys):
    g = fake_group(2)
    g._resync(1, died=True, call="update_weights (version 3)")
    g._resync(1, died=True, call="its weight re-sync")  # still restarting: the same death
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[graftrl] warning: rollout actor 1 (pid 101) died during update_weights (version 3); it gets the "
                   "latest weights once Ray has restarted it (rollout.max_restarts=0); its requests go to the other "
                   "actors meanwhile"]
    assert g.restarts_seen == 1 and g._syncing == {1: "version-ref"} and not g.lost


def test_dead_for_good_is_given_up_at_once_and_the_last_one_names_actor_pid_and_call(capsys, monkeypatch):
    from actors.group import RolloutActorLost

    import ray

    monkeypatch.setattr(ray, "kill", lambda *a, **k: None)
    g = fake_group(2, dead={0: "", 1: ""})
    g._resync(1, died=True, call="generate")
    assert g.lost == {1} and "going on with 1 of 2 actors" in capsys.readouterr().err
    with pytest.raises(RolloutActorLost) as e:
        g._resync(0, died=True, call="sequence_logprobs")
    assert str(e.value) == (
        "rollout actor 0 (pid 100) died during sequence_logprobs and Ray will not restart it (out of restarts: "
        "rollout.max_restarts=0); rollout actor 1 (pid 101) died during generate and Ray will not restart it (out of "
        "restarts: rollout.max_restarts=0); no rollout actor is left (rollout.num_actors=2)")


def test_a_worker_whose_engine_died_exits_for_ray_to_restart_it(monkeypatch):
    import actors.rollout_worker as rw

    class EngineDeadError(Exception):  # vLLM's, matched by name
        pass

    class W:
        actor_id = 0

        @rw.exits_if_engine_dead
        def generate(self, fail):
            raise fail

    exits = []
    monkeypatch.setattr(rw.os, "_exit", exits.append)
    with pytest.raises(ValueError):  # a bad request is not a dead engine
        W().generate(ValueError("bad"))
    with pytest.raises(EngineDeadError):  # built directly (no Ray actor): the caller gets vLLM's error
        W().generate(EngineDeadError())
    assert exits == []
    monkeypatch.setattr(rw, "in_ray_actor", lambda: True)
    with pytest.raises(EngineDeadError):
        W().generate(EngineDeadError())
    assert exits == [70]


def test_ray_memory_monitor_kill_is_one_line():
    from ray.exceptions import OutOfMemoryError

    e = OutOfMemoryError("3 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
                         "192.0.2.2, ID: 8bf7) was 22.28GB used / 23.54GB limit (0.946362)\nTop 10 memory users: ...")
    e.add_note(PHASE_NOTE + "the start-up (rollout actors, prefix store, learner)")
    assert component_died(e) == (
        "Ray's memory monitor killed processes of the run: 3 worker(s) were killed due to the node running low on "
        "memory. Memory on the node (IP: 192.0.2.2, ID: 8bf7) was 22.28GB used / 23.54GB limit (0.946362); the run "
        "stopped in the start-up (rollout actors, prefix store, learner)")
