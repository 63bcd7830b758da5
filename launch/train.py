"""graftrl training driver: KL-regularised RL with prefix access.

    python -m launch.train --config configs/default.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launch.train --config configs/default.yaml

One step (synchronous): draw prompts -> ask the prefix store for branch points
-> generate from prompts and stored prefixes -> insert into the store ->
KL-regularised update -> push weights to every rollout actor.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from launch.base_model import check_task
from launch.config import Config, ConfigError, load_config, save_config
from launch.report import print_summary, write_plots, write_summary


@dataclass
class Counters:
    rollouts: int = 0
    rollouts_from_prefix: int = 0
    stale_dropped: int = 0
    request_errors: int = 0
    generated_tokens: int = 0
    eval_tokens: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(generated training tokens, held-out success) at each evaluation."""


@dataclass
class Components:
    task: object
    rollout: object
    store: object
    learner: object
    model_dir: str


def make_requests(task, rng: random.Random, branch_points, *, prompts: int, n: int, step: int):
    """Root-start requests for fresh prompts plus one request per branch point (prefix re-entry)."""
    from protocol.messages import RolloutRequest

    reqs = [RolloutRequest(request_id=step * 100_000 + i, root_id=bp.root_id, prompt_ids=bp.prompt_ids,
                           prefix_ids=bp.prefix_ids + ([bp.forced_token] if bp.forced_token >= 0 else []),
                           forced=bp.forced_token >= 0, n=n, branch_ref=bp.ref)
            for i, bp in enumerate(branch_points)]
    for digits in task.train_prompts(rng, prompts - len(reqs)):
        reqs.append(RolloutRequest(request_id=step * 100_000 + len(reqs), root_id=task.root_id(digits),
                                   prompt_ids=task.prompt_ids(digits), n=n))
    return reqs


def evaluate(rollout_group, task, samples: int) -> tuple[float, int]:
    """Held-out root-start success: mean outcome reward of `samples` policy samples per held-out prompt."""
    from protocol.messages import RolloutRequest

    reqs = [RolloutRequest(request_id=i, root_id=task.root_id(d), prompt_ids=task.prompt_ids(d), n=samples)
            for i, d in enumerate(task.heldout_prompts())]
    outs = rollout_group.generate(reqs)
    return sum(r.reward for r in outs) / len(outs), sum(len(r.token_ids) for r in outs)


def weight_sync_check(rollout_group, learner_group, task) -> dict:
    """Score one fixed sequence with the rollout engine and with the learner; after a push they must agree."""
    digits = task.heldout_prompts()[0]
    token_ids = task.prompt_ids(digits) + task.answer_ids(digits)
    engine = rollout_group.sequence_logprobs(token_ids)
    learner = learner_group.sequence_logprobs(token_ids)
    return {"token_ids": token_ids, "engine": engine, "learner": learner,
            "max_abs_diff": max(abs(a - b) for a, b in zip(engine, learner))}


def model_vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def start_components(cfg: Config, log) -> Components:
    """Base model, Ray, rollout actors, prefix-store shards, learner."""
    from actors.group import RolloutGroup
    from actors.tasks import make_task
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars, connect
    from learner.group import LearnerGroup
    from prefix_store.store import PrefixStore

    tc = cfg.train
    model_dir = ensure_base_model(cfg.model, cfg.task, log=log)
    where = connect(cfg.ray)
    env = actor_env_vars(cfg.rollout.kv_cache_gib)
    task = make_task(cfg.task, tokenizer_dir=model_dir)
    log(f"[graftrl] ray: {where}; starting rollout actors, prefix store, learner (model {model_dir})")
    rollout = RolloutGroup(model_dir=model_dir, rollout_cfg=cfg.rollout, task_cfg=cfg.task, seed=tc.seed, env_vars=env)
    store = PrefixStore(store_cfg=cfg.store, vocab_size=model_vocab_size(model_dir), seed=tc.seed)
    learner = LearnerGroup(model_dir=model_dir, learner_cfg=cfg.learner, seed=tc.seed,
                           micro_batch_size=tc.prompts_per_step * tc.samples_per_request, env_vars=env)
    return Components(task=task, rollout=rollout, store=store, learner=learner, model_dir=model_dir)


