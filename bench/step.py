"""Where one training step's time goes, for two versions of the code side by side.

    python -m bench.step --revs HEAD~1 HEAD --rounds 2 --steps 40 --out step_overhead

Each revision is checked out in its own `git worktree` (under bench/results/.worktrees, removed afterwards) and
runs `python -m launch.train` with the same config and overrides, alternating A B A B so that a machine whose speed
drifts over the minutes hits both alike. A run's numbers are the medians over steps `--skip`+1 .. end of its
`history.json` (the first steps warm caches up): the step, vLLM's own generate (`timing/engine_generate_s`), the
learner's own forward/backward/optimizer step (`learner/compute_s`), every `timing/<phase>_s`, and
`timing/overhead_share` = (step - engine generate - learner compute) / step. The comparison is the ratio of the
medians over rounds, after / before.

Resumable: each finished run is written to the results file at once, and a rerun with the same arguments skips the
runs already there (`--fresh` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.common import write_result


def run_summary(history: list[dict], skip: int) -> dict:
    """Medians over the steps after the first `skip` of every timing key (and the learner's compute)."""
    rows = [h for h in history if h["step"] > skip]
    if not rows:
        raise ValueError(f"history has {len(history)} steps, none after --skip {skip}")
    keys = sorted({k for h in rows for k in h if k.startswith("timing/")} | {"learner/compute_s"})
    return {k: statistics.median(h[k] for h in rows if k in h) for k in keys if any(k in h for h in rows)}


def compare(runs: list[dict], revs: list[str]) -> dict:
    """Per revision, the median over its rounds of each key; and after/before for the step and the overhead."""
    by_rev = {rev: [r["medians"] for r in runs if r["rev"] == rev] for rev in revs}
    med = {rev: {k: statistics.median(m[k] for m in ms if k in m) for k in ms[0]} for rev, ms in by_rev.items() if ms}
    out = {"medians": med}
    if len(med) == 2:
        a, b = (med[r] for r in revs)
        out["step_ratio_after_before"] = b["timing/step_s"] / a["timing/step_s"]
        out["overhead_share_before"], out["overhead_share_after"] = a["timing/overhead_share"], b["timing/overhead_share"]
    return out


def result(shas: list[str], overrides: list[str], skip: int, runs: list[dict]) -> dict:
    """What the results file holds (rewritten after every run, so an interrupted benchmark keeps its runs)."""
    return {"revs": shas, "overrides": overrides, "skip": skip, "runs": runs, **compare(runs, shas)}


def checkout(rev: str, root: str) -> str:
    path = tempfile.mkdtemp(prefix="rev-", dir=root)
    subprocess.run(["git", "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    os.symlink(os.path.abspath(".venv"), os.path.join(path, ".venv"))
    return path


def train_once(tree: str, overrides: list[str], runs_dir: str, timeout: int) -> list[dict]:
    name = f"step-{os.getpid()}-{len(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else 0}"
    cmd = [sys.executable, "-m", "launch.train", *overrides, f"run_dir={runs_dir}", f"run_name={name}",
           "wandb.mode=disabled"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run in {tree} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(os.path.join(runs_dir, name, "history.json")) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    ap.add_argument("--revs", nargs=2, default=["HEAD~1", "HEAD"], help="before and after (git revisions)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--out", default="step_overhead", help="bench/results/<out>.json")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (default config otherwise)")
    args = ap.parse_args(argv)
    overrides = [f"train.steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0", *args.overrides]
    path = f"bench/results/{args.out}.json"
    shas = []
    for rev in args.revs:
        p = subprocess.run(["git", "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"error: --revs {rev!r} is not a commit of this repository (e.g. HEAD~1, a branch or a sha)",
                  file=sys.stderr)
            return 2
        shas.append(p.stdout.strip())
    done: list[dict] = []
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            old = json.load(f)
        if old.get("revs") == shas and old.get("overrides") == overrides:
            done = old["runs"]
    root = os.path.abspath("bench/results/.worktrees")
    os.makedirs(root, exist_ok=True)
    trees = {}
    try:
        for rnd in range(args.rounds):
            for rev in shas:
                if any(r["rev"] == rev and r["round"] == rnd for r in done):
                    continue
                if rev not in trees:
                    trees[rev] = checkout(rev, root)
                history = train_once(trees[rev], overrides, os.path.join(root, "runs"), args.timeout)
                done.append({"rev": rev, "round": rnd, "steps": len(history), "medians": run_summary(history, args.skip)})
                m = done[-1]["medians"]
                print(f"[bench.step] round {rnd} {rev}: step {m['timing/step_s']:.3f} s, "
                      f"overhead {m['timing/overhead_share']:.1%}", file=sys.stderr, flush=True)
                write_result(args.out, result(shas, overrides, args.skip, done))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", tree], capture_output=True)
        shutil.rmtree(os.path.join(root, "runs"), ignore_errors=True)
    out = result(shas, overrides, args.skip, done)
    write_result(args.out, out)
    print(json.dumps({k: out[k] for k in ("revs", "step_ratio_after_before", "overhead_share_before",
                                          "overhead_share_after") if k in out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
