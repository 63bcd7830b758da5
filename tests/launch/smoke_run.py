"""A real `launch.train` run on configs/smoke.yaml in its own process group, for the fault-injection tests."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT


@contextlib.contextmanager
def smoke_run(tmp_path, name: str, overrides: list[str], env: dict[str, str] | None = None):
    """Starts the run (output in <tmp_path>/<name>.log; `env` added to this process's environment); yields (proc,
    run_dir, log). On leaving, a run still going is killed with its whole process group, so a failed assertion leaves
    nothing behind."""
    runs = tmp_path / "runs"
    run_dir, log = runs / name, tmp_path / f"{name}.log"
    args = [sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml", f"run_dir={runs}", f"run_name={name}",
            *overrides]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        yield proc, run_dir, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for_files(proc, log, paths, timeout: float = 300, each=None) -> None:
    """Polls until every path exists; fails with the log's tail if the run exits first or time runs out.
    `each()` is called at every poll (e.g. to record the run's process tree while it grows)."""
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if each:
            each()
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{[str(p) for p in paths if not p.exists()]} not written within {timeout} s"
        time.sleep(0.3)
