"""The calibration command's bad input: one line on stderr, exit status 2, nothing written (no model is loaded)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "actors.rebalance_calibrate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("make, extra, needle", [
    (lambda d: str(d / "missing"), [], "neither a model folder nor one of"),
    (lambda d: str(d), [], "has no config.json"),
    (lambda d: str(d), ["--problems", "0"], "--problems=0 must be >= 1"),
    (lambda d: str(d), ["--step-rule", "comma"], "choose one of blank_line, newline"),
    (lambda d: str(d), ["--layer", "9"], "--layer=9 must lie in [0, 2)"),
])
def test_bad_input_is_one_line(tmp_path, make, extra, needle):
    model = make(tmp_path)
    if "has no config.json" not in needle and "neither" not in needle:
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    out = tmp_path / "cal.safetensors"
    p = run("--model", model, "--out", str(out), *extra)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
