"""Run a grid of config overrides and gather the runs into one table, one CSV and one plot.

    python -m launch.sweep configs/sweeps/smoke.yaml              # locally, one run after another
    python -m launch.sweep configs/sweeps/smoke.yaml --ray-jobs   # as Ray jobs on the cluster in $RAY_ADDRESS

A sweep file names a base `config`, common `overrides`, a `grid` of
key -> list of values (the cross product is run) and optional `skip_if`
combinations. Outputs go to runs/sweeps/<name>/: one run folder per grid
point, plus results.md, results.csv and results.png.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time

from launch.config import ConfigError, load_config

COLUMNS = ("heldout_success_before", "heldout_success_after", "generated_tokens", "rollouts_from_prefix",
           "train_seconds", "wall_seconds")


def grid_points(spec: dict) -> list[dict[str, object]]:
    keys = list(spec.get("grid", {}))
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(spec["grid"][k] for k in keys))]
    skips = spec.get("skip_if", []) or []
    return [p for p in points if not any(all(p.get(k) == v for k, v in s.items()) for s in skips)]


def run_name(point: dict) -> str:
    return "__".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"


def load_sweep(path: str) -> tuple[dict, list[dict]]:
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path!r} not found; see configs/sweeps/")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(spec) - {"name", "config", "overrides", "grid", "skip_if"}
    if unknown or "name" not in spec or "config" not in spec:
        raise ConfigError(f"sweep file {path!r} needs `name` and `config` and allows only name, config, overrides, grid, skip_if; got {sorted(spec)}")
    points = grid_points(spec)
    for p in points:  # reject a bad grid before anything runs
        load_config(spec["config"], list(spec.get("overrides", [])) + [f"{k}={v}" for k, v in p.items()])
    return spec, points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep file, e.g. configs/sweeps/smoke.yaml")
    ap.add_argument("--ray-jobs", action="store_true", help="submit each run as a Ray job to $RAY_ADDRESS")
    ap.add_argument("--runs-root", default="runs/sweeps")
    args = ap.parse_args(argv)
    try:
        spec, points = load_sweep(args.sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.join(args.runs_root, spec["name"])
    os.makedirs(out, exist_ok=True)
    commands = {}
    for p in points:
        name = run_name(p)
        if os.path.exists(os.path.join(out, name, "summary.json")):
            print(f"[sweep] {name}: done already, reusing", file=sys.stderr)
            continue
        commands[name] = ["-m", "launch.train", "--config", spec["config"], *spec.get("overrides", []),
                          *[f"{k}={v}" for k, v in p.items()], f"run_dir={os.path.abspath(out)}", f"run_name={name}"]
    (run_ray_jobs if args.ray_jobs else run_locally)(commands)
    rows = gather(out, points)
    write_outputs(out, rows)
    print(f"[sweep] {len(rows)} runs -> {out}/results.md", file=sys.stderr)
    return 0 if len(rows) == len(points) else 1


def run_locally(commands: dict[str, list[str]]) -> None:
    for i, (name, cmd) in enumerate(commands.items()):
        print(f"[sweep] run {i + 1}/{len(commands)}: {name}", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, *cmd])
        if p.returncode != 0:
            print(f"[sweep] {name} failed with exit code {p.returncode}", file=sys.stderr)


def run_ray_jobs(commands: dict[str, list[str]]) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(os.environ.get("RAY_ADDRESS"))
    ids = {name: client.submit_job(entrypoint=" ".join(["python", *cmd]),
                                   runtime_env={"working_dir": ".", "excludes": [".venv", ".git", "runs", "wandb"]})
           for name, cmd in commands.items()}
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while ids:
        for name, jid in list(ids.items()):
            status = client.get_job_status(jid)
            if status in done:
                print(f"[sweep] job {name}: {status}", file=sys.stderr)
                del ids[name]
        time.sleep(5)


def gather(out: str, points: list[dict]) -> list[dict]:
    rows = []
    for p in points:
        path = os.path.join(out, run_name(p), "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                s = json.load(f)
            rows.append({"run": run_name(p), **{k: v for k, v in p.items()}, **{k: s.get(k) for k in COLUMNS}})
    return rows


def write_outputs(out: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    keys = list(rows[0])
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        ax.scatter(r["generated_tokens"], r["heldout_success_after"], label=r["run"])
    ax.set_xlabel("generated training tokens")
    ax.set_ylabel("held-out success after training")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
