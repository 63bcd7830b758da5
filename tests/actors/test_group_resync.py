"""The rollout group stops re-syncing an actor that is out of Ray restarts (instead of looping forever)."""
from types import SimpleNamespace

import pytest

from actors.group import RolloutActorLost, RolloutGroup


class _Remote:
    def __init__(self):
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        return f"ref{self.calls}"


def bare_group(max_restarts: int) -> RolloutGroup:
    g = object.__new__(RolloutGroup)  # no engines: only the re-sync bookkeeping is under test
    g.actors = [SimpleNamespace(update_weights=_Remote(), get_version=_Remote())]
    g.restarts_seen, g._latest, g._syncing = 0, ("payload", 1), {}
    g._max_restarts, g._failed_syncs = max_restarts, {}
    return g


def test_deaths_beyond_the_restart_budget_end_with_one_clear_error():
    g = bare_group(max_restarts=2)
    for _ in range(3):  # max_restarts + 1 deaths in a row are still re-synced
        g._resync(0, died=True)
    assert g.actors[0].update_weights.calls == 3 and g.restarts_seen == 3
    with pytest.raises(RolloutActorLost, match=r"rollout actor 0 died 4 times in a row .*rollout.max_restarts=2"):
        g._resync(0, died=True)

