"""The rollout actor's process killed (SIGKILL) at several points of real `configs/smoke.yaml` runs.

Run A (rollout.max_restarts=3): one run, three kills of its only rollout actor:
  1. once the learner's process exists, while the run starts (the engine and the learner start together; before
     runs/<id>/pids.json is written);
  2. during the weight push of step 2 (the actor's update_weights call is in flight);
  3. during the final weight check (its sequence_logprobs call is in flight).
Each time Ray restarts the actor and the rollout group re-sends it the latest weights; the run ends with exit 0, the
counts of an uninterrupted run and engine = learner logprobs.

Run B (rollout.max_restarts=0, one actor): at the first evaluation, vLLM's engine worker process of the actor is
killed (what the OOM killer would pick: it holds the model and the KV cache). The actor, whose engine can never serve
again, exits so that Ray may restart it; Ray may not, nothing can serve, and the run stops with exit 1 and one
`error:` line naming the actor, its pid, the call and the phase. (A SIGKILL of the actor itself with
max_restarts=0 is tests/actors/test_actor_lost.py.) B runs beside A (both mostly wait for engines to start), so the
module takes about one run's time.

Timing: a call is known to be in flight on the actor through the pause points of `actors.pause_points`
(`update_weights@v2`: the push of step 2; `sequence_logprobs@v4`: the final weight check, the only call of that method
after step 4's push). The actor reached the point inside the call, wrote its pid and waits; the test kills that pid.
The restarted actor, retrying the same call, passes the point.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pytest

from actors.pause_points import DIR_VAR, POINTS_VAR
from tests.launch.smoke_run import smoke_run, wait_for_files
from tests.launch.test_resume import descendants

pytestmark = [pytest.mark.slow, pytest.mark.ray]
STEPS, PROMPTS, SAMPLES = 4, 4, 2
COMMON = [f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS}", f"train.samples_per_request={SAMPLES}",
          "train.log_every=1"]


def titled(proc, prefix: str) -> list[int]:
    """Live processes of the run whose title (Ray names its workers `ray::<Class>...`) starts with `prefix`."""
    out = []
    for p in descendants(proc.pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{p}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if title.startswith(prefix) and not zombie:
            out.append(p)
    return out


def wait_until(proc, log, what: str, cond, timeout: float = 400):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, f"run ended while waiting for {what}:\n" + log.read_text()[-4000:]
        assert time.time() < deadline, f"{what}: not within {timeout} s\n" + log.read_text()[-4000:]
        time.sleep(0.1)


def one_rollout_actor(proc, log) -> int:
    """The pid of the run's rollout actor (the restarted one after a kill)."""
    return wait_until(proc, log, "a rollout actor process", lambda: (lambda p: p[0] if len(p) == 1 else None)(
        titled(proc, "ray::RolloutWorker")))


def worker_stderr(pid: int) -> str:
    """What the Ray worker process `pid` wrote to stderr, from its log file under Ray's default temp dir. Ray forwards
    these lines to the driver only best-effort: a process that exits right after writing can lose that race."""
    return "".join(open(path, errors="replace").read() for path in glob.glob(f"/tmp/ray/session_*/logs/worker-*-{pid}.err"))


def paused_in(proc, log, pauses, point: str) -> int:
    """The pid of the process waiting at pause point `point` (inside the call it names)."""
    reached = pauses / f"{point}.reached"
    return int(wait_until(proc, log, f"pause point {point}", lambda: reached.exists() and reached.read_text()))


@pytest.fixture(scope="module")
def no_restarts_run(tmp_path_factory):
    """Run B, started at once in the background: its engine's worker process killed when pids.json appears (the
    first evaluation comes next)."""
    tmp = tmp_path_factory.mktemp("b")
    result: dict = {}

    def drive():
        try:
            with smoke_run(tmp, "b", [*COMMON, "rollout.max_restarts=0"]) as (proc, run_dir, log):
                result["log"], result["run_dir"] = log, run_dir
                wait_for_files(proc, log, [run_dir / "pids.json"], timeout=600)
                result["pid"] = pid = json.loads((run_dir / "pids.json").read_text())["rollout"][0]
                workers = [p for p in titled(proc, "VLLM::Worker") if p in descendants(pid)]
                assert len(workers) == 1, (workers, titled(proc, ""))
                os.kill(workers[0], signal.SIGKILL)
                t_kill = time.time()
                result["rc"] = proc.wait(timeout=120)
                result["exit_s"] = time.time() - t_kill
        except BaseException as e:  # noqa: BLE001 - reported by the test that reads it
            result["failure"] = e

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    yield t, result
    t.join(timeout=900)


