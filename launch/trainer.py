"""The run's state and its training step.

    trainer = Trainer(start_components(cfg, log), cfg, run_dir, log)
    summary = trainer.run(resume=False)

`Trainer.train_step` is one update, read top to bottom as named, timed phases
(each reported as `timing/<phase>_s`):

    select        the prefix store's best branch points + fresh prompts      (this thread)
    generate      rollouts of those requests from the vLLM actors            (waits for the prefetched batch in async mode)
    insert        the rollouts into the store; failed requests release their branch points. Here, waited for,
                  in async mode or when the advantages read the store's soft values; otherwise it starts after
                  build_batch and runs in the background beside the update
    prefetch      async mode: the next step's select, then its generation started in the background
    drop_stale    samples more than train.max_policy_lag updates old are dropped
    preferences   learner.signal=preference: score the responses, ask the rater about the chosen pairs, train the
                  reward model, the preference signal replaces the rewards (learner/rm_phase.py; rm/ metrics)
    build_batch   advantages (and soft values) -> TrainBatch
    update        one KL-regularised learner update
    push_weights  the new weights to every rollout actor
    store_wait    the background insert finished (the store's statistics for the step's metrics)

`Trainer.run` owns the life cycle around it: resume, wandb, evaluations,
progress lines, checkpoints, the final weight check, summary and plots.

Asynchronous mode is a one-slot prefetcher, not a second loop: the next
step's requests are planned on the driver's thread (so a checkpoint sees one
consistent store and data position) and only the generate call runs in the
background. A checkpoint taken while a batch is in flight records that batch's
requests; a resumed run generates exactly those again, so its branch-point
claims are released and its prompt order equals an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from launch.config import Config

STOP = threading.Event()
"""Set by the first Ctrl-C: the run checkpoints after the current step and stops cleanly."""


@dataclass
class Counters:
    """Totals over the run (checkpointed with it)."""
    rollouts: int = 0
    rollouts_from_prefix: int = 0
    stale_dropped: int = 0
    request_errors: int = 0
    generated_tokens: int = 0
    eval_tokens: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(generated training tokens, held-out success) at each evaluation."""
    exact_evals: list[tuple[int, float]] = field(default_factory=list)
    """Chain task: (generated training tokens, exact held-out success by teacher forcing) at each evaluation."""


@dataclass
class Components:
    task: object
    rollout: object
    store: object
    learner: object
    model_dir: str
    reward_model: object = None
    """learner.signal=preference: the reward-model actor (learner.rm_worker.RewardModelClient); else None."""


@dataclass
class StepPlan:
    """What one step generates: the requests (fresh prompts and branch re-entries) and the branch points behind them."""
    step: int
    branch_points: list
    requests: list

    def to_json(self) -> dict:
        return {"step": self.step, "branch_points": [dataclasses.asdict(b) for b in self.branch_points],
                "requests": [dataclasses.asdict(r) for r in self.requests]}

    @staticmethod
    def from_json(d: dict) -> "StepPlan":
        from protocol.messages import BranchPoint, RolloutRequest

        return StepPlan(d["step"], [BranchPoint(**b) for b in d["branch_points"]],
                        [RolloutRequest(**r) for r in d["requests"]])


@dataclass
class Generation:
    rollouts: list
    errors: list
    """Requests that could not be served (bad input); their branch points are released."""
    engine_s: float = 0.0
    """Of the generate call, the seconds inside the engines' own generate."""


