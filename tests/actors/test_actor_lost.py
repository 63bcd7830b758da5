"""Rollout actors that Ray cannot restart (slow, real engines): the group goes on with the actor left, gives the
dead one up (at once when Ray's actor table says DEAD, else after `actor_lost_after_s`), and stops with one clear
error naming each actor, its pid and the call it died in when none is left (no endless re-sync)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.actors.local_group import local_rollout_group
from tests.actors.test_rollout_faults import reqs

pytestmark = pytest.mark.slow


def test_dead_actors_are_given_up_then_the_last_one_ends_the_call_with_one_line(capfd):
    import ray
    from safetensors.torch import load_file, save

    from actors.group import RolloutActorLost

    with local_rollout_group(num_actors=2, max_restarts=0, actor_lost_after_s=10.0) as (group, model_dir):
        group.update_weights(ray.put(save(load_file(os.path.join(model_dir, "model.safetensors")))), 1)
        pid0, pid1 = group.pids()
        # without Ray's actor table (as if it could not be read), only the bound on time gives actor 1 up
        table, group._ray_state = group._ray_state, lambda i: None
        os.kill(pid1, signal.SIGKILL)
        out = group.generate(reqs(6))  # actor 1's share is retried on actor 0
        assert sorted({r.request_id for r in out}) == list(range(6)) and {r.actor_id for r in out} == {0}
        assert group.lost == set()  # not given up yet: it may be restarting, as far as the group can tell
        time.sleep(10.5)
        out = group.generate(reqs(4, start=10))
        assert {r.actor_id for r in out} == {0} and group.lost == {1}
        assert len(group.sequence_logprobs([1, 5, 3, 4])) == 3  # the weight check at the end of a run asks a live actor
        err = capfd.readouterr().err
        assert f"rollout actor 1 (pid {pid1}) died during generate; it gets the latest weights once Ray has" in err
        assert (f"rollout actor 1 (pid {pid1}) died during generate and did not take the weights within "
                "rollout.actor_lost_after_s=10 s; going on with 1 of 2 actors") in err

        # Ray's table says DEAD (max_restarts=0): given up at once; none is left, so the call ends with one line
        group._ray_state = table
        os.kill(pid0, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RolloutActorLost) as e:
            group.generate(reqs(4, start=20))
        assert time.monotonic() - t0 < 8  # not rollout.actor_lost_after_s: it used to re-sync forever
        assert str(e.value) == (
            f"rollout actor 0 (pid {pid0}) died during generate and Ray will not restart it (out of restarts: "
            f"rollout.max_restarts=0); rollout actor 1 (pid {pid1}) died during generate and did not take the weights "
            "within rollout.actor_lost_after_s=10 s; no rollout actor is left (rollout.num_actors=2)")
        assert group.lost == {0, 1}
