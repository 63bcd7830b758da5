"""bench/discovery's pure parts on plain data: the counters at the first K solved prompts, the censored estimate,
the summary and table."""
import pytest

from bench.discovery import analytic, first_k, summary, table


def test_first_k_takes_the_counters_of_the_sample_that_solves_the_kth_prompt():
    events = [(1, 5, 6, 0), (2, 10, 12, 1), (3, 15, 18, 1), (4, 20, 24, 2)]
    got = first_k(events, ks=(1, 2, 3))
    assert got[1] == {"calls": 2, "generated_tokens": 10, "prefill_tokens": 12}
    assert got[2] == {"calls": 4, "generated_tokens": 20, "prefill_tokens": 24}
    assert got[3] is None  # never reached: censored


def test_analytic_is_k_over_p0_calls_at_the_measured_token_rate():
    assert analytic(10, 0.001, 11.0) == {"calls": 10_000, "generated_tokens": 110_000}
    assert analytic(1, 0.0, 5.0) == {"calls": None, "generated_tokens": None}


def _cell(h, mode, k10, censored=False):
    v = {"censored": True, "expected_root_start": {"calls": 9, "generated_tokens": 999}} if censored else \
        {"calls": k10 // 10, "generated_tokens": k10, "prefill_tokens": k10}
    k = {"1": {"calls": 1, "generated_tokens": 10, "prefill_tokens": 10}, "10": v, "100": v}
    return {"H": h, "mode": mode, "seed": 0, "k": k, "generated_tokens": 500,
            "expected_root_start": {str(x): {"calls": 9, "generated_tokens": 999 * x} for x in (1, 10, 100)}}


def test_summary_and_table_mark_censored_cells_and_give_the_ratio():
    res = {"budget_tokens": 500, "p0": {"8": {"p0": 0.004}},
           "cells": [_cell(8, "root_start", 0, censored=True), _cell(8, "prefix_uncertainty", 200)]}
    s = summary(res)
    root, pre = s["H"]["8"]["root_start"], s["H"]["8"]["prefix_uncertainty"]
    assert root["discovery_tokens_k10"] is None and root["discovery_tokens_k10_estimate"] == 9990
    assert pre["discovery_tokens_k10"] == 200 and "discovery_tokens_k10_estimate" not in pre
    t = table(res)
    assert "censored" in t and "5.0x (root censored: K/p0)" in t  # 999 / 200
    assert s["budget_tokens"] == 500


def test_torch_generator_records_what_a_rollout_actor_records(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.tasks import EOS, VOCAB, ChainTask
    from bench.discovery import TorchGenerator
    from protocol.messages import RolloutRequest

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=EOS)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    task = ChainTask(horizon=3, heldout_size=4)
    gen = TorchGenerator(str(tmp_path), task, top_k=5, seed=0)
    d = task.heldout_prompts()[0]
    reqs = [RolloutRequest(request_id=0, root_id="r", prompt_ids=task.prompt_ids(d), n=3),
            RolloutRequest(request_id=1, root_id="r", prompt_ids=task.prompt_ids(d), prefix_ids=[5, 6], n=2, branch_ref=4)]
    out = gen.generate(reqs)
    assert [r.request_id for r in out] == [0, 0, 0, 1, 1] and out[3].branch_ref == 4
    for r in out:
        budget = task.max_new_tokens - len(r.prefix_ids)
        assert 1 <= len(r.token_ids) <= budget and (EOS not in r.token_ids[:-1])
        assert len(r.logprobs) == len(r.top1_logprobs) == len(r.alt_token_ids) == len(r.entropy) == len(r.token_ids)
        assert all(lp <= t1 + 1e-6 for lp, t1 in zip(r.logprobs, r.top1_logprobs))
        assert all(a != t for a, t in zip(r.alt_token_ids, r.token_ids))
        assert r.reward == task.reward(r.prompt_ids, r.prefix_ids + r.token_ids)


def test_bootstrap_ratio_is_the_ratio_of_means_inside_its_interval():
    from bench.discovery import bootstrap_ratio

    r = bootstrap_ratio([100.0, 300.0, 200.0], [10.0, 30.0, 20.0])
    assert r["ratio"] == pytest.approx(10.0)
    assert r["lo"] < r["ratio"] < r["hi"]  # the seeds vary, so the interval has width
    same = bootstrap_ratio([50.0] * 4, [5.0] * 4)
    assert same["lo"] == pytest.approx(10.0) and same["hi"] == pytest.approx(10.0)


def test_ratios_enter_censored_root_cells_at_their_estimate_and_the_table_shows_the_interval(tmp_path):
    from bench.discovery import plot, ratio_table, ratios

    cells = []
    for seed, (root, pre) in enumerate([(800, 100), (1200, 300)]):
        cells += [{**_cell(8, "root_start", root), "seed": seed}, {**_cell(8, "prefix_frontier", pre), "seed": seed}]
    cells.append({**_cell(8, "root_start", 0, censored=True), "seed": 2})  # enters at 999
    res = {"budget_tokens": 500, "p0": {"8": {"p0": 0.004}}, "cells": cells}
    r = ratios(res)["8"]["prefix_frontier"]
    assert r["ratio"] == pytest.approx(((800 + 1200 + 999) / 3) / 200)
    assert r["seeds"] == [3, 2] and r["root_censored"] == 1 and r["mode_censored"] == 0
    t = ratio_table(res)
    assert "1/3 censored" in t and f"**{r['ratio']:.1f}x** [{r['lo']:.1f}, {r['hi']:.1f}]" in t
    plot(res, str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size > 0


def test_end_to_end_estimate_is_discovery_of_k_star_successes_plus_the_learning_floor():
    from bench.discovery import end_to_end_estimate

    # K*/p0 calls at 5 tokens each, plus the floor: 100 / 0.001 * 5 + 40_000
    assert end_to_end_estimate(0.001, 5.0, 40_000.0, k_star=100) == pytest.approx(540_000)
    assert end_to_end_estimate(0.0, 5.0, 40_000.0) is None  # no exact p0
    assert end_to_end_estimate(0.001, 5.0, None) is None  # no prefix mode reached 0.5: no floor


def test_quick_summary_joins_discovery_and_end_to_end_per_h_and_mode():
    from bench.discovery import quick_summary

    root8 = {**_cell(8, "root_start", 0, censored=True), "generated_tokens": 2000, "calls": 400}  # 5 tokens a call
    disc = {"budget_tokens": 2000, "p0": {"8": {"p0": 0.004}, "10": {"p0": 0.001}},
            "cells": [root8, {**_cell(8, "prefix_first_surprise", 200), "calls": 40},
                      {**_cell(10, "root_start", 1000), "calls": 200}]}
    e2e = {"runs": [
        {"H": 8, "mode": "root_start", "seed": 0, "tokens_to_0.5": None, "generated_tokens": 60_000},
        {"H": 8, "mode": "prefix_first_surprise", "seed": 0, "tokens_to_0.5": 30_000, "generated_tokens": 31_000}]}
    q = quick_summary(disc, e2e, k_star=100)
    root, fs = q["H"]["8"]["root_start"], q["H"]["8"]["prefix_first_surprise"]
    assert root["discovery_tokens_k10"] is None and root["discovery_tokens_k10_estimate"] == 9990
    assert root["tokens_to_0.5"] is None  # censored by the budget
    assert root["tokens_to_0.5_estimate"] == pytest.approx(100 / 0.004 * 5 + 30_000)
    assert fs == {"discovery_tokens_k10": 200, "tokens_to_0.5": 30_000, "tokens_to_0.5_estimate": 30_000}
    assert q["H"]["10"] == {"root_start": {"discovery_tokens_k10": 1000}}  # discovery only at H=10
    assert q["budget_tokens"] == 2000 and q["end_to_end_budget_tokens"] == 60_000


def test_end_to_end_ratios_bootstrap_seeds_and_enter_censored_root_runs_at_the_estimate():
    from bench.discovery import end_to_end_ratios

    disc = {"p0": {"8": {"p0": 0.004}},
            "cells": [{**_cell(8, "root_start", 2000), "generated_tokens": 2000, "calls": 400}]}  # 5 tokens a call

    def run(h, mode, seed, t):
        return {"H": h, "mode": mode, "seed": seed, "tokens_to_0.5": t, "generated_tokens": 60_000}

    e2e = {"runs": [run(8, "root_start", 0, None), run(8, "root_start", 1, 100_000),
                    run(8, "prefix_first_surprise", 0, 20_000), run(8, "prefix_first_surprise", 1, 40_000),
                    run(8, "prefix_random", 0, None),  # a prefix seed that never got there: the mode is left out
                    run(6, "root_start", 0, None), run(6, "prefix_first_surprise", 0, 10_000)]}  # no p0 at H=6
    r = end_to_end_ratios(disc, e2e, k_star=100)
    assert set(r) == {"8"} and set(r["8"]) == {"prefix_first_surprise"}
    fs = r["8"]["prefix_first_surprise"]
    estimate = 100 / 0.004 * 5 + 30_000  # K*/p0 * tokens per call + the best prefix median
    assert fs["root_estimate"] == pytest.approx(estimate) and fs["root_censored"] == 1 and fs["seeds"] == [2, 2]
    assert fs["ratio"] == pytest.approx((estimate + 100_000) / 2 / 30_000)
    assert fs["lo"] <= fs["ratio"] <= fs["hi"]
    e2e["runs"][0]["tokens_to_0.5"] = 80_000  # measured: no estimate enters
    fs = end_to_end_ratios(disc, e2e)["8"]["prefix_first_surprise"]
    assert fs["root_estimate"] is None and fs["ratio"] == pytest.approx(90_000 / 30_000)


def test_plot_two_costs_writes_a_png_with_measured_and_estimated_points(tmp_path):
    from bench.discovery import plot_two_costs

    quick = {"H": {"4": {"root_start": {"discovery_tokens_k10": 900, "tokens_to_0.5": 20_000, "tokens_to_0.5_estimate": 25_000},
                         "prefix_first_surprise": {"discovery_tokens_k10": 300, "tokens_to_0.5": 15_000,
                                                   "tokens_to_0.5_estimate": 15_000}},
                   "8": {"root_start": {"discovery_tokens_k10": None, "discovery_tokens_k10_estimate": 90_000,
                                        "tokens_to_0.5": None, "tokens_to_0.5_estimate": 400_000}}}}
    path = tmp_path / "two.png"
    plot_two_costs(quick, str(path), "test")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_mode_overrides_name_branch_fraction_variants_of_prefix_modes_only():
    from bench.discovery import MODES, mode_order, mode_overrides

    assert mode_overrides("prefix_frontier") == MODES["prefix_frontier"]
    assert mode_overrides("prefix_frontier,bf=0.875")[-1] == "store.branch_fraction=0.875"
    for bad in ("root_start,bf=0.5", "nope,bf=0.5", "prefix_frontier,bf=", "prefix_frontier,bf=x"):
        with pytest.raises((KeyError, ValueError)):
            mode_overrides(bad)
    order = sorted(["prefix_frontier,bf=0.875", "prefix_frontier", "root_start"], key=mode_order)
    assert order == ["root_start", "prefix_frontier", "prefix_frontier,bf=0.875"]


def test_end_to_end_without_report_is_refused_before_anything_runs(capsys):
    import pytest

    from bench.discovery import main

    with pytest.raises(SystemExit) as e:
        main(["--end-to-end", "bench/results/gap_frontier.json"])
    assert e.value.code == 2
    assert "pass --report too" in capsys.readouterr().err


def test_calibrated_k_star_solves_the_two_cost_model_where_root_start_reached():
    from bench.discovery import calibrated_k_star

    disc = {"p0": {"8": {"p0": 0.004}, "10": {"p0": 0.001}, "12": {"p0": 0.00025}},
            "cells": [{"H": h, "mode": "root_start", "calls": 100, "generated_tokens": 100 * (h + 1)} for h in (8, 10, 12)]}
    runs = [{"H": 8, "mode": "root_start", "tokens_to_0.5": 63_000}, {"H": 8, "mode": "prefix_frontier", "tokens_to_0.5": 54_000},
            {"H": 10, "mode": "root_start", "tokens_to_0.5": 200_000}, {"H": 10, "mode": "root_start", "tokens_to_0.5": 210_000},
            {"H": 10, "mode": "prefix_frontier", "tokens_to_0.5": 88_000},
            {"H": 12, "mode": "root_start", "tokens_to_0.5": None}, {"H": 12, "mode": "prefix_frontier", "tokens_to_0.5": 68_000}]
    k, per_h = calibrated_k_star(disc, {"runs": runs})
    assert set(per_h) == {8, 10}  # H=12's root-start never reached 0.5: nothing to fit there
    assert abs(per_h[10] - (205_000 - 88_000) * 0.001 / 11) < 1e-9 and k == per_h[10]
    assert abs(per_h[8] - (63_000 - 54_000) * 0.004 / 9) < 1e-9
    assert calibrated_k_star(disc, {"runs": runs[-2:]}) == (None, {})
