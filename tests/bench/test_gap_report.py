"""The gap benchmark's bookkeeping on plain data: thresholds, medians over seeds, merging result files."""
import json

from bench.gap import first_reaching, median_or_none, report


def test_first_reaching_is_the_first_evaluation_at_or_over_the_threshold():
    evals = [(0, 0.01), (100, 0.49), (200, 0.5), (300, 0.3), (400, 0.95)]
    assert first_reaching(evals, 0.5) == 200
    assert first_reaching(evals, 0.9) == 400
    assert first_reaching(evals[:4], 0.9) is None


def test_median_counts_a_seed_that_never_reached_as_infinitely_late():
    assert median_or_none([100, 300, None]) == 300
    assert median_or_none([100, None, None]) is None
    assert median_or_none([]) is None


def run(h, mode, seed, t05, final=0.5):
    return {"H": h, "mode": mode, "seed": seed, "tokens_to_0.5": t05, "tokens_to_0.9": None, "final_success": final,
            "wall_seconds": 10.0, "generated_tokens": 1000 * h}


def test_report_merges_files_later_runs_replacing_earlier_ones_partial_files_included(tmp_path, capsys):
    full = {"date": "d1", "commit": "c1", "summary": {"budget_tokens": 8000},
            "runs": [run(8, "root_start", 0, None), run(8, "root_start", 1, 70_000, final=0.6)]}
    partial = {"date": "d2", "commit": "c2", "partial": "1/4 runs",  # an interrupted invocation: no summary
               "runs": [run(8, "root_start", 1, 50_000, final=0.7), run(8, "root_start", 2, 60_000)]}
    paths = []
    for name, res in (("a", full), ("b", partial)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(res, f)
    assert report(paths, str(tmp_path / "merged")) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 8 | root_start"))
    # seeds 0, 1 (from the later file), 2: median of (inf, 50 K, 60 K) is 60 K
    assert row.startswith("| 8 | root_start | 3 | 60K; -, 50K, 60K |") and "0.50, 0.70, 0.50" in row, row
    assert "(partial: 1/4 runs)" in out and (tmp_path / "merged.png").stat().st_size > 0


def test_a_results_file_of_other_settings_is_not_resumed(tmp_path, capsys):
    """bench.gap resumes a results file only when its settings match; otherwise one line, exit 2, before any
    engine starts, and the file is left as it was."""
    import json
    import os

    from bench import gap

    name = f"test_gap_resume_{os.getpid()}"
    path = os.path.join("bench", "results", f"{name}.json")
    old = {"runs": [], "settings": {"steps": 5, "eval_every": 10, "stop_at": 0.5, "build_horizon": 4}}
    with open(path, "w") as f:
        json.dump(old, f)
    try:
        rc = gap.main(["--quick", "--horizons", "4", "--steps", "7", "--name", name])
        err = capsys.readouterr().err
        assert rc == 2 and "holds runs of other settings" in err and "--fresh" in err
        with open(path) as f:
            assert json.load(f) == old
    finally:
        os.remove(path)


def test_gap_modes_take_branch_fraction_variants_of_prefix_modes():
    from bench.gap import MODES, mode_overrides

    assert mode_overrides("prefix_frontier") == MODES["prefix_frontier"]
    assert "store.scorer=frontier" in MODES["prefix_frontier"] and "store.branch_action=resample" in MODES["prefix_frontier"]
    assert mode_overrides("prefix_frontier,bf=0.875")[-1] == "store.branch_fraction=0.875"
