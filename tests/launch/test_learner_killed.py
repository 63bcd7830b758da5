"""The learner's process killed (SIGKILL by pid): the driver stops with one line and exit 1, no process survives,
and `resume=runs/<id>` ends with the step and rollout counts of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.launch.smoke_run import smoke_run, wait_for_files
from tests.launch.test_resume import alive, descendants

pytestmark = [pytest.mark.slow, pytest.mark.ray]
STEPS, PROMPTS, SAMPLES = 24, 4, 2


def test_learner_killed_fails_cleanly_then_resume_matches_uninterrupted(tmp_path):
    overrides = [f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS}", f"train.samples_per_request={SAMPLES}",
                 "train.checkpoint_every=2"]
    seen: set[int] = set()
    with smoke_run(tmp_path, "k", overrides) as (proc, run_dir, log):
        wait_for_files(proc, log, [run_dir / "checkpoints" / "latest", run_dir / "pids.json"],
                       each=lambda: seen.update(descendants(proc.pid)))
        seen |= descendants(proc.pid)
        pids = json.loads((run_dir / "pids.json").read_text())
        assert pids["driver"] == proc.pid and pids["learner"][0] in seen
        os.kill(pids["learner"][0], signal.SIGKILL)
        t_kill = time.time()
        rc = proc.wait(timeout=120)  # a hang fails here
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert rc == 1, text[-3000:]
    assert len(errors) == 1 and f"learner rank 0 (pid {pids['learner'][0]}) died" in errors[0], text[-3000:]
    ckpt_step = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert f"last checkpoint (update {ckpt_step};" in errors[0] and f"resume={run_dir}" in errors[0]
    assert "Traceback" not in text, text[-3000:]
    print(f"driver exited {time.time() - t_kill:.1f}s after the kill; last checkpoint at update {ckpt_step}")
    time.sleep(3)
    assert not alive(seen), f"processes of the run alive after the learner died: {alive(seen)}"
    assert not (run_dir / "summary.json").exists()  # a failed run writes no summary

    p = subprocess.run([sys.executable, "-m", "launch.train", f"resume={run_dir}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed {run_dir} at step {ckpt_step}" in p.stderr
    final = json.loads((run_dir / "summary.json").read_text())
    # what an uninterrupted run ends with: one update per step, every request served once
    assert final["steps"] == final["policy_version"] == STEPS
    assert final["rollouts"] == STEPS * PROMPTS * SAMPLES
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # steps after the checkpoint redone once
