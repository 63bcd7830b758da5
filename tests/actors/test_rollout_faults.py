"""Real engines (slow): bad requests fail alone; a killed actor is restarted, re-synced, and no rollout is lost
or counted twice. Two tiny vLLM actors in a local Ray (~2-3 min on 2 cores)."""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest

from tests.actors.local_group import local_rollout_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group():
    with local_rollout_group(num_actors=2, block_size=32, max_restarts=2) as (g, model_dir):
        g.model_dir = model_dir
        yield g


def reqs(k, start=0, n=4):
    from protocol.messages import RolloutRequest

    return [RolloutRequest(request_id=start + i, root_id=f"r{(start + i) % 50}", prompt_ids=[1, 3 + i % 10, 5, 14],
                           n=n) for i in range(k)]


def test_bad_requests_fail_alone(group):
    from protocol.messages import RolloutRequest

    bad = [RolloutRequest(request_id=900, root_id="x", prompt_ids=[1, 99], n=2),           # outside the vocabulary
           RolloutRequest(request_id=901, root_id="y", prompt_ids=[1] * 80, n=2),          # longer than the context
           RolloutRequest(request_id=902, root_id="z", prompt_ids=[1, 5], n=0)]            # n <= 0
    out = group.generate(reqs(6) + bad)
    assert sorted(collections.Counter(r.request_id for r in out).items()) == [(i, 4) for i in range(6)]
    errors = {e.request_id: e.message for e in group.pop_errors()}
    assert set(errors) == {900, 901, 902}
    assert "vocabulary" in errors[900] and "context" in errors[901] and "n=0" in errors[902]
    assert len(group.generate(reqs(2))) == 8  # still serving


def test_killed_actor_restarts_resyncs_and_loses_nothing(group):
    import ray
    from safetensors.torch import load_file, save

    state = load_file(os.path.join(group.model_dir, "model.safetensors"))
    group.update_weights(ray.put(save(state)), 1)
    pid0 = group.pids()[0]
    batch = reqs(1500, start=1000)
    killer = threading.Timer(1.0, os.kill, args=(pid0, signal.SIGKILL))
    killer.start()
    out = group.generate(batch)
    killer.join()
    counts = collections.Counter(r.request_id for r in out)
    assert set(counts) == {r.request_id for r in batch} and set(counts.values()) == {4}  # none lost, none twice
    assert group.restarts_seen >= 1 and all(r.policy_version == 1 for r in out)
    # the restarted actor serves again, with the pushed weights (version 1), once it is back
    deadline = time.time() + 240
    while time.time() < deadline:
        out = group.generate(reqs(8, start=5000))
        if {r.actor_id for r in out} == {0, 1}:
            break
        time.sleep(5)
    assert {r.actor_id for r in out} == {0, 1} and {r.policy_version for r in out} == {1}
    assert group.pids()[0] != pid0
