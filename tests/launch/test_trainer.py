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


class _OrderedFakes:
    """Store, rollout group and learner that record the order of their calls (and the thread of each)."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.pushing = False
        self.selected_during_push = []
        self.verifier_errors, self.lost, self.last_engine_s = 0, [], 0.0

    # store
    def select(self, k):
        self.calls.append(("select", threading.current_thread().name))
        self.selected_during_push.append(self.pushing)
        time.sleep(0.02)  # long enough that the push is still on when it runs beside it
        return [BranchPoint(root_id=f"b{len(self.calls)}", prompt_ids=[1], prefix_ids=[], token_id=2, forced_token=-1,
                            score=1.0, ref=len(self.calls))][:k]

    def insert(self, rollouts):
        self.calls.append(("insert", None))

    def release(self, handles):
        self.calls.append(("release", tuple(handles)))

    def stats(self):
        return {"edges": 0, "branching_nodes": 0}

    # rollout group
    def generate(self, requests):
        self.calls.append(("generate", len(requests)))
        return []

    def pop_errors(self):
        return []

    def takes_exported_weights(self, learner):
        return False

    def sync_weights(self, learner, version, weights):
        self.pushing = True
        time.sleep(0.05)
        self.pushing = False
        self.calls.append(("push", version))

    # learner
    def train_step(self, batch):
        self.calls.append(("update", None))
        return {"learner/version": sum(1 for c in self.calls if c[0] == "update")}


def _fake_trainer(tmp_path, steps):
    from launch.config import load_config
    from launch.trainer import Components, Trainer

    fakes = _OrderedFakes()
    cfg = load_config("configs/default.yaml", [f"train.steps={steps}", "train.prompts_per_step=4",
                                               "store.branch_fraction=0.25", "learner.advantage=group"])
    comp = Components(task=ChainTask(horizon=4, heldout_size=8, seed=0), rollout=fakes, store=fakes, learner=fakes,
                      model_dir="unused")
    return Trainer(comp, cfg, str(tmp_path), log=lambda *a: None), fakes


def test_a_synchronous_step_selects_the_next_one_on_the_store_thread_while_the_weights_go_out(tmp_path):
    trainer, fakes = _fake_trainer(tmp_path, steps=3)
    try:
        for _ in range(3):
            trainer.train_step()
    finally:
        trainer.store_thread.shutdown(wait=True)
    names = [c[0] for c in fakes.calls]
    # step 1 selects itself; steps 2 and 3 were selected during the push before them; nothing beyond the last step
    assert names.count("select") == 3 and names.count("generate") == 3 and trainer.planned is None
    assert fakes.selected_during_push == [False, True, True]
    assert [c[1] for c in fakes.calls if c[0] == "select"][1:] == ["store_0", "store_0"]
    # each planned select comes after that step's insert (the store it sees is the next step's)
    selects = [i for i, n in enumerate(names) if n == "select"]
    inserts = [i for i, n in enumerate(names) if n == "insert"]
    assert all(inserts[k] < selects[k + 1] for k in range(2))


def test_a_plan_left_over_when_the_run_stops_early_gives_its_branch_points_back(tmp_path):
    trainer, fakes = _fake_trainer(tmp_path, steps=5)
    try:
        trainer.train_step()
        planned = trainer.planned
        assert planned is not None and planned.step == 1 and planned.branch_points
        trainer.release_unused_plans()
    finally:
        trainer.store_thread.shutdown(wait=True)
    assert trainer.planned is None
    assert fakes.calls[-1] == ("release", tuple((b.root_id, b.ref) for b in planned.branch_points))
    with pytest.raises(AssertionError, match="planned: step 1"):
        trainer.planned = planned
        trainer.take_planned(2)
