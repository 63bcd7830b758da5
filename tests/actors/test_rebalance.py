"""ReBalance pure parts on plain data: step ends, step state, the alpha schedule and its gates, S, the file."""
import math

import numpy as np
import pytest

from actors.rebalance import (Calibration, Schedule, StepTable, StepTracker, fit_schedule, is_reflective,
                              label_steps, replay, ridge_r2, step_segments, steering_vector, variances)

# token ids: 0 "a", 1 ".", 2 "\n", 3 "\n\n", 4 " b", 5 ".\n\n", 6 "\nc"
TEXTS = ["a", ".", "\n", "\n\n", " b", ".\n\n", "\nc"]
SCHED = Schedule(q25c=0.6, q75c=0.9, q25v=0.001, q75v=0.01)


def test_step_ends_blank_line_in_one_or_two_tokens():
    table = StepTable.from_texts(TEXTS)
    seq = [0, 3, 4, 1, 2, 2, 0, 5, 0, 2, 0]
    assert table.ends(seq).tolist() == [False, True, False, False, False, True, False, True, False, False, False]
    assert table.is_end(2, 6) and not table.is_end(1, 6)  # "\nc" after a "\n" completes a blank line
    assert table.ends([2], first_prev=2).tolist() == [True]  # the token before the sequence counts
    newline = StepTable.from_texts(TEXTS, rule="newline")
    assert newline.ends([0, 2, 0, 6]).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="choose one of"):
        StepTable.from_texts(TEXTS, rule="comma")


def test_schedule_tanh_hits_its_calibration_points():
    assert float(SCHED.base(0.6)) == pytest.approx(-1.0, abs=1e-9)
    assert float(SCHED.base(0.9)) == pytest.approx(0.0, abs=1e-9)
    assert float(SCHED.base(1.0)) == pytest.approx(0.01, abs=1e-6)
    c = np.linspace(0, 1, 101)
    assert np.all(np.diff(SCHED.base(c)) >= 0)  # monotone: the less confident, the harder away from reflection


def test_gates_fire_only_in_their_corner():
    over, under = SCHED.gates([0.3, 0.3, 0.97, 0.97, 0.75], [0.05, 0.0, 0.0, 0.05, 0.005])
    assert over.tolist() == pytest.approx([1, 0, 0, 0, 0], abs=1e-6)  # low c, high v
    assert under.tolist() == pytest.approx([0, 0, 1, 0, 0], abs=1e-6)  # high c, low v
    alpha = SCHED([0.3, 0.3, 0.97, 0.75], [0.05, 0.0, 0.0, 0.005])
    assert alpha[0] == pytest.approx(-2.0)  # overthinking: strongly away from reflection
    assert -2.0 < alpha[1] < -0.9  # low confidence alone: F(c) only
    assert alpha[2] == pytest.approx(0.1, abs=1e-3)  # underthinking: slightly toward reflection
    assert alpha[0] < alpha[1] < alpha[3] < 0 < alpha[2]
    assert np.all(Schedule(**{**SCHED.__dict__, "scale": 0.0})([0.3, 0.97], [0.05, 0.0]) == 0.0)


def test_schedule_rejects_bad_quantiles():
    with pytest.raises(ValueError, match="q25c < q75c"):
        Schedule(q25c=0.9, q75c=0.6, q25v=0.0, q75v=0.1)


def test_tracker_mean_max_prob_and_variance_match_the_definition():
    table = StepTable.from_texts(TEXTS)
    tr = StepTracker(table, SCHED)
    # step 1: "a" "a" (0.5, 0.7) closed by "\n\n"; step 2: " b" (0.95) closed by "\n" "\n"
    out = [tr.feed(t, p) for t, p in [(0, 0.5), (0, 0.7), (3, 0.2), (4, 0.95), (2, 0.9), (2, 0.8)]]
    assert out[:2] == [None, None] and out[3:5] == [None, None]
    (c1, v1, a1), (c2, v2, a2) = tr.steps
    assert c1 == pytest.approx(0.6) and v1 == 0.0 and out[2] == a1
    # the first "\n" of the two-token blank line belongs to the step it closes
    assert c2 == pytest.approx((0.95 + 0.9) / 2) and v2 == pytest.approx((c2 - c1) ** 2 / 4) and out[5] == a2
    assert tr.feed(3, 0.5) == a2  # an empty step repeats the last alpha
    assert StepTracker(table, SCHED).feed(3, 0.5) == 0.0  # before any step: no push


