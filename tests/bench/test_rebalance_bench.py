"""bench/rebalance.py's resume rule on plain files: same settings keep the runs, other settings are refused."""
import json

from bench.rebalance import earlier_runs

SETTINGS = {"model": "/m", "problems": 256, "max_new_tokens": 256, "calibrations": ["a.safetensors"]}


def test_no_file_means_nothing_kept(tmp_path):
    assert earlier_runs(str(tmp_path / "none.json"), SETTINGS) == {}


def test_same_settings_keep_the_runs_other_settings_are_one_line(tmp_path, capsys):
    path = tmp_path / "rebalance.json"
    runs = {"greedy": {"none": {"tokens_per_answer": 80.0}}}
    path.write_text(json.dumps({**SETTINGS, "date": "d", "runs": runs}))
    assert earlier_runs(str(path), SETTINGS) == runs
    assert earlier_runs(str(path), {**SETTINGS, "problems": 64}) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "problems: 256 there, 64 now" in err and err.startswith("error: ") and "--fresh" in err
