"""A prefix-store shard's process killed (SIGKILL by pid) in the middle of a real training run: the store client
revives it from its last snapshot plus the replayed calls since, the run finishes, and every count is exact."""
import json
import os
import signal

import pytest

from tests.launch.smoke_run import smoke_run, wait_for_files

pytestmark = [pytest.mark.slow, pytest.mark.ray]
STEPS, PROMPTS, SAMPLES = 32, 4, 2


def test_shard_killed_mid_run_is_revived_and_the_run_finishes_with_exact_counts(tmp_path):
    overrides = [f"train.steps={STEPS}", f"train.prompts_per_step={PROMPTS}", f"train.samples_per_request={SAMPLES}",
                 "store.num_shards=2", "store.snapshot_every=4"]
    with smoke_run(tmp_path, "s", overrides) as (proc, run_dir, log):
        wait_for_files(proc, log, [run_dir / "store.shard0.npz", run_dir / "pids.json"])
        shard_pid = json.loads((run_dir / "pids.json").read_text())["store"][0]
        os.kill(shard_pid, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == summary["policy_version"] == STEPS
    assert summary["rollouts"] == STEPS * PROMPTS * SAMPLES  # nothing lost, nothing counted twice
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    last = history[-1]
    assert last["tree/shard_restarts"] == 1, last  # replayed_calls may be 0: a kill right after a snapshot
    # the revived shard holds what it held before the kill: stored tokens never fall between steps
    tokens = [h["tree/tokens"] for h in history]
    assert all(b >= a for a, b in zip(tokens, tokens[1:])) or last["tree/evicted_tokens"] > 0, tokens