class PhaseTimer:
    """Wall seconds per named phase since the last `pop` (a phase entered twice adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        """The phase being timed now (the driver's one-line error names it when a process dies)."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0, outer, self.current = time.perf_counter(), self.current, name
        try:
            yield
        finally:
            self.current = outer
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"timing/{k}_s": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


class Prefetcher:
    """At most one step's generation running in the background (async mode); the plan stays on the driver's side."""

    def __init__(self, generate):
        self._generate = generate
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.plan: StepPlan | None = None
        self._future: Future | None = None

    def start(self, plan: StepPlan) -> None:
        assert self.plan is None, "one batch in flight at most"
        self.plan, self._future = plan, self._pool.submit(self._generate, plan.requests)

    def take(self, step: int) -> tuple[StepPlan, Generation] | None:
        """The plan and rollouts in flight for `step` (waits for them); None when nothing is in flight."""
        if self.plan is None:
            return None
        assert self.plan.step == step, f"in flight: step {self.plan.step}, asked for {step}"
        plan, future = self.plan, self._future
        self.plan = self._future = None
        return plan, future.result()

    def close(self) -> None:
        """Wait for a generation in flight (its results are dropped: a checkpoint holds its plan) and stop."""
        self._pool.shutdown(wait=True)
        self.plan = self._future = None


def step_rng(seed: int, step: int) -> random.Random:
    """The fresh prompts of step s come from their own stream: the prompt order is a function of (seed, step) alone,
    not of what earlier steps drew (how many prompts branch points displaced) or of a resume in between."""
    return random.Random(seed * 1_000_003 + step)


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


def exact_success(learner_group, task) -> float:
    """Chain task: mean over held-out prompts x of prod_{i < H} pi(s_i | x, s_<i), s the right answer: the exact
    held-out success of the learner's policy, by teacher forcing (one forward pass per prompt, batched)."""
    import math

    seqs = [task.teacher_forcing(d) for d in task.heldout_prompts()]
    logp = learner_group.teacher_forced_logprob([s for s, _ in seqs], [f for _, f in seqs], task.horizon)
    return sum(math.exp(x) for x in logp) / len(logp)


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
    # The engines start in the background while the store and the learner start (each is mostly single-threaded
    # imports and initialisation in its own process).
    rollout = RolloutGroup(model_dir=model_dir, rollout_cfg=cfg.rollout, task_cfg=cfg.task, seed=tc.seed, env_vars=env,
                           wait=False)
    store = PrefixStore(store_cfg=cfg.store, vocab_size=model_vocab_size(model_dir), seed=tc.seed)
    learner = LearnerGroup(model_dir=model_dir, learner_cfg=cfg.learner, seed=tc.seed,
                           micro_batch_size=tc.prompts_per_step * tc.samples_per_request, env_vars=env)
    rollout.wait_started()
    reward_model = None
    if cfg.learner.signal == "preference":
        from learner.rm_worker import RewardModelClient

        reward_model = RewardModelClient(model_dir=model_dir, pref_cfg=cfg.preference, seed=tc.seed, env_vars=env)
    return Components(task=task, rollout=rollout, store=store, learner=learner, model_dir=model_dir,
                      reward_model=reward_model)


def prefix_cache_hit_rate(rollouts) -> float:
    """Share of prompt+prefix tokens the engines found in their prefix cache (per request, not per sample)."""
    first = {r.request_id: r for r in rollouts}.values()
    total = sum(len(r.prompt_ids) + len(r.prefix_ids) for r in first)
    return sum(r.cached_tokens for r in first) / total if total else 0.0


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def write_history(run_dir: str, history: list[dict]) -> None:
    tmp = os.path.join(run_dir, "history.json.tmp")  # atomic: a kill mid-write leaves the previous file
    with open(tmp, "w") as f:
        json.dump(history, f)
    os.replace(tmp, os.path.join(run_dir, "history.json"))


def write_samples(run_dir: str, step: int, rollouts, task, k: int = 4) -> None:
    """Append a few of the step's rollouts to runs/<id>/samples.jsonl: token ids, reward, and for text tasks the
    decoded prompt, stored prefix and completion (what the policy is writing). Branched rollouts come first."""
    decode = getattr(task, "decode", None)
    chosen = sorted(rollouts, key=lambda r: not r.prefix_ids)[:k]
    with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
        for r in chosen:
            row = {"step": step, "root_id": r.root_id, "reward": r.reward, "policy_version": r.policy_version,
                   "from_prefix": bool(r.prefix_ids), "prompt_ids": r.prompt_ids, "prefix_ids": r.prefix_ids,
                   "token_ids": r.token_ids}
            if decode is not None:
                row.update(prompt=decode(r.prompt_ids), prefix=decode(r.prefix_ids), completion=decode(r.token_ids))
            f.write(json.dumps(row) + "\n")


def progress_line(step: int, steps: int, m: dict) -> str:
    """One line of key metrics, readable in `ray job logs` and any non-terminal output."""
    def f(key, fmt=".3f"):
        v = m.get(key)
        return "-" if v is None else format(v, fmt)

    return (f"[graftrl] step {step}/{steps} reward {f('rollout/reward_mean')} prefix_share {f('tree/prefix_share', '.2f')} "
            f"loss {f('learner/loss', '.4f')} kl {f('learner/kl', '.4f')} heldout {f('eval/heldout_success')} "
            f"tokens {m.get('perf/generated_tokens', 0)} step_s {f('timing/step_s', '.2f')} "
            f"generate_s {f('timing/generate_s', '.2f')} update_s {f('timing/update_s', '.2f')}")


class Trainer:
    """One run: its components, configuration, counters and position; `train_step` and `run`."""

    def __init__(self, comp: Components, cfg: Config, run_dir: str, log=print):
        self.comp, self.cfg, self.run_dir, self.log = comp, cfg, run_dir, log
        self.counters = Counters()
        self.step = 0
        """Updates done."""
        self.version = 0
        """The learner's policy version (the update count it reports), kept here instead of asked for every step."""
        self.timer = PhaseTimer()
        self.stage = "the start"
        """Where `run` is (with `timer.current`: `phase`)."""
        self.prefetcher = Prefetcher(self.generate)
        self.store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        """Runs the store insert beside the learner update (the store client is thread-safe)."""
        self.wandb_run = None
        self.last_rollouts: list = []
        self.last_fresh_roots: list[str] = []
        """Root ids of the fresh prompts of the last step, in order (kept in history.json, not sent to wandb)."""
        self.preferences = None
        """learner.signal=preference: the `preferences` phase (learner/rm_phase.py: score, query, rater, RM update)."""
        if comp.reward_model is not None:
            from learner.rm_phase import make_preference_phase

            self.preferences = make_preference_phase(comp, cfg, lambda reqs: self.generate(reqs).rollouts)

    @property
    def phase(self) -> str:
        """What the run is doing now, e.g. `step 3/4, push_weights` or `the final weight check` (the driver's
        one-line error names it when a process of the run dies)."""
        return f"{self.stage}, {self.timer.current}" if self.timer.current else self.stage

    # ----- the phases of one step ------------------------------------------------------------------------------
    def select(self, step: int) -> StepPlan:
        """The store's best branch points (a share `store.branch_fraction` of the step's prompts) + fresh prompts."""
        tc = self.cfg.train
        branch_points = self.comp.store.select(round(tc.prompts_per_step * self.cfg.store.branch_fraction))
        requests = make_requests(self.comp.task, step_rng(tc.seed, step), branch_points, prompts=tc.prompts_per_step,
                                 n=tc.samples_per_request, step=step)
        return StepPlan(step, branch_points, requests)

    def generate(self, requests) -> Generation:
        rollouts = self.comp.rollout.generate(requests)
        return Generation(rollouts, self.comp.rollout.pop_errors(), self.comp.rollout.last_engine_s)

    def insert(self, gen: Generation) -> dict:
        """Store the rollouts, release the branch points of failed requests; the store's statistics after it."""
        self.comp.store.insert(gen.rollouts)
        self.comp.store.release([(e.root_id, e.branch_ref) for e in gen.errors if e.branch_ref >= 0])
        return self.comp.store.stats()

    def drop_stale(self, rollouts) -> list:
        oldest = self.version - self.cfg.train.max_policy_lag  # read once: an OmegaConf lookup costs ~20 us
        fresh = [r for r in rollouts if r.policy_version >= oldest]
        self.counters.stale_dropped += len(rollouts) - len(fresh)
        return fresh

    def build_batch(self, rollouts, rewards=None):
        """rewards: the preference signal replacing the outcome rewards (learner.signal=preference), else None."""
        from learner.batch import build_train_batch

        lc = self.cfg.learner
        values = self.comp.store.soft_values(rollouts) if lc.advantage == "soft_value" else None
        return build_train_batch(rollouts, advantage=lc.advantage, nudge=lc.nudge, values=values, rewards=rewards)

    def update(self, batch):
        """One learner update; (metrics, the new weights when the push goes by the object store, exported in the same
        call to the learner, else None)."""
        rollout, learner = self.comp.rollout, self.comp.learner
        if rollout.takes_exported_weights(learner):
            return learner.train_step_and_export(batch)
        return learner.train_step(batch), None

    def push_weights(self, weights=None) -> None:
        """By rollout.weight_transport: the object store (CPU and GPU; `weights` from `update`) or vLLM's
        weight-transfer engines (GPU)."""
        self.comp.rollout.sync_weights(self.comp.learner, self.version, weights)

    def train_step(self) -> dict:
        """One update: select -> generate -> (insert, prefetch: async) -> drop stale -> build batch -> (insert) -> update
        -> push."""
        t, step, t0 = self.timer, self.step, time.perf_counter()
        prefetched = self.prefetcher.take(step)
        with t("select"):
            plan = prefetched[0] if prefetched else self.select(step)
        with t("generate"):
            gen = prefetched[1] if prefetched else self.generate(plan.requests)
        self.counters.request_errors += len(gen.errors)
        # The insert runs on the store thread beside the update. It waits for its result here when the next select
        # (async prefetch) or the batch (soft values) needs the new store; otherwise it starts once the batch is
        # built, so that its serialisation does not contend for the GIL with the driver's own work.
        insert_first = self.cfg.train.async_rollouts or self.cfg.learner.advantage == "soft_value"
        if insert_first:
            with t("insert"):
                stored = self.store_thread.submit(self.insert, gen)
                stored.result()
        if self.cfg.train.async_rollouts and step + 1 < self.cfg.train.steps:
            with t("prefetch"):
                self.prefetcher.start(self.select(step + 1))
        with t("drop_stale"):
            fresh = self.drop_stale(gen.rollouts)
        signal, rm_metrics = None, {}
        if self.preferences is not None:
            with t("preferences"):
                signal, rm_metrics = self.preferences(fresh, step)
        with t("build_batch"):
            batch = self.build_batch(fresh, signal)
        if not insert_first:
            with t("insert"):
                stored = self.store_thread.submit(self.insert, gen)
        with t("update"):
            metrics, weights = self.update(batch)
        metrics.update(rm_metrics)
        behind = [self.version - r.policy_version for r in gen.rollouts]
        self.version = int(metrics.get("learner/version", self.version))
        with t("push_weights"):
            self.push_weights(weights)
        with t("store_wait"):
            store_stats = stored.result()
        self.step = step + 1
        self.last_fresh_roots = [r.root_id for r in plan.requests if r.branch_ref < 0]
        self.last_rollouts = gen.rollouts
        metrics.update(self.rollout_metrics(plan, gen.rollouts, store_stats), **self.timer.pop())
        metrics["rollout/policy_lag_mean"] = _mean(behind)
        metrics["timing/step_s"] = step_s = time.perf_counter() - t0
        # what the step spends outside the engines' generate and the learner's forward/backward/optimizer step
        # (async mode: generation overlaps the update, so this can be negative)
        metrics["timing/engine_generate_s"] = gen.engine_s
        metrics["timing/overhead_share"] = (step_s - gen.engine_s - metrics.get("learner/compute_s", 0.0)) / step_s
        return metrics

    def rollout_metrics(self, plan: StepPlan, rollouts, store_stats: dict) -> dict:
        c, branch_points = self.counters, plan.branch_points
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
            "rollout/verifier_errors": self.comp.rollout.verifier_errors,
            "rollout/actors_lost": len(self.comp.rollout.lost),
            "rollout/retried_requests": self.comp.rollout.retried_requests,
            "tree/prefix_cache_hit_rate": prefix_cache_hit_rate(rollouts),
            "tree/branch_points": len(branch_points),
            "tree/prefix_share": len(from_prefix) / len(rollouts) if rollouts else float("nan"),
            "tree/branch_depth_mean": _mean([len(bp.prefix_ids) for bp in branch_points]),
            "tree/branch_score_mean": _mean([bp.score for bp in branch_points]),
            "tree/branch_uncertainty_mean": _mean([bp.entropy for bp in branch_points]),
            **{f"tree/{k}": v for k, v in store_stats.items()},
            "tree/branch_factor": store_stats["edges"] / max(1, store_stats["branching_nodes"]),  # children per inner node
            "perf/generated_tokens": c.generated_tokens,
        }

    # ----- evaluation, checkpoints ---------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Held-out success now (sampled), recorded against the training tokens generated so far; on the chain task
        also the exact held-out success by teacher forcing (`exact_success`), logged as `eval/exact_success` beside
        it and kept in `counters.exact_evals`."""
        success, tokens = evaluate(self.comp.rollout, self.comp.task, self.cfg.train.eval_samples)
        self.counters.eval_tokens += tokens
        self.counters.evals.append((self.counters.generated_tokens, success))
        if self.comp.task.name == "chain":
            exact = exact_success(self.comp.learner, self.comp.task)
            self.counters.exact_evals.append((self.counters.generated_tokens, exact))
            if self.wandb_run is not None:  # the step's row: run.log(metrics, step=self.step) follows
                self.wandb_run.log({"eval/exact_success": exact}, step=self.step)
        return success

    def save_checkpoint(self) -> str:
        """Learner state (DeepSpeed + RNG + Hugging Face folder), the store's shards, the driver's position and the
        plan of a batch in flight, together.

        `checkpoints/latest` moves to the new checkpoint only once all of it is written: a process killed
        mid-checkpoint leaves the run resumable from the previous one."""
        from learner.learner import commit_checkpoint

        c = self.counters
        extra = {"step": self.step, "wandb_id": self.wandb_run.id if self.wandb_run else None,
                 "counters": {k: v for k, v in dataclasses.asdict(c).items() if k != "history"},
                 "in_flight": self.prefetcher.plan.to_json() if self.prefetcher.plan else None}
        ckpt_root = os.path.join(self.run_dir, "checkpoints")
        path = self.comp.learner.save_checkpoint(ckpt_root, extra=extra, commit=False)  # committed below, with the store
        self.comp.store.snapshot(os.path.join(path, "store"))
        if self.preferences is not None:
            self.preferences.save(os.path.join(path, "preferences"))
        write_history(self.run_dir, c.history)
        commit_checkpoint(ckpt_root, os.path.basename(path), keep=self.cfg.train.keep_checkpoints)
        return path

    def restore_checkpoint(self) -> str | None:
        """Inverse of save_checkpoint for the latest checkpoint: the engines get the restored weights and a batch
        that was in flight is generated again. Returns the run's wandb id."""
        from learner.learner import latest_tag

        ckpt_root = os.path.join(self.run_dir, "checkpoints")
        extra = self.comp.learner.load_checkpoint(ckpt_root)
        self.comp.store.restore(os.path.join(ckpt_root, latest_tag(ckpt_root), "store"))
        if self.preferences is not None:
            self.preferences.restore(os.path.join(ckpt_root, latest_tag(ckpt_root), "preferences"))
        c = Counters(**extra["counters"])
        c.evals = [tuple(e) for e in c.evals]
        with open(os.path.join(self.run_dir, "history.json")) as f:
            c.history = [h for h in json.load(f) if h["step"] <= extra["step"]]
        self.counters, self.step = c, extra["step"]
        self.version = self.comp.learner.version()
        self.push_weights()
        if extra.get("in_flight"):
            self.prefetcher.start(StepPlan.from_json(extra["in_flight"]))
        return extra["wandb_id"]

    # ----- the life cycle --------------------------------------------------------------------------------------
    def run(self, resume: bool = False, t_start: float | None = None) -> dict:
        """Resume or evaluate the base, train until train.steps (or stop_at_success, or Ctrl-C), then the final
        weight check and evaluation, summary and plots. The components are the caller's to stop."""
        try:
            return self._run(resume, time.time() if t_start is None else t_start)
        finally:
            self.prefetcher.close()
            self.store_thread.shutdown(wait=True)

    def _run(self, resume: bool, t_start: float) -> dict:
        import wandb
        from omegaconf import OmegaConf
        from tqdm import tqdm

        from launch.report import write_plots

        cfg, tc, c = self.cfg, self.cfg.train, self.counters
        wandb_id = None
        if resume:
            self.stage = "the resume from the last checkpoint"
            wandb_id = self.restore_checkpoint()
            c = self.counters
            self.log(f"[graftrl] resumed {self.run_dir} at step {self.step}")
        self.wandb_run = run = wandb.init(
            project=cfg.wandb.project, dir=self.run_dir, mode=cfg.wandb.mode, name=os.path.basename(self.run_dir),
            config=OmegaConf.to_container(cfg, resolve=True), id=wandb_id, resume="allow" if resume else None)
        startup_s, first_step = time.time() - t_start, self.step
        if not resume:
            self.stage = "the evaluation before training"
            self.evaluate()
        t_train = time.time()
        bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", disable=None)
        while self.step < tc.steps:
            self.stage = f"step {self.step + 1}/{tc.steps}"
            metrics = self.train_step()
            step, reached = self.step, False
            self.stage = f"the end of step {step}/{tc.steps} (evaluation, snapshot, logs, checkpoint)"
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                metrics["eval/heldout_success"] = self.evaluate()
                reached = tc.stop_at_success is not None and metrics["eval/heldout_success"] >= tc.stop_at_success
            if cfg.store.snapshot_every and step % cfg.store.snapshot_every == 0:
                self.comp.store.snapshot(os.path.join(self.run_dir, "store"))
            run.log(metrics, step=step)
            c.history.append({"step": step, "generated_tokens": c.generated_tokens, "fresh_roots": self.last_fresh_roots,
                              **metrics})
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.2f}", loss=f"{metrics.get('learner/loss', float('nan')):.3f}",
                            prefix=f"{metrics['tree/prefix_share']:.2f}")
            if tc.log_every and (step % tc.log_every == 0 or step == first_step + 1):
                tqdm.write(progress_line(step, tc.steps, metrics), file=sys.stderr)
                write_samples(self.run_dir, step, self.last_rollouts, self.comp.task)
            if STOP.is_set() or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                self.save_checkpoint()
            if reached:
                self.log(f"[graftrl] held-out success reached train.stop_at_success={tc.stop_at_success} at step {step}")
                break
            if STOP.is_set():
                self.log(f"[graftrl] interrupted: checkpoint of step {step} written; resume with "
                         f"python -m launch.train resume={self.run_dir}")
                break
        bar.close()
        self.prefetcher.close()  # a batch generated beyond the last update is not used
        train_s = time.time() - t_train
        done = c.history[-1]["step"] if c.history else first_step
        summary = {
            "run_id": os.path.basename(self.run_dir), "config": OmegaConf.to_container(cfg, resolve=True),
            "model_dir": self.comp.model_dir, "steps": done, "interrupted": STOP.is_set(),
            "heldout_success_before": c.evals[0][1] if c.evals else None,
            "rollouts": c.rollouts, "rollouts_from_prefix": c.rollouts_from_prefix, "stale_rollouts_dropped": c.stale_dropped,
            "request_errors": c.request_errors, "verifier_errors": self.comp.rollout.verifier_errors,
            "generated_tokens": c.generated_tokens, "final_loss": c.history[-1].get("learner/loss") if c.history else None,
            "policy_version": self.version, "startup_seconds": round(startup_s, 1), "train_seconds": round(train_s, 1),
        }
        if not STOP.is_set():
            self.stage = "the final weight check"
            summary["weight_sync_check"] = check = weight_sync_check(self.comp.rollout, self.comp.learner, self.comp.task)
            self.log(f"[graftrl] weight sync check: max |engine - learner| logprob = {check['max_abs_diff']:.2e}")
            self.stage = "the final evaluation"
            summary["heldout_success_after"] = self.evaluate()
            run.log({"eval/heldout_success": summary["heldout_success_after"]}, step=done)
            self.comp.store.snapshot(os.path.join(self.run_dir, "store"))
        self.stage = "the end of the run (store snapshot, summary, plots)"
        summary.update(eval_tokens=c.eval_tokens, evals=c.evals, wall_seconds=round(time.time() - t_start, 1))
        write_history(self.run_dir, c.history)
        write_plots(self.run_dir, c.history, c.evals)
        run.summary.update({k: v for k, v in summary.items() if k not in ("config", "weight_sync_check", "evals")})
        run.finish()
        return summary
