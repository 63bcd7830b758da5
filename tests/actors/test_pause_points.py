"""actors.pause_points: off unless named; the first arrival waits for .go, later ones pass."""
from __future__ import annotations

import threading
import time

from actors.pause_points import DIR_VAR, POINTS_VAR, forwarded_env, pause_point


def test_unnamed_points_and_an_unset_environment_do_not_pause(tmp_path, monkeypatch):
    monkeypatch.delenv(POINTS_VAR, raising=False)
    assert pause_point("update_weights@v2") is False
    monkeypatch.setenv(POINTS_VAR, "update_weights@v2")
    monkeypatch.setenv(DIR_VAR, str(tmp_path))
    assert pause_point("update_weights@v20") is False
    assert list(tmp_path.iterdir()) == []


def test_the_first_arrival_waits_for_go_and_later_ones_pass(tmp_path, monkeypatch):
    monkeypatch.setenv(POINTS_VAR, "a@v1,update_weights@v2")
    monkeypatch.setenv(DIR_VAR, str(tmp_path))
    assert forwarded_env() == {POINTS_VAR: "a@v1,update_weights@v2", DIR_VAR: str(tmp_path)}
    done = []
    t = threading.Thread(target=lambda: done.append(pause_point("update_weights@v2")))
    t.start()
    reached = tmp_path / "update_weights@v2.reached"
    deadline = time.time() + 10
    while not reached.exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert done == [] and t.is_alive()  # waiting
    assert reached.read_text().isdigit()
    assert pause_point("update_weights@v2") is False  # a second arrival passes at once
    (tmp_path / "update_weights@v2.go").touch()
    t.join(timeout=5)
    assert done == [True]


def test_a_point_gives_up_after_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv(POINTS_VAR, "x@v0")
    monkeypatch.setenv(DIR_VAR, str(tmp_path))
    t0 = time.monotonic()
    assert pause_point("x@v0", timeout_s=0.2) is True
    assert 0.2 <= time.monotonic() - t0 < 5
