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