def generate(comp: Components, cfg: Config, rng: random.Random, step: int):
    """Pick branch points, sample from them and from fresh prompts. Runs in a worker thread."""
    t0 = time.time()
    tc = cfg.train
    branch_points = comp.store.select(round(tc.prompts_per_step * cfg.store.branch_fraction))
    reqs = make_requests(comp.task, rng, branch_points, prompts=tc.prompts_per_step, n=tc.samples_per_request, step=step)
    rollouts = comp.rollout.generate(reqs)
    errors = comp.rollout.pop_errors()  # bad requests fail alone; their branch points are released
    comp.store.release([(e.root_id, e.branch_ref) for e in errors if e.branch_ref >= 0])
    return rollouts, branch_points, errors, time.time() - t0


def learn(comp: Components, cfg: Config, rollouts, c: Counters) -> tuple[dict, float]:
    """Store the rollouts, make one KL-regularised update on the fresh ones, push the weights."""
    from learner.batch import build_train_batch

    comp.store.insert(rollouts)
    version = comp.learner.version()
    fresh = [r for r in rollouts if version - r.policy_version <= cfg.train.max_policy_lag]
    c.stale_dropped += len(rollouts) - len(fresh)
    values = comp.store.soft_values(fresh) if cfg.learner.advantage == "soft_value" else None
    metrics = comp.learner.train_step(build_train_batch(fresh, advantage=cfg.learner.advantage, nudge=cfg.learner.nudge,
                                                        values=values))
    t0 = time.time()
    comp.rollout.update_weights(comp.learner.async_weights(zero_copy=True), int(metrics.get("learner/version", version + 1)))
    metrics["rollout/policy_lag_mean"] = _mean([version - r.policy_version for r in rollouts])
    return metrics, time.time() - t0


def prefix_cache_hit_rate(rollouts) -> float:
    """Share of prompt+prefix tokens the engines found in their prefix cache (per request, not per sample)."""
    first = {r.request_id: r for r in rollouts}.values()
    total = sum(len(r.prompt_ids) + len(r.prefix_ids) for r in first)
    return sum(r.cached_tokens for r in first) / total if total else 0.0


def step_metrics(rollouts, branch_points, store_stats: dict, c: Counters) -> dict:
    from_prefix = [r for r in rollouts if r.prefix_ids]
    c.rollouts += len(rollouts)
    c.rollouts_from_prefix += len(from_prefix)
    c.generated_tokens += sum(len(r.token_ids) for r in rollouts)
    return {
        "rollout/reward_mean": _mean([r.reward for r in rollouts]),
        "rollout/root_reward_mean": _mean([r.reward for r in rollouts if not r.prefix_ids]),
        "rollout/prefix_reward_mean": _mean([r.reward for r in from_prefix]),
        "rollout/stale_dropped": c.stale_dropped,
        "rollout/request_errors": c.request_errors,
        "tree/prefix_cache_hit_rate": prefix_cache_hit_rate(rollouts),
        "tree/branch_points": len(branch_points),
        "tree/prefix_share": len(from_prefix) / len(rollouts),
        "tree/branch_depth_mean": _mean([len(bp.prefix_ids) for bp in branch_points]),
        "tree/branch_score_mean": _mean([bp.score for bp in branch_points]),
        "tree/branch_uncertainty_mean": _mean([bp.entropy for bp in branch_points]),
        **{f"tree/{k}": v for k, v in store_stats.items()},
        "tree/branch_factor": store_stats["edges"] / max(1, store_stats["branching_nodes"]),  # children per inner node
        "perf/generated_tokens": c.generated_tokens,
    }


STOP = threading.Event()
"""Set by the first Ctrl-C: the loop checkpoints after the current step and stops cleanly."""


def write_history(run_dir: str, history: list[dict]) -> None:
    tmp = os.path.join(run_dir, "history.json.tmp")  # atomic: a kill mid-write leaves the previous file
    with open(tmp, "w") as f:
        json.dump(history, f)
    os.replace(tmp, os.path.join(run_dir, "history.json"))


