"""Ctrl-C writes a checkpoint and stops every process; `resume=runs/<id>` ends with the counts and the prompt order of
an uninterrupted run. The run is asynchronous, the harder case: a batch is in flight at every checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from actors.tasks import ChainTask
from launch.trainer import step_rng
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]
STEPS, PROMPTS, SAMPLES = 40, 4, 2  # Ctrl-C follows the first checkpoint (step 2) within a second: mid-run


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    seen, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def alive(pids: set[int]) -> set[int]:
    left = set()
    for p in pids:
        try:
            os.kill(p, 0)
            with open(f"/proc/{p}/stat") as f:
                if f.read().split()[2] != "Z":
                    left.add(p)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return left


def test_sigint_checkpoints_then_resume_matches_uninterrupted(tmp_path):
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml", f"run_dir={runs}", "run_name=r",
            f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS}", f"train.samples_per_request={SAMPLES}",
            "train.checkpoint_every=2", "train.async_rollouts=true"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_dir = runs / "r"
    deadline = time.time() + 600
    seen: set[int] = set()
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():  # first checkpoint: step 2
        seen |= descendants(proc.pid)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    seen |= descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted: checkpoint of step" in out
    gone_by = time.time() + 30  # processes still exiting on a loaded machine are not orphans; one alive after 30 s is
    while alive(seen) and time.time() < gone_by:
        time.sleep(0.5)
    assert not alive(seen), f"orphan processes after Ctrl-C: {alive(seen)}"
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["interrupted"] and 2 <= interrupted["steps"] < STEPS

    p = subprocess.run([sys.executable, "-m", "launch.train", f"resume={run_dir}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())
    # an uninterrupted run makes exactly one update per step and serves every request once
    assert final["steps"] == final["policy_version"] == STEPS
    assert final["rollouts"] == STEPS * PROMPTS * SAMPLES
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    # the prompt order of an uninterrupted run: step s's fresh prompts are the first ones of its own stream
    task = ChainTask(horizon=4, heldout_size=64, seed=0)
    for h in history:
        n = len(h["fresh_roots"])
        assert h["fresh_roots"] == [task.root_id(p) for p in task.train_prompts(step_rng(0, h["step"] - 1), n)], h["step"]
    assert sum(len(h["fresh_roots"]) for h in history) > STEPS  # roots were drawn fresh (not all branch re-entries)


def test_resume_of_a_missing_run_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "launch.train", f"resume={tmp_path}/nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: resume=") and len(p.stderr.strip().splitlines()) == 1