def test_rollout_actor_killed_at_start_mid_push_and_in_the_final_check_run_recovers(tmp_path, no_restarts_run):
    t0 = time.time()
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {POINTS_VAR: "update_weights@v2,sequence_logprobs@v4", DIR_VAR: str(pauses)}
    with smoke_run(tmp_path, "a", [*COMMON, "rollout.max_restarts=3"], env=env) as (proc, run_dir, log):
        # 1. the learner's process exists (the engine starts beside it): kill the actor while the run is still
        #    starting; pids.json must then name the restarted actor
        wait_until(proc, log, "the learner process", lambda: titled(proc, "ray::_Rank"), timeout=600)
        pid1 = one_rollout_actor(proc, log)
        os.kill(pid1, signal.SIGKILL)
        t_kill1 = time.time()
        wait_for_files(proc, log, [run_dir / "pids.json"], timeout=600)
        pids = json.loads((run_dir / "pids.json").read_text())
        learner, store = pids["learner"][0], pids["store"][0]
        assert pids["rollout"][0] not in (pid1, None), pids

        # 2. in flight during the push of step 2
        pid2 = paused_in(proc, log, pauses, "update_weights@v2")
        assert pid2 == pids["rollout"][0], (pid2, pids)
        os.kill(pid2, signal.SIGKILL)

        # 3. in flight during the final weight check
        pid3 = paused_in(proc, log, pauses, "sequence_logprobs@v4")
        assert pid3 == one_rollout_actor(proc, log) != pid2
        assert f"[graftrl] step {STEPS}/{STEPS} " in log.read_text()
        assert "[graftrl] weight sync check" not in log.read_text()
        os.kill(pid3, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert not [line for line in text.splitlines() if line.startswith(("Traceback", "error:"))]
    died = [line for line in text.splitlines() if line.startswith("[graftrl] warning: rollout actor 0")]
    assert any(f"(pid {pid2}) died during update_weights (version 2)" in line for line in died), died
    assert any(f"(pid {pid3}) died during sequence_logprobs" in line for line in died), died
    assert text.count("[graftrl] rollout actor 0 (pid ") >= 2  # "... is back N s after it died during ..."
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == summary["policy_version"] == STEPS
    assert summary["rollouts"] == STEPS * PROMPTS * SAMPLES  # nothing lost, nothing counted twice
    assert summary["weight_sync_check"]["max_abs_diff"] < 1e-4  # the restarted engine holds the learner's weights
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert history[-1]["rollout/actors_lost"] == 0
    print(f"run A: {time.time() - t0:.0f} s; kill 1 {time.time() - t_kill1:.0f} s before the end; "
          f"noticed at start: {'during pid' in text or 'during its engine start' in text}")


def test_engine_process_killed_without_restarts_stops_the_run_with_one_line(no_restarts_run):
    t, result = no_restarts_run
    t.join(timeout=900)
    assert "failure" not in result, result.get("failure")
    text = result["log"].read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert result["rc"] == 1, text[-4000:]
    assert len(errors) == 1, text[-4000:]
    assert errors[0].startswith(f"error: rollout actor 0 (pid {result['pid']}) died during generate and Ray will "
                                "not restart it (out of restarts: rollout.max_restarts=0); no rollout actor is left"), errors
    assert "; the run stopped in the evaluation before training; every actor of the run was stopped" in errors[0]
    said = f"[graftrl] rollout actor 0 (pid {result['pid']}): vLLM's engine process died (EngineDeadError in generate); exiting"
    assert said in text or said in worker_stderr(result["pid"]), text[-3000:]
    assert not [line for line in text.splitlines() if line.startswith("Traceback")]  # the driver's (vLLM logs its own)
    assert result["exit_s"] < 60, result["exit_s"]  # Ray says DEAD: not waited for rollout.actor_lost_after_s
    assert not (result["run_dir"] / "summary.json").exists()
