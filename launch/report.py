"""What a run shows a person: the summary table, the plots, the summary files. No training logic."""
from __future__ import annotations

import json
import os

SUMMARY_ROWS = ("steps", "heldout_success_before", "heldout_success_after", "rollouts", "rollouts_from_prefix",
                "stale_rollouts_dropped", "generated_tokens", "final_loss", "startup_seconds", "train_seconds",
                "wall_seconds")


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"graftrl run {summary['run_id']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_ROWS:
        v = summary.get(key)
        table.add_row(key, f"{v:.3f}" if isinstance(v, float) and key.startswith(("heldout", "final")) else str(v))
    Console(stderr=True).print(table)


def write_plots(run_dir: str, history: list[dict], evals: list[tuple[int, float]]) -> list[str]:
    """PNG plots: held-out success against generated tokens; tree statistics per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if evals:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([t for t, _ in evals], [s for _, s in evals], marker="o")
        ax.set_xlabel("generated training tokens")
        ax.set_ylabel("held-out root-start success")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(run_dir, "heldout_success.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if history:
        keys = [("rollout/reward_mean", "rollout reward"), ("tree/prefix_share", "share from stored prefixes"),
                ("tree/branch_depth_mean", "branch depth (tokens)"), ("tree/branch_uncertainty_mean", "entropy at forks")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        steps = [h["step"] for h in history]
        for ax, (key, title) in zip(axes, keys):
            ax.plot(steps, [h.get(key, float("nan")) for h in history])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(run_dir, "tree.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_summary(run_dir: str, runs_root: str, summary: dict) -> str:
    """runs/<id>/summary.json, then point runs/latest at the run (atomically)."""
    path = os.path.join(run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    latest = os.path.join(runs_root, "latest")
    if os.path.islink(latest) or not os.path.exists(latest):
        tmp = latest + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(os.path.normpath(run_dir)), tmp)
        os.replace(tmp, latest)
    return path
