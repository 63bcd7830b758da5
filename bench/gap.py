"""The exponential-gap benchmark: root-start vs prefix access on the chain task, across horizons.

    .venv/bin/python -m bench.gap --quick      # H in {4, 8}, one seed, every mode, 200 updates, stop at 0.5; one JSON object
    .venv/bin/python -m bench.gap              # H in {4, 6, 8, 10, 12}, three seeds, plus every scorer/action at H=8
    .venv/bin/python -m bench.gap --horizons 10 --modes root_start --kl-coefs 0 0.001   # the beta sweep (default 0.01)

One base model, built once at the largest H (`model.build_horizon`, `--build-horizon`), serves every H: the
prompts have that many symbols and the reward counts the first H steps, so q is the same for every H
(`--build-horizon 0`: a model per H at the same target q, as in the runs recorded before 2026-12-02; the
rebuilt models' q fell to 0.437 at H=12). Each run also records the exact held-out success by teacher
forcing at every evaluation (`exact_evals`). Each run
trains the full system (vLLM rollout actor, prefix-store shard, DeepSpeed
learner) with identical budgets and seeds in one of these modes:
  root_start          every rollout from the prompt (group baseline)
  prefix_uncertainty  half the requests re-enter stored prefixes, outcome-uncertainty scorer
  prefix_random       half the requests re-enter random stored positions (control)
  prefix_first_surprise  half re-enter at the first surprising token of a stored path (the first
                      wrong turn when the model prefers the right step while on track) and force
                      the model's top alternative there: "extend the proven prefix"
  prefix_frontier     half re-enter at each root's deepest first surprise (one per root) and resample
                      that token, so the failing decision itself is sampled and trained
  <mode>,bf=<x>       a prefix mode with a share x of the requests re-entering stored prefixes
Held-out root-start success is measured every `--eval-every` steps; the
result of a run is the number of generated training tokens (and sampled
continuations) when it first reaches 0.5 and 0.9, or null.

Resumable: a rerun with the same name and settings (updates, evaluation interval, stop threshold, base model)
skips the (H, mode, seed) runs already in its results file; `--fresh` starts it over.

One engine serves every run: between runs it is given the next base
model's weights and task (same architecture for every H), so a run costs
a learner start (seconds), not an engine start (a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODES = {
    "root_start": ["store.branch_fraction=0.0"],
    "prefix_uncertainty": ["store.branch_fraction=0.5", "store.scorer=outcome_uncertainty"],
    "prefix_random": ["store.branch_fraction=0.5", "store.scorer=random"],
    # branch at the first token the model did not expect and force its top alternative there
    "prefix_first_surprise": ["store.branch_fraction=0.5", "store.scorer=first_surprise", "store.branch_action=force"],
    # the seed paper's frontier rule (prefix_store/frontier.py): per root its deepest first surprise, resampled
    "prefix_frontier": ["store.branch_fraction=0.5", "store.scorer=frontier", "store.branch_action=resample"],
}


def mode_overrides(mode: str) -> list[str]:
    """Config overrides of a mode: one of MODES, or a prefix mode at another branch fraction, `<mode>,bf=<x>`
    (x of the requests per step go to stored branch points, the rest to fresh prompts)."""
    base, _, frac = mode.partition(",bf=")
    if base not in MODES or base == "root_start" and frac or (mode != base and not frac):
        raise KeyError(mode)
    return MODES[base] + ([f"store.branch_fraction={float(frac)}"] if frac else [])
SCORERS_H8 = ("first_surprise", "surprise", "entropy", "one_minus_max_prob", "step_confidence", "confidence_variance",
              "outcome_uncertainty", "random")
VARIANTS_H8 = {  # every scorer with each branch action, and soft-value advantages with the default scorer
    **{f"scorer={s}": ["store.branch_fraction=0.5", f"store.scorer={s}"] for s in SCORERS_H8},
    **{f"scorer={s},force": ["store.branch_fraction=0.5", f"store.scorer={s}", "store.branch_action=force"]
       for s in SCORERS_H8},
    "soft_value": ["store.branch_fraction=0.5", "store.scorer=outcome_uncertainty", "learner.advantage=soft_value",
                   "learner.kl_mode=loss", "learner.kl_estimator=k2"],  # per-token advantages: the KL in the loss
}


SECONDS_PER_UPDATE = 0.75
"""One update with its share of the evaluations, default sizes, 2 CPU cores (H = 8-10, 2026-12-03): for the time
estimate printed before the runs start."""


def first_reaching(evals: list, threshold: float):
    """Generated tokens at the first evaluation whose held-out success is >= threshold (None if never)."""
    return next((tok for tok, s in evals if s >= threshold), None)


def run_one(rollout, model_dir: str, base_ref, cfg, run_dir: str, log) -> dict:
    import ray

    from launch.cluster import actor_env_vars
    from bench.workers import set_task
    from launch.trainer import Components, Trainer, model_vocab_size
    from learner.group import LearnerGroup
    from prefix_store.store import PrefixStore
    from actors.tasks import make_task

    t0 = time.time()
    set_task(rollout, cfg.task)
    rollout.update_weights(base_ref, 0)
    tc = cfg.train
    learner = LearnerGroup(model_dir=model_dir, learner_cfg=cfg.learner, seed=tc.seed,
                           micro_batch_size=tc.prompts_per_step * tc.samples_per_request,
                           env_vars=actor_env_vars(cfg.rollout.kv_cache_gib))
    store = PrefixStore(store_cfg=cfg.store, vocab_size=model_vocab_size(model_dir), seed=tc.seed)
    comp = Components(task=make_task(cfg.task), rollout=rollout, store=store, learner=learner, model_dir=model_dir)
    try:
        trainer = Trainer(comp, cfg, run_dir, log)
        s = trainer.run(t_start=t0)
    finally:
        learner.shutdown()
        for shard in store.shards:
            ray.kill(shard)
    evals = s["evals"]
    per_sample = s["generated_tokens"] / max(1, s["rollouts"])
    tokens_05, tokens_09 = first_reaching(evals, 0.5), first_reaching(evals, 0.9)
    return {"tokens_to_0.5": tokens_05, "tokens_to_0.9": tokens_09,
            "samples_to_0.5": None if tokens_05 is None else round(tokens_05 / per_sample),
            "samples_to_0.9": None if tokens_09 is None else round(tokens_09 / per_sample),
            "final_success": evals[-1][1], "initial_success": evals[0][1], "generated_tokens": s["generated_tokens"],
            "rollouts": s["rollouts"], "rollouts_from_prefix": s["rollouts_from_prefix"], "steps": s["steps"],
            "wall_seconds": round(time.time() - t0, 1), "evals": evals,
            "exact_evals": [list(e) for e in trainer.counters.exact_evals]}  # teacher-forced held-out success


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="H in {4, 8}, one seed, no scorer variants, 200 updates, stop at 0.5")
    ap.add_argument("--horizons", type=int, nargs="*")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=None, help="update budget per run (identical for every mode)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--no-variants", action="store_true", help="skip the scorer/action comparison at H=8")
    ap.add_argument("--variants-only", action="store_true", help="only the scorer/action comparison at H=8")
    ap.add_argument("--modes", nargs="*", help="run only these modes/variants (names as in the results)")
    ap.add_argument("--kl-coefs", type=float, nargs="*", default=[],
                    help="also run every planned mode at each of these learner.kl_coef (beta) values, named "
                         "'<mode>,beta=<value>' (the beta sweep: does the KL pull stall root-start at large H?)")
    ap.add_argument("--variant-seeds", type=int, default=None, help="seeds of each H=8 variant (default: --seeds)")
    ap.add_argument("--build-horizon", type=int, default=None,
                    help="one base model built at this H serves every H (model.build_horizon; default: the largest H); "
                         "0: a base model per H, as the runs recorded before 2026-12-02")
    ap.add_argument("--fresh", action="store_true", help="start the results file over instead of resuming it")
    ap.add_argument("--out", default="runs/bench_gap")
    ap.add_argument("--name", help="results file stem under bench/results (default: gap, gap_quick or gap_variants)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no runs: merge these result files into one table (stdout) and plot (bench/results/<--name>.png)")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.name or "gap_merged")
    horizons = [8] if args.variants_only else args.horizons or ([4, 8] if args.quick else [4, 6, 8, 10, 12])
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (200 if args.quick else 300)
    # --quick reports tokens to 0.5 only, so its runs stop there; the full benchmark goes on to 0.9
    stop_at = 0.5 if args.quick else 0.9
    variants = not (args.quick or args.no_variants)
    fractions = [m for m in args.modes or [] if ",bf=" in m]
    unknown = set(args.modes or []) - set(MODES) - set(VARIANTS_H8) - set(fractions)
    for m in fractions:
        try:
            mode_overrides(m)
        except (KeyError, ValueError):
            unknown.add(m)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; known: {', '.join([*MODES, *VARIANTS_H8])} and "
                 "<prefix mode>,bf=<share>")

    import ray

    from actors.group import RolloutGroup
    from bench.workers import BenchRolloutWorker
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars, connect
    from launch.config import load_config

    log = lambda m: print(m, file=sys.stderr, flush=True)
    common = ["wandb.mode=disabled", f"train.steps={steps}", f"train.eval_every={args.eval_every}",
              f"train.stop_at_success={stop_at}", "task.heldout_size=64", "train.eval_samples=4", "store.snapshot_every=0"]
    build_h = max(horizons) if args.build_horizon is None else args.build_horizon
    if build_h:  # the same base model (the same q) for every H; the reward counts the first H steps
        if build_h < max(horizons):
            ap.error(f"--build-horizon {build_h} must be >= the largest H {max(horizons)} (or 0)")
        common.append(f"model.build_horizon={build_h}")
    from bench.common import other_settings, stamp, write_result

    name = args.name or ("gap_variants" if args.variants_only else "gap_quick" if args.quick else "gap")
    settings = {"steps": steps, "eval_every": args.eval_every, "stop_at": stop_at, "build_horizon": build_h}
    results: dict = {"runs": [], "started": stamp(), "settings": settings}  # the top-level stamp is taken at the end
    path = os.path.join("bench", "results", f"{name}.json")
    done: set = set()
    if os.path.isfile(path) and not args.fresh:  # resume: the runs already measured are kept, not redone
        with open(path) as f:
            old = json.load(f)
        if other_settings(path, old.get("settings", {}), settings, "pass --fresh to start it over, or another --name"):
            return 2
        old.pop("partial", None)
        results = {**old, "started": old.get("started", results["started"])}
        done = {(r["H"], r["mode"], r["seed"]) for r in results["runs"]}
    t_start = time.time()
    models, reports = {}, {}
    for h in horizons:  # base models first (cached), each at the same target q
        cfg = load_config("configs/default.yaml", common + [f"task.horizon={h}"])
        models[h] = ensure_base_model(cfg.model, cfg.task, log=log)
        with open(os.path.join(models[h], "graftrl_base.json")) as f:
            reports[h] = json.load(f)
    base_cfg = load_config("configs/default.yaml", common + [f"task.horizon={horizons[0]}"])
    connect(base_cfg.ray)
    rollout = RolloutGroup(model_dir=models[horizons[0]], rollout_cfg=base_cfg.rollout, task_cfg=base_cfg.task,
                           seed=0, env_vars=actor_env_vars(base_cfg.rollout.kv_cache_gib), worker_cls=BenchRolloutWorker)
    base_refs = {}
    for h, d in models.items():
        with open(os.path.join(d, "model.safetensors"), "rb") as f:
            base_refs[h] = ray.put(f.read())

    seed_ids = range(args.first_seed, args.first_seed + seeds)
    plan = [] if args.variants_only else [(h, mode, seed, over) for h in horizons for mode, over in MODES.items()
                                          for seed in seed_ids]
    if (variants or args.variants_only or args.modes) and 8 in horizons:
        variant_seed_ids = seed_ids if args.variant_seeds is None else range(args.first_seed, args.first_seed + args.variant_seeds)
        plan += [(8, name, seed, over) for name, over in VARIANTS_H8.items() for seed in variant_seed_ids]
    if args.modes:
        plan = [x for x in plan if x[1] in args.modes]
        plan += [(h, m, seed, mode_overrides(m)) for h in horizons for m in fractions for seed in seed_ids]
    plan += [(h, f"{mode},beta={b:g}", seed, [*over, f"learner.kl_coef={b}"])
             for b in args.kl_coefs for h, mode, seed, over in list(plan)]
    if done:
        plan = [x for x in plan if x[:3] not in done]
        log(f"[gap] resuming {path}: {len(done)} runs kept, {len(plan)} to run")
    log(f"[gap] {len(plan)} runs; at most {len(plan) * steps * SECONDS_PER_UPDATE / 60:.0f} min at ~{SECONDS_PER_UPDATE} s "
        f"an update with evaluations (runs stop early at held-out {stop_at}), plus ~1 min of start-up")
    for i, (h, mode, seed, over) in enumerate(plan):
        cfg = load_config("configs/default.yaml", common + [f"task.horizon={h}", f"train.seed={seed}", *over])
        run_dir = os.path.join(args.out, f"h{h}_{mode}_s{seed}")
        os.makedirs(run_dir, exist_ok=True)
        log(f"[gap] run {i + 1}/{len(plan)}: H={h} {mode} seed={seed}")
        r = run_one(rollout, models[h], base_refs[h], cfg, run_dir, log)
        results["runs"].append({"H": h, "mode": mode, "seed": seed, **r})
        log(f"[gap]   tokens_to_0.5={r['tokens_to_0.5']} tokens_to_0.9={r['tokens_to_0.9']} "
            f"final={r['final_success']:.3f} ({r['wall_seconds']} s)")
        write_result(name, {**results, "partial": f"{i + 1}/{len(plan)} runs"})  # an interrupted run keeps what it measured
    rollout.shutdown()
    ray.shutdown()

    budget = steps * base_cfg.train.prompts_per_step * base_cfg.train.samples_per_request
    results.update(horizons=sorted({r["H"] for r in results["runs"]}), seeds=seeds, steps_budget=steps, budget_samples=budget,
                   base_models={h: {k: reports[h].get(k) for k in ("measured_q", "heldout_root_success", "target_q")}
                                for h in horizons},
                   seconds=round(time.time() - t_start, 1), quick=args.quick)
    modes = sorted({r["mode"] for r in results["runs"]}, key=lambda m: (m not in MODES, m))
    summary = {"H": {str(h): {m: median_or_none([r["tokens_to_0.5"] for r in results["runs"] if r["H"] == h and r["mode"] == m])
                              for m in modes if any(r["H"] == h and r["mode"] == m for r in results["runs"])}
                     for h in horizons}}
    summary["budget_tokens"] = max(r["generated_tokens"] for r in results["runs"])
    results["summary"] = summary
    results.update(stamp())
    write_result(name, results)
    if not args.variants_only:
        plot(results, os.path.join("bench", "results", f"{name}.png"))
    print(json.dumps(summary))
    return 0


def table(runs: list) -> str:
    """Markdown table, one row per (H, mode): median over seeds and the per-seed values."""
    def fmt(x):
        return "-" if x is None else f"{x / 1000:.0f}K"

    lines = ["| H | mode | seeds | tokens to 0.5 (median; per seed) | tokens to 0.9 (median) | final success (per seed) | wall s (mean) |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["H"], r["mode"]) for r in runs}, key=lambda k: (k[0], k[1] not in MODES, list(MODES).index(k[1]) if k[1] in MODES else 0, k[1]))
    for h, mode in keys:
        rs = sorted((r for r in runs if r["H"] == h and r["mode"] == mode), key=lambda r: r["seed"])
        t5 = [r["tokens_to_0.5"] for r in rs]
        finals = ", ".join(f"{r['final_success']:.2f}" for r in rs)
        lines.append(f"| {h} | {mode} | {len(rs)} | {fmt(median_or_none(t5))}; {', '.join(fmt(x) for x in t5)} | "
                     f"{fmt(median_or_none([r['tokens_to_0.9'] for r in rs]))} | "
                     f"{finals} | "
                     f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def report(paths: list, name: str) -> int:
    """Merge result files (runs of later files replace equal (H, mode, seed) runs of earlier ones)."""
    merged, stamps, budget = {}, [], 0
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        stamps.append(f"{os.path.basename(path)}: {res['date']} {res['commit']}" + (f" (partial: {res['partial']})" if "partial" in res else ""))
        budget = max([budget, *(r["generated_tokens"] for r in res["runs"])])  # partial files have no summary
        for r in res["runs"]:
            merged[(r["H"], r["mode"], r["seed"])] = r
    runs = list(merged.values())
    horizons = sorted({r["H"] for r in runs})
    from bench.common import stamp

    out = {"runs": runs, "horizons": horizons, "summary": {"budget_tokens": budget}, "sources": stamps, **stamp()}
    plot(out, os.path.join("bench", "results", f"{name}.png"))
    print(table(runs))
    print("\nsources: " + "; ".join(stamps))
    return 0


def median_or_none(xs):
    """Median over seeds; a seed that never reached the threshold counts as infinitely late."""
    xs = [float("inf") if x is None else x for x in xs]
    m = statistics.median(xs) if xs else float("inf")
    return None if m == float("inf") else m


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    plotted = [m for m in MODES if any(r["mode"] == m for r in results["runs"])]
    plotted += sorted({r["mode"] for r in results["runs"] if ",bf=" in r["mode"]})  # branch-fraction variants
    for k, mode in enumerate(plotted):
        hs, med, lo, hi = [], [], [], []
        for h in results["horizons"]:
            xs = [r["tokens_to_0.5"] for r in results["runs"] if r["H"] == h and r["mode"] == mode]
            reached = [x for x in xs if x is not None]
            if reached:
                hs.append(h)
                med.append(statistics.median(reached))
                lo.append(min(reached))
                hi.append(max(reached))
                if len(reached) < len(xs):  # how many seeds the point stands for
                    ax.annotate(f"{len(reached)}/{len(xs)}", (h, med[-1]), textcoords="offset points", xytext=(5, -10),
                                fontsize=7, color=f"C{k}")
        missed = [h for h in results["horizons"]
                  if any(r["H"] == h and r["mode"] == mode and r["tokens_to_0.5"] is None for r in results["runs"])]
        line, = ax.plot(hs, med, marker="o", label=mode, color=f"C{k}")
        if hs:
            ax.fill_between(hs, lo, hi, alpha=0.2, color=line.get_color())
        if missed:  # a seed that never reached 0.5: drawn at the budget
            ax.scatter([h + 0.12 * (k - 1.5) for h in missed], [results["summary"]["budget_tokens"]] * len(missed),
                       marker="x", color=line.get_color())
    ax.axhline(results["summary"]["budget_tokens"], ls="--", c="gray", lw=1, label="budget (x: a seed not reaching 0.5)")
    ax.set_yscale("log")
    ax.set_xlabel("horizon H")
    ax.set_ylabel("generated tokens to held-out success 0.5\n(median of the seeds reaching it; k/n seeds; band: min-max)",
                  fontsize=7)
    ax.set_title(f"{results['date']} {results['commit']}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