def write_pids(run_dir: str, comp: Components) -> None:
    """runs/<id>/pids.json: the process ids of the driver, the learner ranks, the rollout actors and the store's
    shards at the start of the run (fault tests, ops)."""
    pids = {"driver": os.getpid(), "learner": list(comp.learner.pids), "rollout": comp.rollout.pids(),
            "store": comp.store.pids()}
    with open(os.path.join(run_dir, "pids.json"), "w") as f:
        json.dump(pids, f)


def save_checkpoint(comp: Components, cfg: Config, run_dir: str, c: Counters, rng: random.Random, step: int,
                    wandb_id: str) -> str:
    """Learner state (DeepSpeed + RNG + Hugging Face folder), the store's shards and the driver's position, together.

    `checkpoints/latest` moves to the new checkpoint only once all of it is written: a process killed
    mid-checkpoint leaves the run resumable from the previous one."""
    from learner.learner import commit_checkpoint

    version, internal, gauss = rng.getstate()
    extra = {"step": step, "rng": [version, list(internal), gauss], "wandb_id": wandb_id,
             "counters": {k: v for k, v in dataclasses.asdict(c).items() if k != "history"}}
    ckpt_root = os.path.join(run_dir, "checkpoints")
    path = comp.learner.save_checkpoint(ckpt_root, extra=extra, commit=False)  # committed below, with the store
    comp.store.snapshot(os.path.join(path, "store"))
    write_history(run_dir, c.history)
    commit_checkpoint(ckpt_root, os.path.basename(path), keep=cfg.train.keep_checkpoints)
    return path


def restore_checkpoint(comp: Components, run_dir: str, rng: random.Random) -> tuple[Counters, int, str]:
    """Inverse of save_checkpoint for the latest checkpoint; the engines get the restored weights."""
    from learner.learner import latest_tag

    ckpt_root = os.path.join(run_dir, "checkpoints")
    extra = comp.learner.load_checkpoint(ckpt_root)
    comp.store.restore(os.path.join(ckpt_root, latest_tag(ckpt_root), "store"))
    version, internal, gauss = extra["rng"]
    rng.setstate((version, tuple(internal), gauss))
    c = Counters(**{k: v for k, v in extra["counters"].items()})
    c.evals = [tuple(e) for e in c.evals]
    with open(os.path.join(run_dir, "history.json")) as f:
        c.history = [h for h in json.load(f) if h["step"] <= extra["step"]]
    comp.rollout.update_weights(comp.learner.async_weights(zero_copy=True), comp.learner.version())
    return c, extra["step"], extra["wandb_id"]


def train(cfg: Config, run_dir: str, log=print, resume: bool = False) -> dict:
    """Start the components, run the loop, always stop the actors and Ray (also on errors and Ctrl-C)."""
    import ray

    t_start = time.time()
    comp = start_components(cfg, log)
    try:
        write_pids(run_dir, comp)
        return loop(comp, cfg, run_dir, log, t_start, resume)
    finally:
        comp.rollout.shutdown()
        comp.learner.shutdown()
        ray.shutdown()


