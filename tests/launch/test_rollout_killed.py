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

Timing without hooks in the code: a call is made to land "in flight" on the actor by freezing processes with
SIGSTOP. For the push: the learner is frozen after the progress line of step 1 (the driver then waits in step 2's
update, generation done), the actor is frozen, the learner thawed: the push of step 2 goes to the frozen actor,
which is then killed. For the final check: the learner is frozen after step 3's line (the driver waits in step 4's
update), then the store shard (step 4's insert is done; `store.snapshot_every=4` makes the driver wait on the store
right after the push), the learner is thawed (the push of step 4 lands), then the actor is frozen and the store
thawed: the next rollout call, in flight on the frozen actor when it is killed, is the final weight check.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pytest

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


def in_log(log, text: str):
    return lambda: text in log.read_text()


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
    overrides = [*COMMON, "rollout.max_restarts=3", f"store.snapshot_every={STEPS}"]
    with smoke_run(tmp_path, "a", overrides) as (proc, run_dir, log):
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
        wait_until(proc, log, "step 1's progress line", in_log(log, f"[graftrl] step 1/{STEPS} "))
        os.kill(learner, signal.SIGSTOP)
        time.sleep(3)  # step 2's generation and insert finish; the driver waits in the update
        pid2 = one_rollout_actor(proc, log)
        os.kill(pid2, signal.SIGSTOP)
        os.kill(learner, signal.SIGCONT)
        time.sleep(3)  # the update ends; update_weights waits on the frozen actor
        os.kill(pid2, signal.SIGKILL)

        # 3. in flight during the final weight check
        wait_until(proc, log, "step 3's progress line", in_log(log, f"[graftrl] step 3/{STEPS} "))
        os.kill(learner, signal.SIGSTOP)
        time.sleep(3)  # step 4's generation and insert finish; the driver waits in the update
        os.kill(store, signal.SIGSTOP)
        os.kill(learner, signal.SIGCONT)
        time.sleep(3)  # the push of step 4 lands; the driver waits on the store (its snapshot after step 4)
        pid3 = one_rollout_actor(proc, log)
        os.kill(pid3, signal.SIGSTOP)
        os.kill(store, signal.SIGCONT)
        wait_until(proc, log, "step 4's progress line", in_log(log, f"[graftrl] step {STEPS}/{STEPS} "), timeout=60)
        time.sleep(3)  # the final check's sequence_logprobs waits on the frozen actor
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
