"""The Trainer's pure parts on plain data: phase timing, the one-slot prefetcher, plans through a checkpoint,
the per-step prompt stream, the progress line."""
import json
import threading
import time

import pytest

from actors.tasks import ChainTask
from launch.trainer import PhaseTimer, Prefetcher, StepPlan, make_requests, progress_line, step_rng
from protocol.messages import BranchPoint


def test_phase_timer_reports_each_phase_and_resets():
    t = PhaseTimer()
    with t("select"):
        time.sleep(0.01)
    with t("select"):
        pass
    with t("update"):
        pass
    out = t.pop()
    assert set(out) == {"timing/select_s", "timing/update_s"} and out["timing/select_s"] >= 0.01
    assert t.pop() == {}


def test_prefetcher_holds_one_batch_and_runs_generation_off_the_driver_thread():
    threads = []

    def generate(requests):
        threads.append(threading.current_thread().name)
        return [r * 2 for r in requests]

    p = Prefetcher(generate)
    assert p.take(0) is None  # nothing in flight: the step generates itself
    p.start(StepPlan(3, [], [1, 2]))
    with pytest.raises(AssertionError):
        p.start(StepPlan(4, [], [5]))
    with pytest.raises(AssertionError, match="step 3"):
        p.take(2)
    plan, out = p.take(3)
    assert plan.step == 3 and out == [2, 4] and threads == [t for t in threads if t.startswith("prefetch")]
    assert p.plan is None
    p.close()


def test_step_plan_survives_a_json_round_trip():
    task = ChainTask(horizon=4, heldout_size=8, seed=0)
    bp = BranchPoint(root_id="r", prompt_ids=[1, 2], prefix_ids=[3], token_id=4, forced_token=5, score=0.5, ref=7, entropy=0.3)
    plan = StepPlan(2, [bp], make_requests(task, step_rng(0, 2), [bp], prompts=3, n=2, step=2))
    back = StepPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back == plan
    assert back.requests[0].prefix_ids == [3, 5] and back.requests[0].forced and back.requests[0].branch_ref == 7


def test_fresh_prompts_depend_on_seed_and_step_only():
    task = ChainTask(horizon=4, heldout_size=8, seed=0)

    def roots(seed, step, n):
        return [task.root_id(p) for p in task.train_prompts(step_rng(seed, step), n)]

    assert roots(0, 5, 6) == roots(0, 5, 6)
    assert roots(0, 5, 6)[:4] == roots(0, 5, 4)  # fewer fresh prompts (more branch points): the same first ones
    assert roots(0, 5, 6) != roots(0, 6, 6) and roots(0, 5, 6) != roots(1, 5, 6)


def test_progress_line_names_the_key_metrics_and_tolerates_missing_ones():
    line = progress_line(10, 200, {"rollout/reward_mean": 0.25, "learner/loss": 0.01, "timing/step_s": 0.3,
                                   "perf/generated_tokens": 1234})
    assert line.startswith("[graftrl] step 10/200 ") and "reward 0.250" in line and "heldout -" in line
    assert "tokens 1234" in line and "\n" not in line


def test_samples_file_puts_branched_rollouts_first_and_decodes_text(tmp_path):
    from launch.trainer import write_samples
    from protocol.messages import Rollout

    def rollout(prefix, reward):
        return Rollout(request_id=0, root_id="r", prompt_ids=[1, 2], prefix_ids=prefix, token_ids=[3, 4], logprobs=[0, 0],
                       entropy=[0, 0], top1_logprobs=[0, 0], alt_token_ids=[-1, -1], alt_logprobs=[-1e9, -1e9],
                       reward=reward, policy_version=2, actor_id=0)

    class Task:
        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    write_samples(str(tmp_path), 5, [rollout([], 0.0), rollout([9], 1.0)], Task(), k=1)
    write_samples(str(tmp_path), 6, [rollout([], 0.0)], object())  # a task without text: ids only
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["from_prefix"] and rows[0]["prefix"] == "9" and rows[0]["completion"] == "3 4" and rows[0]["reward"] == 1.0
    assert rows[1]["step"] == 6 and "completion" not in rows[1] and rows[1]["token_ids"] == [3, 4]