def loop(comp: Components, cfg: Config, run_dir: str, log, t_start: float, resume: bool) -> dict:
    """The loop: {generate (maybe overlapped with the previous update) -> insert -> update -> push -> eval}."""
    import wandb
    from omegaconf import OmegaConf
    from tqdm import tqdm

    tc, c, rng, first_step, wandb_id = cfg.train, Counters(), random.Random(cfg.train.seed), 0, None
    if resume:
        c, first_step, wandb_id = restore_checkpoint(comp, run_dir, rng)
        log(f"[graftrl] resumed {run_dir} at step {first_step}")
    run = wandb.init(project=cfg.wandb.project, dir=run_dir, mode=cfg.wandb.mode, name=os.path.basename(run_dir),
                     config=OmegaConf.to_container(cfg, resolve=True), id=wandb_id, resume="allow" if resume else None)
    startup_s = time.time() - t_start
    if not resume:
        success, tok = evaluate(comp.rollout, comp.task, tc.eval_samples)
        c.eval_tokens += tok
        c.evals.append((0, success))
    t_train, step = time.time(), first_step
    # Async mode: the next batch is generated (by the current weights) while the learner trains on this one;
    # at most one batch is in flight (backpressure) and samples older than max_policy_lag updates are dropped.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(generate, comp, cfg, rng, first_step) if first_step < tc.steps else None
        for step in (bar := tqdm(range(first_step, tc.steps), desc="train", unit="step", disable=None,
                                 initial=first_step, total=tc.steps)):
            t0, reached = time.time(), False
            rollouts, branch_points, errors, t_gen = pending.result()
            c.request_errors += len(errors)
            if tc.async_rollouts and step + 1 < tc.steps:
                pending = pool.submit(generate, comp, cfg, rng, step + 1)
            metrics, t_push = learn(comp, cfg, rollouts, c)
            metrics.update(step_metrics(rollouts, branch_points, comp.store.stats(), c))
            metrics["rollout/verifier_errors"] = comp.rollout.verifier_errors
            metrics["rollout/actors_lost"] = len(comp.rollout.lost)
            metrics.update({"timing/generate_s": t_gen, "timing/weight_push_s": t_push, "timing/step_s": time.time() - t0})
            if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
                metrics["eval/heldout_success"], tok = evaluate(comp.rollout, comp.task, tc.eval_samples)
                c.eval_tokens += tok
                c.evals.append((c.generated_tokens, metrics["eval/heldout_success"]))
                reached = tc.stop_at_success is not None and metrics["eval/heldout_success"] >= tc.stop_at_success
            if cfg.store.snapshot_every and (step + 1) % cfg.store.snapshot_every == 0:
                comp.store.snapshot(os.path.join(run_dir, "store"))
            run.log(metrics, step=step + 1)
            c.history.append({"step": step + 1, "generated_tokens": c.generated_tokens, **metrics})
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.2f}", loss=f"{metrics.get('learner/loss', float('nan')):.3f}",
                            prefix=f"{metrics['tree/prefix_share']:.2f}")
            if STOP.is_set() or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0):
                save_checkpoint(comp, cfg, run_dir, c, rng, step + 1, run.id)
            if reached:
                log(f"[graftrl] held-out success reached train.stop_at_success={tc.stop_at_success} at step {step + 1}")
                break
            if STOP.is_set():
                log(f"[graftrl] interrupted: checkpoint of step {step + 1} written; resume with "
                    f"python -m launch.train resume={run_dir}")
                break
            if not tc.async_rollouts and step + 1 < tc.steps:
                pending = pool.submit(generate, comp, cfg, rng, step + 1)
    train_s = time.time() - t_train
    done = c.history[-1]["step"] if c.history else first_step
    summary = {
        "run_id": os.path.basename(run_dir), "config": OmegaConf.to_container(cfg, resolve=True), "model_dir": comp.model_dir,
        "steps": done, "interrupted": STOP.is_set(), "heldout_success_before": c.evals[0][1] if c.evals else None,
        "rollouts": c.rollouts, "rollouts_from_prefix": c.rollouts_from_prefix, "stale_rollouts_dropped": c.stale_dropped,
        "request_errors": c.request_errors, "verifier_errors": comp.rollout.verifier_errors,
        "generated_tokens": c.generated_tokens, "final_loss": c.history[-1].get("learner/loss") if c.history else None,
        "policy_version": comp.learner.version(), "startup_seconds": round(startup_s, 1), "train_seconds": round(train_s, 1),
    }
    if not STOP.is_set():
        summary["weight_sync_check"] = weight_sync_check(comp.rollout, comp.learner, comp.task)
        log(f"[graftrl] weight sync check: max |engine - learner| logprob = {summary['weight_sync_check']['max_abs_diff']:.2e}")
        success, tok = evaluate(comp.rollout, comp.task, tc.eval_samples)
        c.eval_tokens += tok
        c.evals.append((c.generated_tokens, success))
        summary["heldout_success_after"] = success
        run.log({"eval/heldout_success": success}, step=done)
        comp.store.snapshot(os.path.join(run_dir, "store"))
    summary.update(eval_tokens=c.eval_tokens, evals=c.evals, wall_seconds=round(time.time() - t_start, 1))
    write_history(run_dir, c.history)
    write_plots(run_dir, c.history, c.evals)
    run.summary.update({k: v for k, v in summary.items() if k not in ("config", "weight_sync_check", "evals")})
    run.finish()
    return summary


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def new_run_dir(cfg: Config) -> str:
    run_id = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(cfg.run_dir, run_id)
    if os.path.exists(run_dir):
        raise ConfigError(f"run directory {run_dir!r} already exists; choose another run_name")
    return run_dir


