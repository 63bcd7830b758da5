"""bench/step.py's pure parts on plain data, and its one-line error for a revision that does not exist."""
import os
import subprocess
import sys

import pytest

from bench.step import compare, run_summary
from tests.conftest import ROOT


def rows(step_s, n=8):
    return [{"step": i, "timing/step_s": step_s, "timing/engine_generate_s": 0.1, "learner/compute_s": 0.05,
             "timing/overhead_share": (step_s - 0.15) / step_s, "timing/select_s": 0.01 * i} for i in range(1, n + 1)]


def test_medians_leave_out_the_warm_up_steps_and_compare_after_over_before():
    m = run_summary(rows(0.2), skip=5)
    assert m["timing/select_s"] == pytest.approx(0.07)  # steps 6, 7, 8
    assert m["learner/compute_s"] == 0.05 and m["timing/step_s"] == 0.2
    with pytest.raises(ValueError, match="none after --skip 8"):
        run_summary(rows(0.2), skip=8)
    runs = [{"rev": "a", "round": 0, "medians": run_summary(rows(0.2), 5)},
            {"rev": "b", "round": 0, "medians": run_summary(rows(0.3), 5)},
            {"rev": "b", "round": 1, "medians": run_summary(rows(0.1 + 0.15), 5)}]
    out = compare(runs, ["a", "b"])
    assert out["step_ratio_after_before"] == pytest.approx(0.275 / 0.2)  # median of b's two rounds
    assert out["overhead_share_before"] == pytest.approx(0.25)
    assert "step_ratio_after_before" not in compare(runs[:1], ["a", "b"])


def test_a_revision_that_does_not_exist_is_one_line_and_runs_nothing():
    p = subprocess.run([sys.executable, "-m", "bench.step", "--revs", "no-such-rev", "HEAD", "--out", "never_written"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "'no-such-rev' is not a commit" in p.stderr
    assert not os.path.exists(os.path.join(ROOT, "bench", "results", "never_written.json"))
