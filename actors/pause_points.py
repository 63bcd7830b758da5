"""Named pause points, so that a fault-injection test knows a call is in flight instead of guessing it with sleeps.

Off unless the environment names them: GRAFTRL_PAUSE_AT="<point>[,<point>...]" and GRAFTRL_PAUSE_DIR=<dir>. A point
is `<method>@v<policy version>` (for example `update_weights@v2`: the push of version 2 has reached the actor). The
first process to reach a named point creates <dir>/<point>.reached holding its pid, then waits until
<dir>/<point>.go exists (or `timeout_s` passes); any later arrival (a restarted actor retrying the same call) passes
straight through. A test waits for `.reached`, does what it wants to the process inside the call (SIGKILL), and
touches `.go` to let a live one continue.
"""
from __future__ import annotations

import os
import time

POINTS_VAR, DIR_VAR = "GRAFTRL_PAUSE_AT", "GRAFTRL_PAUSE_DIR"


def forwarded_env() -> dict[str, str]:
    """The pause variables of this process, for the environment of the actors it starts."""
    return {k: os.environ[k] for k in (POINTS_VAR, DIR_VAR) if os.environ.get(k)}


def pause_point(name: str, timeout_s: float = 600.0) -> bool:
    """Pause here if `name` is a named point reached for the first time; True when this call paused."""
    points = os.environ.get(POINTS_VAR, "")
    if not points or name not in points.split(","):
        return False
    base = os.path.join(os.environ[DIR_VAR], name)
    try:
        fd = os.open(base + ".reached", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