def test_replay_and_segments_agree_with_the_tracker():
    table = StepTable.from_texts(TEXTS)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, len(TEXTS), size=200)
    probs = rng.uniform(0.2, 1.0, size=200)
    steered = replay(toks, probs, table, SCHED)
    ends = np.flatnonzero(table.ends(toks))
    assert set(steered) == {int(e) for e in ends if e < len(toks) - 1}  # every step end but a last token
    segs = step_segments(toks, probs, table)
    tr = StepTracker(table, SCHED)
    for t, p in zip(toks, probs):
        tr.feed(int(t), float(p))
    assert [c for c, _, _ in tr.steps] == pytest.approx([c for _, _, c in segs])
    assert variances([[0.5, 0.7, 0.6]]) == pytest.approx([0.01, 0.0025])


def test_steering_vector_points_from_confident_to_reflective_cluster():
    rng = np.random.default_rng(1)
    d = 16
    direction = np.zeros(d)
    direction[3] = 2.0
    conf = np.concatenate([rng.uniform(0.3, 0.5, 300), rng.uniform(0.95, 1.0, 300), rng.uniform(0.7, 0.8, 100)])
    hidden = rng.normal(size=(700, d)) + np.where(conf[:, None] < 0.6, direction, 0.0)
    hidden[600:] += 50.0  # the middle (dropped) steps must not count
    labels = label_steps(conf, np.zeros(700, bool), q25=0.6, q75=0.9)
    assert (labels == 1).sum() == 300 and (labels == 0).sum() == 300 and (labels == -1).sum() == 100
    s = steering_vector(hidden, labels)
    cos = s @ direction / (np.linalg.norm(s) * np.linalg.norm(direction))
    assert cos > 0.95 and s[3] == pytest.approx(2.0, abs=0.3)
    # a reflection word makes a confident step positive
    assert label_steps([0.99], [True], 0.6, 0.9).tolist() == [1]
    with pytest.raises(ValueError, match="both kinds"):
        steering_vector(hidden[:10], np.ones(10))


def test_reflection_words():
    assert is_reflective("Wait, let me double check that.") and is_reflective("But the total is 5")
    assert not is_reflective("So the total is 12 apples.") and not is_reflective("butter costs 3")


def test_fit_schedule_and_ridge():
    rng = np.random.default_rng(2)
    seqs = [list(rng.uniform(0.4, 1.0, 8)) for _ in range(20)]
    s = fit_schedule(seqs)
    allc = np.concatenate(seqs)
    assert s.q25c == pytest.approx(np.quantile(allc, 0.25)) and s.q25c < s.q75c and s.q25v < s.q75v
    with pytest.raises(ValueError, match="more problems"):
        fit_schedule([[0.5]])
    x = rng.normal(size=(400, 5))
    assert ridge_r2(x, x @ [1, -2, 0, 0, 0.5] + 0.01 * rng.normal(size=400), lam=1e-4) > 0.99
    assert ridge_r2(x, rng.normal(size=400)) < 0.1


def test_calibration_file_round_trip(tmp_path):
    cal = Calibration(vector=np.arange(6, dtype=np.float32), layer=3, schedule=SCHED, meta={"model": "m"})
    path = str(tmp_path / "cal.safetensors")
    cal.save(path)
    back = Calibration.load(path)
    assert back.layer == 3 and back.schedule == SCHED and back.meta == {"model": "m"}
    assert np.array_equal(back.vector, cal.vector)
    assert Calibration.load(path, scale=0.0).schedule.scale == 0.0
    assert math.isclose(float(back.schedule(0.3, 0.05)), -2.0)