def parse_resume(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`resume=runs/<id>` is not a config key: it names the run to continue."""
    rest = [o for o in overrides if not o.startswith("resume=")]
    resumes = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not resumes:
        return None, rest
    run_dir = resumes[-1].rstrip("/")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError(f"resume={run_dir!r}: no run there (expected {run_dir}/config.yaml); give a folder under runs/")
    if not os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        raise ConfigError(f"resume={run_dir!r}: the run has no checkpoint yet; start it again instead")
    return run_dir, rest


def component_died(e: Exception) -> str | None:
    """One line naming the process that died, when `e` says a learner rank or another actor of the run died."""
    from ray.exceptions import RayActorError

    from actors.group import RolloutActorLost
    from learner.group import LearnerDied

    if isinstance(e, (LearnerDied, RolloutActorLost)):
        return str(e)
    if isinstance(e, RayActorError):
        text = str(e)
        cls, pid = re.search(r"class_name: (\S+)", text), re.search(r"\bpid: (\d+)", text)
        return (f"a Ray actor of the run died ({cls.group(1) if cls else 'unknown class'}, "
                f"pid {pid.group(1) if pid else '?'}): {text.strip().splitlines()[0]}")
    return None


def resume_hint(run_dir: str) -> str:
    """How to go on: resume from the last committed checkpoint, or start again when there is none."""
    from learner.learner import CheckpointError, latest_tag

    try:
        step = int(latest_tag(os.path.join(run_dir, "checkpoints")).removeprefix("step"))
    except CheckpointError:
        return "no checkpoint was written (set train.checkpoint_every); start the run again"
    return (f"continue from its last checkpoint (update {step}; later steps are redone) with: "
            f"python -m launch.train resume={run_dir}")


def on_sigint(signum, frame) -> None:
    """First Ctrl-C: finish the step, checkpoint, stop cleanly. Second: abort at once."""
    STOP.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("\n[graftrl] Ctrl-C: checkpointing after this step (press again to abort)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.train", description="graftrl: RL post-training with prefix access")
    ap.add_argument("--config", default="configs/default.yaml", help="YAML config (differences from launch/config.py defaults)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10 store.scorer=random; "
                                                 "resume=runs/<id> continues a run from its last checkpoint")
    args = ap.parse_args(argv)
    try:
        resume_dir, overrides = parse_resume(args.overrides)
        if resume_dir:
            cfg = load_config(os.path.join(resume_dir, "config.yaml"), overrides)
            run_dir = resume_dir
        else:
            cfg = load_config(args.config, overrides)
            run_dir = new_run_dir(cfg)
        check_task(cfg.task, cfg.model.path)  # data file, verifier, tokenizer: fail before anything starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not resume_dir:
        os.makedirs(run_dir)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        summary = train(cfg, os.path.abspath(run_dir), log=log, resume=bool(resume_dir))
    except Exception as e:
        died = component_died(e)
        if died is None:
            log(f"[graftrl] run failed; partial outputs left in {run_dir} for inspection")
            raise
        print(f"error: {died}; every actor of the run was stopped; {resume_hint(run_dir)}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        log(f"[graftrl] run failed; partial outputs left in {run_dir} for inspection")
        raise
    write_summary(run_dir, cfg.run_dir, summary)
    print_summary(summary)
    log(f"[graftrl] summary: {os.path.join(run_dir, 'summary.json')}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
