"""Discovery with the policy frozen: what it costs to find verified successes, root-start vs prefix access.

    .venv/bin/python -m bench.discovery --quick   # discovery at H in {4, 8, 10}, end to end at {4, 8}; one JSON line
    .venv/bin/python -m bench.discovery           # H in {4, 6, 8, 10, 12, 14}, three seeds
    .venv/bin/python -m bench.discovery --report bench/results/discovery_quick.json   # the table only

The seed paper's gap is in generator queries: with the policy fixed, how many
samples does it take to see a success? Here no learner runs. One base model,
built once at the largest horizon (`model.build_horizon`), serves every H (the
reward counts the first H steps, so q is the same for every H). For each
(H, mode, seed) the loop of a training run is kept, without the update: every
round asks the store for branch points (a share `store.branch_fraction` of 16
requests; root-start: none), fills the rest with fresh training prompts, samples
4 continuations per request with the frozen engine, and inserts them into the
store. It counts, until K in {1, 10, 100} distinct training prompts have a
verified success (a sample from the prompt or from a stored prefix whose whole
answer is right):

  calls            sampled continuations (generator queries)
  generated_tokens tokens those continuations generated
  prefill_tokens   context tokens (prompt + stored prefix) of those continuations, counted once per
                   continuation as the query model charges them (the engine's prefix cache shares some)

A cell stops at K = 100 or at `--budget` generated tokens; the K it did not
reach are right-censored and carry the analytic expectation from the exact
root-start success p0 = mean over held-out prompts of prod_i pi(s_i | s_<i)
(teacher forcing): about K / p0 calls (distinct prompts: at these p0 repeats
are rare), times the measured tokens per call. Results are resumable: cells
already in the results file are skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from bench.gap import MODES, mode_overrides  # noqa: F401 - mode_overrides: this module's modes are gap's


def mode_order(mode: str) -> tuple:
    """Table and plot order: the MODES order, variants after their mode."""
    base = mode.partition(",bf=")[0]
    return (list(MODES).index(base) if base in MODES else len(MODES), mode)


QUICK_MODES = ("root_start", "prefix_first_surprise", "prefix_frontier")
"""--quick's discovery modes: root-start, the best prefix mode of the gap runs, the seed paper's rule (the
uncertainty and random scorers took 2-3 min a cell at H=8-10, past the 15-minute limit)."""
KS = (1, 10, 100)
PROMPTS, SAMPLES = 16, 4  # requests per round and continuations per request (the training defaults)
TOKENS_PER_S = 2500  # rough vLLM CPU throughput on the tiny model, for the time estimate printed before the start


def first_k(events: list[tuple[int, int, int, int]], ks=KS) -> dict:
    """events: (calls, generated_tokens, prefill_tokens, distinct solved prompts) after each sample, in order.
    -> {K: the counters at the first event with solved >= K, or None}."""
    out = {k: None for k in ks}
    for calls, gen, pre, solved in events:
        for k in ks:
            if out[k] is None and solved >= k:
                out[k] = {"calls": calls, "generated_tokens": gen, "prefill_tokens": pre}
    return out


def analytic(k: int, p0: float, tokens_per_call: float) -> dict:
    """Root-start expectation: K / p0 calls to K successes (distinct prompts), tokens at the measured rate."""
    if p0 <= 0:  # no success is reachable in expectation: no finite estimate
        return {"calls": None, "generated_tokens": None}
    return {"calls": round(k / p0), "generated_tokens": round(k / p0 * tokens_per_call)}


def exact_p0(model_dir: str, task, heldout: int = 512) -> dict:
    """Teacher forcing on `heldout` held-out prompts: p0 = mean prod_i pi(s_i | s_<i), and the mean per-step q."""
    import torch

    from launch.base_model import load_model
    from learner.exact_success import teacher_forced_logprob

    model = load_model(model_dir)
    prompts = task.heldout_prompts()[:heldout]
    seqs = [task.teacher_forcing(d) for d in prompts]
    ids = torch.tensor([s for s, _ in seqs])  # (B, L): chain sequences all have one length
    first = torch.tensor([f for _, f in seqs])
    with torch.no_grad():
        logits = model(ids).logits
        logp = teacher_forced_logprob(logits, ids, first, task.horizon)  # (B,)
        steps = [teacher_forced_logprob(logits, ids, first + i, 1).exp().mean().item() for i in range(task.horizon)]
    return {"p0": float(logp.exp().mean()), "q_mean": float(sum(steps) / len(steps)),
            "q_per_step": [round(q, 4) for q in steps], "prompts": len(prompts)}


class TorchGenerator:
    """The frozen policy sampled with plain torch in this process (transformers' `generate`, temperature 1, the
    full softmax), behind the rollout group's interface (`generate(requests) -> [Rollout]`, `pop_errors`):
    the same per-token logprob, top-k entropy, top-1 and alternative a vLLM rollout actor records, no Ray or
    vLLM. `--engine torch` (the tiny model is 345K parameters: a batched `generate` is as fast as the engine
    here, and needs no engine start)."""

    def __init__(self, model_dir: str, task, *, top_k: int, seed: int):
        import torch

        from launch.base_model import load_model

        torch.manual_seed(seed)
        self.torch, self.model, self.task, self.top_k = torch, load_model(model_dir), task, top_k

    def set_task(self, task) -> None:
        self.task = task

    def pop_errors(self) -> list:
        return []

    def generate(self, requests) -> list:
        from collections import defaultdict

        from actors.tasks import EOS, PAD
        from protocol.messages import Rollout
        from protocol.uncertainty import entropy_from_topk

        torch, out = self.torch, {}
        groups = defaultdict(list)  # equal context lengths and budgets batch without padding
        for i, req in enumerate(requests):
            budget = max(1, self.task.max_new_tokens - len(req.prefix_ids))
            groups[(len(req.prompt_ids) + len(req.prefix_ids), budget)].append(i)
        for (length, budget), idx in groups.items():
            ctx = torch.tensor([requests[i].prompt_ids + requests[i].prefix_ids for i in idx for _ in range(requests[i].n)])
            with torch.no_grad():
                g = self.model.generate(ctx, attention_mask=torch.ones_like(ctx), do_sample=True, top_k=0, top_p=1.0,
                                        temperature=1.0, max_new_tokens=budget, output_logits=True,
                                        return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=PAD)
            new = g.sequences[:, length:]  # (B, T)
            logp = torch.log_softmax(torch.stack(g.logits, 1).float(), -1)  # (B, T, V)
            topv, topi = logp.topk(self.top_k, -1)  # (B, T, k)
            row = 0
            for i in idx:
                req, outs = requests[i], []
                for _ in range(req.n):
                    toks = new[row].tolist()
                    n = toks.index(EOS) + 1 if EOS in toks else len(toks)
                    toks = toks[:n]
                    lps, ents, top1s, alts, alt_lps = [], [], [], [], []
                    for t, tok in enumerate(toks):
                        lps.append(float(logp[row, t, tok]))
                        tv, ti = topv[row, t].tolist(), topi[row, t].tolist()
                        ents.append(entropy_from_topk(tv))
                        top1s.append(tv[0])
                        alt = next(((lp, a) for lp, a in zip(tv, ti) if a != tok), (-1e9, -1))
                        alts.append(alt[1])
                        alt_lps.append(alt[0])
                    outs.append(Rollout(request_id=req.request_id, root_id=req.root_id, prompt_ids=req.prompt_ids,
                                        prefix_ids=req.prefix_ids, token_ids=toks, logprobs=lps, entropy=ents,
                                        top1_logprobs=top1s, alt_token_ids=alts, alt_logprobs=alt_lps,
                                        reward=self.task.reward(req.prompt_ids, req.prefix_ids + toks), policy_version=0,
                                        actor_id=0, branch_ref=req.branch_ref, forced=req.forced))
                    row += 1
                out[i] = outs
        return [r for i in range(len(requests)) for r in out[i]]


def run_cell(group, task, store, *, mode: str, seed: int, budget: int, branch_fraction: float, log) -> dict:
    """Rounds of PROMPTS requests x SAMPLES continuations, frozen policy, until K = max(KS) or `budget` tokens."""
    from launch.trainer import make_requests, step_rng

    calls = gen = pre = requests = rounds = successes = from_prefix = 0
    solved: set[str] = set()
    events, t0 = [], time.time()
    # root-start rounds do not depend on one another: several go to the engine in one call (same samples, faster)
    per_call = 16 if branch_fraction == 0 else 1
    while len(solved) < max(KS) and gen < budget:
        reqs = []
        for _ in range(per_call):
            bps = store.select(round(PROMPTS * branch_fraction)) if branch_fraction > 0 else []
            reqs += make_requests(task, step_rng(seed, rounds), bps, prompts=PROMPTS, n=SAMPLES, step=rounds)
            rounds += 1
        rollouts = group.generate(reqs)
        errors = group.pop_errors()
        if branch_fraction > 0:
            store.release([(e.root_id, e.branch_ref) for e in errors if e.branch_ref >= 0])
            store.insert(rollouts)
        requests += len(reqs)
        for r in rollouts:
            calls += 1
            gen += len(r.token_ids)
            pre += len(r.prompt_ids) + len(r.prefix_ids)
            if r.reward > 0.5:
                solved.add(r.root_id)
                successes += 1
                from_prefix += bool(r.prefix_ids)
            events.append((calls, gen, pre, len(solved)))
        if rounds % 160 < per_call:
            log(f"[discovery]   {mode}: {rounds} rounds, {gen} tokens, {len(solved)} prompts solved")
    return {"k": {str(k): v for k, v in first_k(events).items()}, "calls": calls, "generated_tokens": gen,
            "prefill_tokens": pre, "requests": requests, "rounds": rounds, "solved": len(solved),
            "successes": successes, "successes_from_prefix": from_prefix, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="discovery at H in {4, 8, 10} (root-start, first-surprise, frontier; 100K-token budget) and "
                         "end to end at H in {4, 8} (bench.gap, root-start and first-surprise), one seed, on the "
                         "H=12 base model; one JSON line")
    ap.add_argument("--discovery-only", action="store_true", help="with --quick: no end-to-end runs")
    ap.add_argument("--horizons", type=int, nargs="*")
    ap.add_argument("--build-horizon", type=int, help="horizon of the one base model (default: the largest H)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--modes", nargs="*", help=f"modes to run (default: all of {', '.join(MODES)})")
    ap.add_argument("--branch-fractions", type=float, nargs="*", default=[],
                    help="also run every prefix mode given at these store.branch_fraction values, as modes "
                         "'<mode>,bf=<x>' (the share of requests per round that re-enter stored prefixes)")
    ap.add_argument("--budget", type=int, default=None, help="generated tokens per cell before it is censored")
    ap.add_argument("--name", help="results file stem under bench/results (default: discovery or discovery_quick)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="no runs: print the table of these result files")
    ap.add_argument("--end-to-end", metavar="JSON", help="with --report: a bench.gap results file on the same base "
                    "model; also print root-start's end-to-end cost over each prefix mode's, censored runs estimated")
    ap.add_argument("--engine", choices=("vllm", "torch"), default="vllm",
                    help="vllm: a rollout actor (Ray + vLLM, run it under the heavy lock); torch: TorchGenerator, the "
                         "same frozen policy sampled in this process")
    args = ap.parse_args(argv)
    if args.end_to_end and not args.report:
        ap.error("--end-to-end reads a bench.gap results file beside --report's discovery files; pass --report too")
    if args.report:
        for path in args.report:
            with open(path) as f:
                res = json.load(f)
            print(table(res) + "\n\n" + ratio_table(res))
            if args.end_to_end:
                with open(args.end_to_end) as f:
                    e2e = json.load(f)
                print(f"\nend to end, censored root-start runs at the stated model (K* = {K_TAKEOFF}):\n"
                      + end_to_end_table(res, e2e))
                k_fit, per_h = calibrated_k_star(res, e2e)
                if k_fit is not None:
                    fits = ", ".join(f"H={h}: {k:.1f}" for h, k in per_h.items())
                    print(f"\nthe same with K* fitted where root-start reached 0.5 ({fits}; used: {k_fit:.1f}):\n"
                          + end_to_end_table(res, e2e, k_fit))
        return 0
    horizons = args.horizons or ([4, 8, 10] if args.quick else [4, 6, 8, 10, 12, 14])
    build_h = args.build_horizon or (12 if args.quick else max(horizons))
    seeds = range(args.seeds or (1 if args.quick else 3))
    modes = args.modes or (list(QUICK_MODES) if args.quick else list(MODES))
    modes += [f"{m},bf={x:g}" for x in args.branch_fractions for m in list(modes) if m in MODES and m != "root_start"]
    unknown = []
    for m in modes:
        try:
            mode_overrides(m)
        except (KeyError, ValueError):
            unknown.append(m)
    if unknown or build_h < max(horizons):
        ap.error(f"unknown modes {unknown}; known: {', '.join(MODES)}" if unknown else
                 f"--build-horizon {build_h} must be >= the largest H {max(horizons)}")
    budget = args.budget or (100_000 if args.quick else 3_000_000)
    name = args.name or ("discovery_quick" if args.quick else "discovery")
    from bench.common import other_settings

    path = os.path.join("bench", "results", f"{name}.json")
    results = {"cells": []}
    if os.path.isfile(path):  # resume: the cells already measured are kept, not redone
        with open(path) as f:
            results = json.load(f)
        recorded = {"build_horizon": results.get("build_horizon", build_h),
                    "budget_tokens": results.get("budget_tokens", budget)}
        if other_settings(path, recorded, {"build_horizon": build_h, "budget_tokens": budget},
                          "pass the same --build-horizon and --budget to resume it, or another --name"):
            return 2
    done = {(c["H"], c["mode"], c["seed"]) for c in results["cells"]}
    plan = [(h, m, s) for h in horizons for m in modes for s in seeds if (h, m, s) not in done]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"[discovery] {len(plan)} cells to run ({len(done)} in {path}); at most {len(plan) * budget / TOKENS_PER_S / 60:.0f} "
        f"min at ~{TOKENS_PER_S} tokens/s (each cell stops at K={max(KS)} or {budget} tokens), plus ~2 min of start-up")

    from actors.group import RolloutGroup
    from actors.tasks import make_task
    from bench.common import stamp, write_result
    from bench.workers import BenchRolloutWorker, set_task
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars, connect
    from launch.config import load_config
    from launch.trainer import model_vocab_size
    from prefix_store.store import PrefixStore

    common = ["wandb.mode=disabled", f"model.build_horizon={build_h}", "task.heldout_size=512"]
    base = load_config("configs/default.yaml", common + [f"task.horizon={build_h}"])
    model_dir = ensure_base_model(base.model, base.task, log=log)
    with open(os.path.join(model_dir, "graftrl_base.json")) as f:
        results["base_model"] = {k: v for k, v in json.load(f).items() if k in ("horizon", "measured_q", "target_q",
                                                                                "teacher_forced_q", "heldout_root_success")}
    results.setdefault("p0", {})
    for h in horizons:
        if str(h) not in results["p0"]:
            cfg = load_config("configs/default.yaml", common + [f"task.horizon={h}"])
            results["p0"][str(h)] = exact_p0(model_dir, make_task(cfg.task))
            log(f"[discovery] H={h}: exact p0 = {results['p0'][str(h)]['p0']:.3g} (mean step q "
                f"{results['p0'][str(h)]['q_mean']:.3f})")
    results.update(KS=list(KS), prompts_per_round=PROMPTS, samples_per_request=SAMPLES, budget_tokens=budget,
                   build_horizon=build_h, model_dir=model_dir)
    results["engine"] = args.engine
    if plan:
        if args.engine == "torch":
            group = TorchGenerator(model_dir, make_task(base.task), top_k=base.rollout.top_k_logprobs, seed=0)
        else:
            connect(base.ray)
            group = RolloutGroup(model_dir=model_dir, rollout_cfg=base.rollout, task_cfg=base.task, seed=0,
                                 env_vars=actor_env_vars(base.rollout.kv_cache_gib), worker_cls=BenchRolloutWorker)
        try:
            for i, (h, mode, seed) in enumerate(plan):
                cfg = load_config("configs/default.yaml", common + [f"task.horizon={h}", f"train.seed={seed}", *mode_overrides(mode)])
                task = make_task(cfg.task)
                group.set_task(task) if args.engine == "torch" else set_task(group, cfg.task)
                store = PrefixStore(store_cfg=cfg.store, vocab_size=model_vocab_size(model_dir), seed=seed, remote=False)
                log(f"[discovery] cell {i + 1}/{len(plan)}: H={h} {mode} seed={seed}")
                cell = run_cell(group, task, store, mode=mode, seed=seed, budget=budget,
                                branch_fraction=cfg.store.branch_fraction, log=log)
                per_call = cell["generated_tokens"] / max(1, cell["calls"])
                p0 = results["p0"][str(h)]["p0"]
                for k in KS:
                    if cell["k"][str(k)] is None:  # right-censored at the budget
                        cell["k"][str(k)] = {"censored": True, "expected_root_start": analytic(k, p0, per_call)}
                cell["expected_root_start"] = {str(k): analytic(k, p0, per_call) for k in KS}
                results["cells"].append({"H": h, "mode": mode, "seed": seed, **cell})
                log(f"[discovery]   {json.dumps(cell['k'])} ({cell['seconds']} s)")
                write_result(name, {**results, "partial": f"{len(results['cells'])} cells"})
        finally:
            if args.engine == "vllm":
                import ray

                group.shutdown()
                ray.shutdown()
    results.pop("partial", None)
    results["summary"] = summary(results)
    results.update(stamp())
    write_result(name, results)
    plot(results, os.path.join("bench", "results", f"{name}.png"))
    if args.quick and not args.discovery_only:
        quick = quick_summary(results, run_end_to_end(build_h, f"{name}_end_to_end"))
        write_result(f"{name}_two_costs", {**quick, **stamp()})
        plot_two_costs(quick, os.path.join("bench", "results", f"{name}_two_costs.png"),
                       f"{results['date']} {results['commit']}: one seed, base model built at H={build_h}")
        print(json.dumps(quick))
    else:
        print(json.dumps(results["summary"]))
    return 0


def run_end_to_end(build_h: int, name: str) -> dict:
    """bench.gap's quick runs (H in {4, 8}, one seed, 200 updates, stop at held-out 0.5) for root-start and the
    first-surprise prefix mode, on the same base model; its own JSON line goes to stderr. -> its results file."""
    import contextlib

    from bench import gap

    with contextlib.redirect_stdout(sys.stderr):
        rc = gap.main(["--quick", "--horizons", "4", "8", "--build-horizon", str(build_h), "--name", name,
                       "--modes", "root_start", "prefix_first_surprise"])
    if rc != 0:
        raise RuntimeError(f"bench.gap --quick failed ({rc})")
    with open(os.path.join("bench", "results", f"{name}.json")) as f:
        return json.load(f)


def _tokens(cell: dict, k: int):
    v = cell["k"][str(k)]
    return None if v.get("censored") else v["generated_tokens"]


def cost_to_k(cell: dict, k: int):
    """Generated tokens to K solved prompts for one cell: measured, or for a censored cell the K/p0 expectation
    (None where p0 = 0)."""
    v = cell["k"][str(k)]
    return v["expected_root_start"]["generated_tokens"] if v.get("censored") else v["generated_tokens"]


def bootstrap_ratio(root: list[float], mode: list[float], *, n_boot: int = 4000, seed: int = 0) -> dict:
    """mean(root) / mean(mode) and a 95% percentile interval: the seeds of each side resampled with replacement,
    independently (the two modes' seeds share only the base model, not their samples)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r, m = np.asarray(root, dtype=float), np.asarray(mode, dtype=float)
    boot = (rng.choice(r, (n_boot, len(r))).mean(1) / rng.choice(m, (n_boot, len(m))).mean(1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ratio": float(r.mean() / m.mean()), "lo": float(lo), "hi": float(hi)}


def ratios(results: dict, k: int = 10) -> dict:
    """{H: {prefix mode: bootstrap_ratio of root-start's tokens to K over the mode's, with seed and censoring
    counts}}; root-start cells censored at the budget enter at their K/p0 expectation."""
    out: dict = {}
    by = {}
    for c in results["cells"]:
        by.setdefault((c["H"], c["mode"]), []).append(c)
    for (h, mode), cells in sorted(by.items()):
        root = by.get((h, "root_start"), [])
        rt = [cost_to_k(c, k) for c in root]
        mt = [cost_to_k(c, k) for c in cells]
        if mode == "root_start" or not root or None in rt or None in mt:
            continue
        out.setdefault(str(h), {})[mode] = {
            **bootstrap_ratio(rt, mt), "seeds": [len(rt), len(mt)],
            "root_censored": sum(bool(c["k"][str(k)].get("censored")) for c in root),
            "mode_censored": sum(bool(c["k"][str(k)].get("censored")) for c in cells)}
    return out


def ratio_table(results: dict, k: int = 10) -> str:
    """Markdown: per H, root-start's mean tokens to K (seed range; censored seeds counted) and, per prefix mode,
    its mean tokens and the ratio with its 95% bootstrap interval."""
    rat = ratios(results, k)
    modes = sorted({c["mode"] for c in results["cells"] if c["mode"] != "root_start"}, key=mode_order)
    lines = [f"| H | p0 (exact) | root-start tokens to K={k}: mean (range) | " +
             " | ".join(f"{m}: mean tokens, ratio [95% CI]" for m in modes) + " |",
             "|---|---|---|" + "---|" * len(modes)]
    for h in sorted({c["H"] for c in results["cells"]}):
        root = [c for c in results["cells"] if c["H"] == h and c["mode"] == "root_start"]
        rt = [cost_to_k(c, k) for c in root]
        cens = sum(bool(c["k"][str(k)].get("censored")) for c in root)
        row = (f"{_fmt(sum(rt) / len(rt))} ({_fmt(min(rt))}-{_fmt(max(rt))})" + (f", {cens}/{len(rt)} censored (K/p0)"
               if cens else "")) if rt and None not in rt else "-"
        parts = []
        for m in modes:
            mt = [cost_to_k(c, k) for c in results["cells"] if c["H"] == h and c["mode"] == m]
            r = rat.get(str(h), {}).get(m)
            parts.append("-" if not mt or r is None else
                         f"{_fmt(sum(mt) / len(mt))}, **{r['ratio']:.1f}x** [{r['lo']:.1f}, {r['hi']:.1f}]")
        lines.append(f"| {h} | {results['p0'][str(h)]['p0']:.2e} | {row} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def _fmt(x):
    return "-" if x is None else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e3 else str(round(x))


def summary(results: dict) -> dict:
    """{"H": {H: {mode: {discovery_tokens_k<K>: median over seeds or None (censored), ..._estimate}}}, "budget_tokens"}."""
    import statistics

    out: dict = {}
    for c in results["cells"]:
        out.setdefault(str(c["H"]), {}).setdefault(c["mode"], []).append(c)
    summ = {"H": {}, "budget_tokens": results["budget_tokens"]}
    for h, modes in out.items():
        summ["H"][h] = {}
        for mode, cells in modes.items():
            row = {}
            for k in KS:
                xs = [_tokens(c, k) for c in cells]
                row[f"discovery_tokens_k{k}"] = None if any(x is None for x in xs) else statistics.median(xs)
                if row[f"discovery_tokens_k{k}"] is None:
                    row[f"discovery_tokens_k{k}_estimate"] = statistics.median(
                        c["expected_root_start"][str(k)]["generated_tokens"] for c in cells)
            summ["H"][h][mode] = row
    summ["ratio_k10"] = ratios(results, 10)
    return summ


K_TAKEOFF = 100
"""The end-to-end model's K*: root-start's held-out success stays flat until it has seen about this many verified
successes (measured in the gap runs at H = 8-10), after which it learns as fast as a prefix mode."""


def end_to_end_estimate(p0: float, tokens_per_call: float, floor: float | None, k_star: int = K_TAKEOFF):
    """Root-start's generated tokens to held-out success 0.5 under the stated two-cost model:

        T_root(H) ~= K* / p0(H) * tokens_per_call(H)  +  L(H)

    discovery (K* successes at the frozen base policy's exact success rate p0) plus the learning floor L (the best
    prefix mode's measured tokens to 0.5 at the same H, where successes are plentiful). None without p0 or L."""
    if not p0 or floor is None:
        return None
    return k_star / p0 * tokens_per_call + floor


def root_cost_inputs(discovery: dict, h: int) -> tuple[float | None, float | None]:
    """(exact p0 of the base policy at H, root-start's generated tokens per call at H) from a discovery results
    file: the inputs of `end_to_end_estimate` (None where the file has no root-start cell or p0 at H)."""
    cells = [c for c in discovery["cells"] if c["H"] == h and c["mode"] == "root_start"]
    per_call = sum(c["generated_tokens"] for c in cells) / max(1, sum(c["calls"] for c in cells)) if cells else None
    return discovery.get("p0", {}).get(str(h), {}).get("p0"), per_call


def end_to_end_ratios(discovery: dict, end_to_end: dict, k_star: int = K_TAKEOFF) -> dict:
    """{H: {prefix mode: mean root-start tokens to held-out 0.5 over the mode's, with a 95% bootstrap interval over
    seeds}}. A root-start run that never reached 0.5 enters at the two-cost estimate (`end_to_end_estimate`, L =
    the best prefix mode's median at that H); a prefix mode with a seed that never reached it is left out (nothing
    here models its cost), as is an H without the estimate's inputs when root-start needs them."""
    import statistics

    runs = end_to_end.get("runs", [])
    out: dict = {}
    for h in sorted({r["H"] for r in runs}):
        by: dict = {}
        for r in runs:
            if r["H"] == h:
                by.setdefault(r["mode"], []).append(r["tokens_to_0.5"])
        prefix = {m: xs for m, xs in by.items() if m != "root_start" and None not in xs}
        root = by.get("root_start", [])
        if not prefix or not root:
            continue
        floor = min(statistics.median(xs) for xs in prefix.values())
        p0, per_call = root_cost_inputs(discovery, h)
        estimate = end_to_end_estimate(p0, per_call, floor, k_star) if per_call else None
        if None in root and estimate is None:
            continue
        root_costs = [estimate if x is None else x for x in root]
        for mode, xs in prefix.items():
            out.setdefault(str(h), {})[mode] = {**bootstrap_ratio(root_costs, xs), "seeds": [len(root), len(xs)],
                                                "root_censored": root.count(None),
                                                "root_estimate": None if None not in root else estimate}
    return out


def end_to_end_table(discovery: dict, end_to_end: dict, k_star: int = K_TAKEOFF) -> str:
    """Markdown of `end_to_end_ratios`: per H and prefix mode, the seeds, root-start's censored seeds and the
    estimate they entered at, and the ratio with its 95% bootstrap interval."""
    lines = ["| H | prefix mode | seeds (root, mode) | root-start censored (entered at) | tokens-to-0.5 ratio [95% CI] |",
             "|---|---|---|---|---|"]
    for h, modes in end_to_end_ratios(discovery, end_to_end, k_star).items():
        for mode, r in modes.items():
            cens = f"{r['root_censored']} ({_fmt(r['root_estimate'])})" if r["root_censored"] else "0"
            lines.append(f"| {h} | {mode} | {r['seeds'][0]}, {r['seeds'][1]} | {cens} | "
                         f"**{r['ratio']:.1f}x** [{r['lo']:.1f}, {r['hi']:.1f}] |")
    return "\n".join(lines)


def calibrated_k_star(discovery: dict, end_to_end: dict) -> tuple[float | None, dict]:
    """K* fitted where root-start reached held-out 0.5 in every seed: solving the two-cost model for it,

        K*(H) = (T_root(H) - L(H)) * p0(H) / tokens_per_call(H)

    with T_root root-start's median tokens to 0.5 and L the best prefix mode's median. -> (K* at the largest such H,
    where discovery weighs most against the floor, or None; {H: K*(H)} for every such H)."""
    import statistics

    runs, fitted = end_to_end.get("runs", []), {}
    for h in sorted({r["H"] for r in runs}):
        by: dict = {}
        for r in runs:
            if r["H"] == h:
                by.setdefault(r["mode"], []).append(r["tokens_to_0.5"])
        root = by.get("root_start", [])
        floors = [statistics.median(xs) for m, xs in by.items() if m != "root_start" and None not in xs]
        p0, per_call = root_cost_inputs(discovery, h)
        if root and None not in root and floors and p0 and per_call:
            fitted[h] = max(1.0, (statistics.median(root) - min(floors)) * p0 / per_call)
    return (fitted[max(fitted)] if fitted else None), fitted


def quick_summary(discovery: dict, end_to_end: dict, k_star: int = K_TAKEOFF) -> dict:
    """The one JSON line of `--quick`: per H and mode, the discovery cost (generated tokens to K=10 solved prompts,
    policy frozen; a censored cell also gives its K/p0 expectation) and the end-to-end cost (generated tokens until
    held-out success 0.5, null when the run's budget ran out first, and for root-start the two-cost model's
    estimate `end_to_end_estimate`, so a measured run checks it). Medians over seeds."""
    import statistics

    def med(xs):
        return None if not xs or any(x is None for x in xs) else statistics.median(xs)

    disc = summary(discovery)["H"]
    runs = end_to_end.get("runs", [])
    out: dict = {}
    for h in sorted({c["H"] for c in discovery["cells"]} | {r["H"] for r in runs}):
        rows = out.setdefault(str(h), {})
        for mode, d in disc.get(str(h), {}).items():
            rows[mode] = {"discovery_tokens_k10": d["discovery_tokens_k10"],
                          **({"discovery_tokens_k10_estimate": d["discovery_tokens_k10_estimate"]}
                             if "discovery_tokens_k10_estimate" in d else {})}
        e2e = {}
        for r in runs:
            if r["H"] == h:
                e2e.setdefault(r["mode"], []).append(r["tokens_to_0.5"])
        floors = [med(v) for m, v in e2e.items() if m != "root_start" and med(v) is not None]
        floor = min(floors) if floors else None
        p0, per_call = root_cost_inputs(discovery, h)
        for mode, xs in e2e.items():
            row = rows.setdefault(mode, {"discovery_tokens_k10": None})
            row["tokens_to_0.5"] = med(xs)
            row["tokens_to_0.5_estimate"] = (end_to_end_estimate(p0, per_call, floor, k_star) if mode == "root_start"
                                             and per_call else row["tokens_to_0.5"])
    return {"H": out, "budget_tokens": discovery["budget_tokens"],
            "end_to_end_budget_tokens": max((r["generated_tokens"] for r in runs), default=None),
            "end_to_end_model": f"root-start: K*/p0 * tokens per call + the best prefix mode's tokens to 0.5, K*={k_star}",
            "end_to_end_ratio": end_to_end_ratios(discovery, end_to_end, k_star)}


def table(results: dict) -> str:
    """Markdown: one row per (H, mode), generated tokens / calls / prefill tokens to K, and the ratio to root-start."""
    fmt = _fmt
    lines = ["| H | p0 (exact) | mode | " + " | ".join(f"K={k}: tokens (calls, prefill)" for k in KS) +
             " | root-start / mode tokens at K=10 |", "|---|---|---|" + "---|" * len(KS) + "---|"]
    cells = sorted(results["cells"], key=lambda c: (c["H"], mode_order(c["mode"]), c["seed"]))
    root = {(c["H"], c["seed"]): c for c in cells if c["mode"] == "root_start"}
    for c in cells:
        parts = []
        for k in KS:
            v = c["k"][str(k)]
            if v.get("censored"):
                e = v["expected_root_start"]
                parts.append(f"> {fmt(c['generated_tokens'])} (censored; K/p0: {fmt(e['generated_tokens'])})")
            else:
                parts.append(f"{fmt(v['generated_tokens'])} ({fmt(v['calls'])}, {fmt(v['prefill_tokens'])})")
        r = root.get((c["H"], c["seed"]))
        ratio = "-"
        if r is not None and c["mode"] != "root_start" and not c["k"]["10"].get("censored"):
            rv = r["k"]["10"]
            rt = rv["expected_root_start"]["generated_tokens"] if rv.get("censored") else rv["generated_tokens"]
            if rt is not None:
                ratio = f"{rt / c['k']['10']['generated_tokens']:.1f}x" + (" (root censored: K/p0)" if rv.get("censored") else "")
        lines.append(f"| {c['H']} | {results['p0'][str(c['H'])]['p0']:.2e} | {c['mode']} | " + " | ".join(parts) + f" | {ratio} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Generated tokens to K=10 solved prompts against H, log scale, one line per mode (mean over seeds) with a band
    from the lowest to the highest seed; censored cells drawn as open markers at their K/p0 expectation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    modes = sorted({c["mode"] for c in results["cells"]}, key=mode_order)
    for j, mode in enumerate(modes):
        cells = [c for c in results["cells"] if c["mode"] == mode and cost_to_k(c, 10) is not None]
        hs = sorted({c["H"] for c in cells})
        per_h = [[cost_to_k(c, 10) for c in cells if c["H"] == h] for h in hs]
        ax.plot(hs, [sum(v) / len(v) for v in per_h], marker="o", color=f"C{j}", label=mode)
        ax.fill_between(hs, [min(v) for v in per_h], [max(v) for v in per_h], color=f"C{j}", alpha=0.15, lw=0)
        cens = [(c["H"], cost_to_k(c, 10)) for c in cells if c["k"]["10"].get("censored")]
        if cens:
            ax.scatter(*zip(*cens), marker="o", s=40, facecolors="white", edgecolors=f"C{j}", zorder=3,
                       label=f"{mode}: censored, K/p0")
    seeds = len({c["seed"] for c in results["cells"]})
    ax.set_yscale("log")
    ax.set_xlabel("horizon H")
    ax.set_ylabel("generated tokens until 10 prompts solved\n(policy frozen)", fontsize=8)
    ax.set_title(f"{results.get('date', '')} {results.get('commit', '')}: mean of {seeds} seeds, band = seed range",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_two_costs(quick: dict, path: str, title: str = "") -> None:
    """The two quantities of `quick_summary` against H, log scale, one line per mode: left the discovery cost
    (tokens to K=10 solved prompts, policy frozen), right the end-to-end cost (tokens to held-out 0.5). Filled
    markers are measured; open markers are estimates where the budget ran out (K/p0 left, the two-cost model right);
    an x at the budget marks a run that reached neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    panels = (("discovery_tokens_k10", "discovery_tokens_k10_estimate", "tokens until 10 prompts solved (frozen)",
               quick.get("budget_tokens")),
              ("tokens_to_0.5", "tokens_to_0.5_estimate", "tokens until held-out success 0.5 (training)",
               quick.get("end_to_end_budget_tokens")))
    hs = sorted(quick["H"], key=int)
    modes = [m for m in MODES if any(m in quick["H"][h] for h in hs)]
    for ax, (key, est, label, budget) in zip(axes, panels):
        for j, mode in enumerate(modes):
            pts = [(int(h), quick["H"][h][mode]) for h in hs if mode in quick["H"][h]]
            missed = [h for h, r in pts if key in r and r[key] is None and r.get(est) is None]
            if missed and budget:  # neither measured nor estimated: at least the budget
                ax.scatter(missed, [budget] * len(missed), marker="x", color=f"C{j}", zorder=3)
            xs = [(h, r.get(key) if r.get(key) is not None else r.get(est), r.get(key) is None) for h, r in pts]
            xs = [x for x in xs if x[1] is not None]
            if not xs:
                continue
            ax.plot([x[0] for x in xs], [x[1] for x in xs], color=f"C{j}", marker="o", label=mode)
            open_pts = [x for x in xs if x[2]]
            if open_pts:
                ax.scatter([x[0] for x in open_pts], [x[1] for x in open_pts], s=50, facecolors="white",
                           edgecolors=f"C{j}", zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("horizon H")
        ax.set_title(label + "\nopen: estimated (budget ran out); x: not reached, at the budget", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("generated tokens")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
