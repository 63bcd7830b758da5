"""Affinity routing (pure)."""
from __future__ import annotations

import random

import pytest

from protocol.messages import RolloutRequest
from actors.routing import route


def req(i, root, prefix=(), n=4):
    return RolloutRequest(request_id=i, root_id=root, prompt_ids=[1], prefix_ids=list(prefix), n=n)


def test_branch_goes_to_owner_root_start_to_least_loaded():
    owner = {"a": 1}
    q = route([req(0, "a", [3]), req(1, "b"), req(2, "c")], [True, True, True], owner)
    assert [r.request_id for r in q[1]] == [0]
    assert {r.request_id for r in q[0] + q[2]} == {1, 2} and len(q[0]) == len(q[2]) == 1
    assert owner == {"a": 1, "b": 0, "c": 2}


def test_unavailable_owner_falls_back_and_takes_ownership():
    owner = {"a": 1}
    q = route([req(0, "a", [3])], [True, False], owner)
    assert [r.request_id for r in q[0]] == [0] and q[1] == [] and owner["a"] == 0


def test_no_affinity_ignores_owner():
    owner = {"a": 1, "b": 1}
    q = route([req(0, "a", [3]), req(1, "b", [3])], [True, True], owner, affinity=False)
    assert len(q[0]) == len(q[1]) == 1


def test_no_actor_available_is_an_error():
    with pytest.raises(RuntimeError, match="no rollout actor"):
        route([req(0, "a")], [False, False], {})


@pytest.mark.parametrize("seed", range(20))
def test_every_request_routed_exactly_once_and_load_balanced(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 5)
    avail = [rng.random() < 0.8 for _ in range(k)]
    avail[rng.randrange(k)] = True
    reqs = [req(i, f"r{rng.randrange(10)}", [1] * rng.randint(0, 2), n=4) for i in range(rng.randint(0, 40))]
    owner = {f"r{j}": rng.randrange(k) for j in range(10) if rng.random() < 0.5}
    q = route(reqs, avail, dict(owner))
    assert sorted(r.request_id for qq in q for r in qq) == list(range(len(reqs)))
    assert all(not q[i] for i in range(k) if not avail[i])
    roots_only = [r for r in reqs if not r.prefix_ids]
    q2 = route(roots_only, avail, {})
    loads = [len(q2[i]) for i in range(k) if avail[i]]
    assert max(loads) - min(loads) <= 1