@pytest.mark.parametrize("overrides, needle", [
    (["rollout.steering=rebalance"], "needs rollout.steering_path"),
    (["rollout.steering=rebalance", "rollout.steering_path=/nope.safetensors"], "does not exist"),
    (["rollout.steering=sideways"], "choose one of none, rebalance"),
])
def test_config_switch_is_validated(overrides, needle):
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_config_switch_picks_the_steering_extension(tmp_path):
    from actors.rollout_worker import engine_kwargs
    from launch.config import ConfigError, load_config

    path = tmp_path / "cal.safetensors"
    Calibration(vector=np.zeros(4, np.float32), layer=1, schedule=SCHED).save(str(path))
    cfg = load_config(None, ["rollout.steering=rebalance", f"rollout.steering_path={path}"])
    kw = engine_kwargs("m", cfg.rollout, seed=0)
    assert kw["worker_extension_cls"] == "actors.rebalance_vllm.SteeredWeightReceiver"
    assert kw["async_scheduling"] is False
    assert engine_kwargs("m", load_config(None, []).rollout, 0)["worker_extension_cls"].endswith("WeightReceiver")
    async_cfg = load_config(None, ["rollout.steering=rebalance", f"rollout.steering_path={path}",
                                   "rollout.engine=async"])  # either engine: the async worker installs the hooks
    assert engine_kwargs("m", async_cfg.rollout, 0)["worker_extension_cls"].endswith("SteeredWeightReceiver")
    with pytest.raises(ConfigError, match="rollout.enforce_eager=true"):
        load_config(None, ["rollout.steering=rebalance", f"rollout.steering_path={path}", "rollout.enforce_eager=false"])


def test_vllm_hooks_map_the_flat_batch_to_requests():
    """The worker extension's bookkeeping on a fake model runner: two requests scheduled together, one still in
    prefill while the other decodes, steered at the rows and with the alphas of a per-request replay."""
    from types import SimpleNamespace

    import torch

    from actors.rebalance_vllm import RebalanceSteering

    table = StepTable.from_texts(TEXTS)
    ext = RebalanceSteering()
    batch = SimpleNamespace(num_reqs=0, req_ids=[], num_computed_tokens_cpu=np.zeros(4, int),
                            num_prompt_tokens=np.zeros(4, int))
    runner = SimpleNamespace(input_batch=batch, query_start_loc=SimpleNamespace(np=np.zeros(5, int)))
    ext.model_runner = runner
    ext._rb = {"states": {}, "rows": [], "alphas": [], "log": [], "record": True, "enabled": True,
               "table": table, "cal": SimpleNamespace(schedule=SCHED)}
    prompts = {"a": [1, 4, 1], "b": [4, 4, 4, 4, 1]}
    gen = {"a": [0, 3, 4, 2, 2, 0, 5, 0], "b": [0, 0, 3, 4, 4, 5, 0, 3]}
    probs = {r: list(np.linspace(0.3, 0.99, len(g))) for r, g in gen.items()}
    done = {"a": 0, "b": 0}  # tokens of each request computed so far
    starts = {"a": 0, "b": 3}  # b arrives while a is in its 3rd step: b's prompt is scheduled in two chunks
    seen = {"a": {}, "b": {}}
    for step in range(12):
        reqs, chunks = [], []
        for r in ("a", "b"):
            seq = prompts[r] + gen[r]
            if step < starts[r] or done[r] >= len(seq) - 1:
                continue
            n = 3 if done[r] < len(prompts[r]) else 1  # prefill chunks of up to 3 tokens, then one token
            n = min(n, len(prompts[r]) - done[r]) if done[r] < len(prompts[r]) else 1
            reqs.append(r)
            chunks.append(seq[done[r]:done[r] + n])
        if not reqs:
            break
        batch.num_reqs, batch.req_ids = len(reqs), reqs
        for i, r in enumerate(reqs):
            batch.num_computed_tokens_cpu[i], batch.num_prompt_tokens[i] = done[r], len(prompts[r])
        runner.query_start_loc.np = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
        ext._rb_plan(torch.tensor([t for c in chunks for t in c]))
        for row, alpha in zip(ext._rb["rows"], ext._rb["alphas"]):
            i = int(np.searchsorted(runner.query_start_loc.np, row, side="right")) - 1
            seen[reqs[i]][done[reqs[i]] - len(prompts[reqs[i]])] = alpha
        logits = torch.zeros(len(reqs), 8)
        for i, r in enumerate(reqs):
            done[r] += len(chunks[i])
            k = done[r] - len(prompts[r])  # index of the token these logits will sample
            if k >= 0:
                p = probs[r][k]
                logits[i] = torch.log(torch.tensor([p] + [(1 - p) / 7] * 7))
        ext._rb_keep_max_probs(logits)
    for r in ("a", "b"):
        want = replay(gen[r], probs[r], table, SCHED, first_prev=prompts[r][-1])
        assert seen[r].keys() == want.keys() and want
        assert [seen[r][t] for t in want] == pytest.approx([want[t] for t in want], abs=1e-6)
    assert {req for req, *_ in ext._rb["log"]} == {"a", "b"}
