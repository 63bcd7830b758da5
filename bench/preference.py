"""Label efficiency of learning from preferences on the chain task: online uncertainty-chosen queries vs random
queries vs offline RLHF, and the affirmative nudge ablated.

    .venv/bin/python -m bench.preference --quick        # one seed, 60 updates per arm (< 15 min on 2 cores)
    .venv/bin/python -m bench.preference --seeds 3      # three seeds, 100 updates per arm
    .venv/bin/python -m bench.preference --rm-only 1024  # the reward model alone: uncertainty vs random queries

Every arm trains the full system (vLLM rollout actor, DeepSpeed learner, reward-model actor, simulated rater:
Bradley-Terry on the number of correct steps) from configs/preference_chain.yaml; only these differ:
  uncertainty_online   every step asks about the pair of each prompt's responses whose preference probability
                       varies most across the reward model's ensemble; the RM trains online
  random_online        the same with a random pair per prompt
  offline              all labels first, from base-policy responses (random pairs), RM trained once, then frozen
  no_nudge             uncertainty_online with learner.nudge=0 (the ablation of the affirmative nudge)
The policy never sees the gold score. Win rate against the base policy, judged by the gold score: for each of
the `task.heldout_size` held-out prompts, `--win-samples` responses of the trained policy are paired with as many
responses of the base policy (drawn once, before any arm); a win counts 1, a tie 1/2. Measured every
`--eval-every` updates against the labels used so far. `target_win_rate` is the offline arm's final win rate;
`labels_to_target` of an arm is the labels used at its first evaluation at or above it (null: never).
One JSON line on stdout; the full curves in bench/results/preference[_quick].json and a plot beside it.
One engine serves every arm: between arms it gets the base weights back.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = {
    "uncertainty_online": ["preference.mode=online", "preference.query_selection=uncertainty"],
    "random_online": ["preference.mode=online", "preference.query_selection=random"],
    "offline": ["preference.mode=offline", "preference.query_selection=random"],
    "no_nudge": ["preference.mode=online", "preference.query_selection=uncertainty", "learner.nudge=0.0"],
}


def base_scores(rollout, task, gold, samples: int) -> list[list[float]]:
    """Gold scores of `samples` responses per held-out prompt of the policy the engine holds now."""
    from protocol.messages import RolloutRequest

    prompts = task.heldout_prompts()
    reqs = [RolloutRequest(request_id=i, root_id=task.root_id(d), prompt_ids=task.prompt_ids(d), n=samples)
            for i, d in enumerate(prompts)]
    out: list[list[float]] = [[] for _ in prompts]
    for r in rollout.generate(reqs):
        out[r.request_id].append(gold(r.prompt_ids, r.prefix_ids + r.token_ids))
    return out


def win_rate(policy: list[list[float]], base: list[list[float]]) -> float:
    """Share of (policy, base) response pairs, matched by prompt and sample index, whose gold score the policy's
    response beats; a tie counts 1/2."""
    wins = [1.0 if p > b else 0.5 if p == b else 0.0 for ps, bs in zip(policy, base) for p, b in zip(ps, bs)]
    return sum(wins) / len(wins)


def labels_to(curve: list[dict], target: float):
    return next((c["labels"] for c in curve if c["win_rate"] >= target), None)


def run_arm(rollout, model_dir: str, base_ref, cfg, run_dir: str, base: list, win_samples: int, eval_every: int,
            log) -> dict:
    import ray

    from actors.raters import gold_score
    from actors.tasks import make_task
    from launch.cluster import actor_env_vars
    from launch.trainer import Components, Trainer, model_vocab_size
    from learner.group import LearnerGroup
    from learner.rm_worker import RewardModelClient
    from prefix_store.store import PrefixStore

    t0, tc = time.time(), cfg.train
    rollout.update_weights(base_ref, 0)
    env = actor_env_vars(cfg.rollout.kv_cache_gib)
    learner = LearnerGroup(model_dir=model_dir, learner_cfg=cfg.learner, seed=tc.seed,
                           micro_batch_size=tc.prompts_per_step * tc.samples_per_request, env_vars=env)
    store = PrefixStore(store_cfg=cfg.store, vocab_size=model_vocab_size(model_dir), seed=tc.seed)
    rm = RewardModelClient(model_dir=model_dir, pref_cfg=cfg.preference, seed=tc.seed, env_vars=env)
    task = make_task(cfg.task)
    gold = gold_score(task)
    comp = Components(task=task, rollout=rollout, store=store, learner=learner, model_dir=model_dir, reward_model=rm)
    trainer = Trainer(comp, cfg, run_dir, log)
    curve, history = [], []
    try:
        for step in range(tc.steps + 1):
            if step % eval_every == 0 or step == tc.steps:
                w = win_rate(base_scores(rollout, task, gold, win_samples), base)
                curve.append({"step": step, "labels": trainer.preferences.rater.labels.used, "win_rate": round(w, 4)})
                log(f"[preference]   step {step} labels {curve[-1]['labels']} win_rate {w:.3f}")
            if step == tc.steps:
                break
            m = trainer.train_step()
            history.append({k: v for k, v in m.items() if k.startswith(("rm/", "learner/kl", "learner/loss",
                                                                          "rollout/reward_mean", "timing/"))})
    finally:
        learner.shutdown()
        rm.shutdown()
        for shard in store.shards:
            ray.kill(shard)
        trainer.prefetcher.close()
        trainer.store_thread.shutdown(wait=True)
    return {"curve": curve, "final_win_rate": curve[-1]["win_rate"], "labels_used": curve[-1]["labels"],
            "wall_seconds": round(time.time() - t0, 1), "history": history}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"uncertainty_online": "C0", "random_online": "C1", "offline": "C2", "no_nudge": "C3"}
    for r in results["runs"]:
        xs = [c["labels"] for c in r["curve"]]
        ys = [c["win_rate"] for c in r["curve"]]
        if r["arm"] == "offline":  # all labels at once: its curve is flat in labels; drawn against updates' order
            ax.plot([xs[-1]] * len(ys), ys, "o", color=colors[r["arm"]], alpha=0.5,
                    label=f"offline (s{r['seed']}, all labels first)")
        else:
            ax.plot(xs, ys, "-o", ms=3, color=colors.get(r["arm"]), alpha=0.8, label=f"{r['arm']} (s{r['seed']})")
    if results.get("target_win_rate") is not None:
        ax.axhline(results["target_win_rate"], color="grey", ls="--", lw=1, label="offline final (target)")
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_xlabel("labels (rater choices)")
    ax.set_ylabel("win rate vs base policy (gold score, ties 1/2)")
    ax.set_title("chain H=4: win rate against labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rm_only(cfg, labels: int, seeds: int, log) -> dict:
    """The reward model's side alone, in this process (plain torch, no Ray): base-policy responses (8 per prompt,
    sampled with transformers from the tiny base model), the simulated rater, one query per prompt chosen by
    `uncertainty` or `random`, `updates_per_step` RM updates per 16 labels. Held-out accuracy = the point head's
    order against the gold order on 1,000 held-out pairs of base responses with different gold scores."""
    import random

    import torch
    from transformers import LlamaForCausalLM

    from actors.raters import SimulatedRater, gold_score
    from actors.tasks import make_task
    from launch.base_model import ensure_base_model
    from learner.query_selection import select_pair
    from learner.reward_model import RewardModel, pad_sequences, pair_losses

    p = cfg.preference
    model_dir = ensure_base_model(cfg.model, cfg.task, log=log)
    task, n = make_task(cfg.task), 8
    gold = gold_score(task)
    policy = LlamaForCausalLM.from_pretrained(model_dir).eval()

    def sample(prompts):
        ids = torch.tensor([task.prompt_ids(d) for d in prompts]).repeat_interleave(n, 0)
        with torch.no_grad():
            out = policy.generate(ids, do_sample=True, top_k=0, max_new_tokens=task.max_new_tokens, pad_token_id=0)
        rows = [(ids[i].tolist(), out[i, ids.size(1):].tolist()) for i in range(ids.size(0))]
        return [rows[i:i + n] for i in range(0, len(rows), n)]  # one group of n per prompt

    torch.manual_seed(0)
    rng = random.Random(0)
    train_groups = sample(task.train_prompts(rng, labels))
    held = [g for grp in sample(task.heldout_prompts()[:125]) for g in zip(grp[0::2], grp[1::2])]
    held = [(a, b) for a, b in held if gold(*a) != gold(*b)][:1000]
    ha, hma = pad_sequences([a[0] + a[1] for a, _ in held], 0)
    hb, hmb = pad_sequences([b[0] + b[1] for _, b in held], 0)
    truth = torch.tensor([gold(*a) > gold(*b) for a, b in held])
    out = {"held_out_pairs": len(held), "runs": []}
    for seed in range(seeds):
        for selector in ("uncertainty", "random"):
            torch.manual_seed(seed)
            rm = RewardModel(LlamaForCausalLM.from_pretrained(model_dir).model, policy.config.hidden_size,
                             ensemble_size=p.ensemble_size, head_hidden=p.head_hidden, prior_scale=p.prior_scale,
                             seed=seed)
            opt = torch.optim.AdamW(rm.trainable_parameters(), lr=p.lr)
            rater, qrng, brng = SimulatedRater(gold, temperature=p.rater_temperature, seed=seed), random.Random(seed), random.Random(seed)
            pairs, curve = [], []
            for k, grp in enumerate(train_groups):
                with torch.no_grad():
                    _, particles = rm(*pad_sequences([q + y for q, y in grp], 0))
                pair = select_pair(selector, particles, qrng, [tuple(y) for _, y in grp])
                if pair is not None:
                    (q, ya), (_, yb) = grp[pair[0]], grp[pair[1]]
                    pairs.append((q + ya, q + yb, rater.ask(q, ya, yb)))
                if (k + 1) % 16 == 0 and pairs:
                    rm.train()
                    for _ in range(p.updates_per_step):
                        b = [pairs[brng.randrange(len(pairs))] for _ in range(min(p.batch_size, len(pairs)))]
                        loss, _ = pair_losses(rm, *pad_sequences([x[0] for x in b], 0), *pad_sequences([x[1] for x in b], 0),
                                              torch.tensor([x[2] for x in b]))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                if (k + 1) % 128 == 0:
                    with torch.no_grad():
                        ra, _ = rm(ha, hma)
                        rb, _ = rm(hb, hmb)
                    curve.append({"labels": rater.labels.used, "heldout_accuracy": round(float(((ra > rb) == truth).float().mean()), 4)})
                    log(f"[preference --rm-only] {selector} s{seed} labels {rater.labels.used} acc {curve[-1]['heldout_accuracy']}")
            out["runs"].append({"selector": selector, "seed": seed, "curve": curve})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 60 updates per arm, evaluation every 10")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="policy updates per arm")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--win-samples", type=int, default=8, help="responses per held-out prompt in the win rate")
    ap.add_argument("--offline-labels", type=int, default=None, help="the offline arm's labels (all drawn first)")
    ap.add_argument("--arms", nargs="*", choices=list(ARMS), help="run only these arms (offline gives the target)")
    ap.add_argument("--config", default="configs/preference_chain.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every arm")
    ap.add_argument("--out", default="runs/bench_preference")
    ap.add_argument("--name", help="results file stem under bench/results (default: preference or preference_quick)")
    ap.add_argument("--rm-only", type=int, metavar="LABELS", help="only the reward model's side (no Ray, no policy "
                    "training): uncertainty vs random queries on base-policy responses, held-out accuracy per 128 labels")
    args = ap.parse_args(argv)
    seeds = args.seeds or 1 if args.quick else args.seeds or 3
    steps = args.steps or (60 if args.quick else 100)
    offline_labels = args.offline_labels or (2000 if args.quick else 4000)
    arms = args.arms or list(ARMS)

    import ray

    from actors.group import RolloutGroup
    from actors.raters import gold_score
    from actors.tasks import make_task
    from bench.common import stamp, write_result
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars, connect
    from launch.config import ConfigError, load_config

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    common = ["wandb.mode=disabled", f"train.steps={steps}", "train.eval_every=0", "store.snapshot_every=0",
              "train.log_every=0", *args.set]
    try:
        base_cfg = load_config(args.config, common)
    except ConfigError as e:
        print(f"bench.preference: {e}", file=sys.stderr)
        return 2
    t_start = time.time()
    if args.rm_only:
        res = rm_only(base_cfg, args.rm_only, args.seeds or 1, log)
        final = {sel: [r["curve"][-1]["heldout_accuracy"] for r in res["runs"] if r["selector"] == sel]
                 for sel in ("uncertainty", "random")}
        res.update(summary={"labels": args.rm_only, "final_heldout_accuracy": final}, seconds=round(time.time() - t_start, 1))
        res.update(stamp())
        write_result(args.name or "preference_rm", res)
        print(json.dumps(res["summary"]))
        return 0
    model_dir = ensure_base_model(base_cfg.model, base_cfg.task, log=log)
    connect(base_cfg.ray)
    rollout = RolloutGroup(model_dir=model_dir, rollout_cfg=base_cfg.rollout, task_cfg=base_cfg.task, seed=0,
                           env_vars=actor_env_vars(base_cfg.rollout.kv_cache_gib))
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        base_ref = ray.put(f.read())
    task = make_task(base_cfg.task)
    base = base_scores(rollout, task, gold_score(task), args.win_samples)  # the base policy's responses, drawn once
    name = args.name or ("preference_quick" if args.quick else "preference")
    results: dict = {"runs": [], "started": stamp(), "comparisons_per_eval": sum(map(len, base))}
    plan = [(arm, seed) for seed in range(seeds) for arm in (["offline"] if "offline" in arms else []) +
            [a for a in arms if a != "offline"]]
    for i, (arm, seed) in enumerate(plan):
        over = ARMS[arm] + [f"train.seed={seed}"] + ([f"preference.max_labels={offline_labels}"] if arm == "offline" else [])
        cfg = load_config(args.config, common + over)
        run_dir = os.path.join(args.out, f"{arm}_s{seed}")
        os.makedirs(run_dir, exist_ok=True)
        log(f"[preference] run {i + 1}/{len(plan)}: {arm} seed={seed}")
        r = run_arm(rollout, model_dir, base_ref, cfg, run_dir, base, args.win_samples, args.eval_every, log)
        results["runs"].append({"arm": arm, "seed": seed, **r})
        log(f"[preference]   final win rate {r['final_win_rate']:.3f} with {r['labels_used']} labels ({r['wall_seconds']} s)")
        write_result(name, {**results, "partial": f"{i + 1}/{len(plan)} runs"})
    rollout.shutdown()
    ray.shutdown()

    def median(xs):
        xs = sorted(x for x in xs if x is not None)
        return None if not xs else xs[len(xs) // 2]

    offline = [r for r in results["runs"] if r["arm"] == "offline"]
    target = median([r["final_win_rate"] for r in offline]) if offline else None
    summary = {"target_win_rate": target, "labels_to_target": {}, "final_win_rate": {}, "labels_used": {},
               "seeds": seeds, "steps": steps, "offline_labels": offline_labels,
               "comparisons_per_eval": results["comparisons_per_eval"]}
    for arm in arms:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        per_seed = [labels_to(r["curve"], target) if target is not None else None for r in runs]
        reached = [x for x in per_seed if x is not None]
        summary["labels_to_target"][arm] = median(per_seed) if len(reached) * 2 > len(per_seed) else None
        summary["final_win_rate"][arm] = median([r["final_win_rate"] for r in runs])
        summary["labels_used"][arm] = median([r["labels_used"] for r in runs])
    results.update(summary=summary, target_win_rate=target, seconds=round(time.time() - t_start, 1), quick=args.quick)
    results.update(stamp())
    write_result(name, results)
    plot(results, os.path.join("bench", "results", f"{name}.png"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
