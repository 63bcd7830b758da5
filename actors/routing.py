"""Request routing for rollout actors: prefix affinity, then least load (pure; no Ray, no vLLM).

vLLM's prefix cache is per engine. A branch request re-enters a prefix that
some actor generated; sending it to that actor lets the engine reuse the
prompt's (and prefix's) KV blocks instead of recomputing them. Requests with
no known owner, or whose owner is unavailable, go to the actor with the
fewest samples queued in this call.
"""
from __future__ import annotations

from protocol.messages import RolloutRequest


def route(requests: list[RolloutRequest], available: list[bool], owner: dict[str, int], *,
          affinity: bool = True) -> list[list[RolloutRequest]]:
    """Queues per actor (index = actor). Updates `owner[root_id]` to the actor each request went to.

    available[i]: actor i may take requests now (alive and holding the current weights).
    affinity: a request with a prefix goes to `owner[root_id]` when that actor is available;
    False: every request goes to the least-loaded available actor (the baseline to measure against).
    Load = samples (sum of n) queued in this call; ties go to the lowest index.
    """
    if not any(available):
        raise RuntimeError("no rollout actor is available")
    queues: list[list[RolloutRequest]] = [[] for _ in available]
    load = [0 if ok else float("inf") for ok in available]
    # Affinity-bound requests first, so the least-loaded choice for the rest sees their load.
    for req in sorted(requests, key=lambda r: not (affinity and r.prefix_ids)):
        i = owner.get(req.root_id) if affinity and req.prefix_ids else None
        if i is None or i >= len(available) or not available[i]:
            i = min(range(len(load)), key=load.__getitem__)
        queues[i].append(req)
        load[i] += max(req.n, 1)
        owner[req.root_id] = i
    return queues
