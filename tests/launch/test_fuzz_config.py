"""Fuzzing of command-line overrides and task fields: every input is either a valid config or one ConfigError line.

In-process (load_config + check_task, what main() runs before it writes anything), hypothesis-generated
`key=value` strings over the real schema; one subprocess check that the CLI answers a fuzz-found input with
`error: ...`, exit 2, no traceback and no run folder.
"""
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import OmegaConf

from launch.base_model import check_task
from launch.config import Config, ConfigError, load_config, save_config

from tests.conftest import ROOT

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def leaf_keys(node=None, prefix=""):
    node = OmegaConf.structured(Config) if node is None else node
    for k in node:
        v = node._get_node(k)
        if OmegaConf.is_dict(v) and k != "scorer_weights":
            yield from leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


KEYS = sorted(leaf_keys())
NASTY = ["", "null", "nan", "-nan", "inf", "-inf", "1e309", "-1", "0", "1", "2", "0.5", "1.5", "-0.0", "true", "no",
         "[1, 2]", "{a: 1}", "${oc.env:NO_SUCH_VAR_X}", "${train.steps}", "${nope}", "'quoted'", "a=b", "..", "../x",
         "/tmp/x", "~", " ", "\t", "10**9", "999999999999999999999", "1_000", "0x10", "é", "\x00", "a\nb"]
values = st.one_of(st.sampled_from(NASTY), st.integers(-10**12, 10**12).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                 st.sampled_from(["", ".", "train.", ".train.steps", "train..steps", "store.scorer_weights.entropy",
                                  "store.scorer_weights.bogus", "task", "resume"]), st.text(max_size=8))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=10), max_size=4)


def check_one_line(e: ConfigError) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg, repr(msg)


def invariants(cfg) -> None:
    """What a config that passes validation must satisfy (so a silently accepted bad value fails here)."""
    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    for key, v in walk(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(v, float):
            assert math.isfinite(v), (key, v)
    t, tr, lr, st_, ro = cfg.task, cfg.train, cfg.learner, cfg.store, cfg.rollout
    assert t.horizon >= 1 and 2 <= t.modulus <= 10 and (t.prompt_len is None or t.prompt_len >= 1)
    assert 1 <= t.heldout_size and t.num_examples >= 1 and t.max_new_tokens >= 1
    assert tr.steps >= 1 and tr.prompts_per_step >= 1 and tr.samples_per_request >= 1 and tr.eval_samples >= 1
    assert tr.max_policy_lag >= 0 and tr.checkpoint_every >= 0 and tr.keep_checkpoints >= 0 and tr.eval_every >= 0
    assert tr.stop_at_success is None or 0 <= tr.stop_at_success <= 1
    assert lr.lr > 0 and lr.grad_clip > 0 and lr.kl_coef >= 0 and lr.clip_ratio > 0 and lr.num_cpus >= 0
    assert lr.warmup_steps >= 0 and lr.decay_steps >= 0 and 0 <= lr.min_lr_ratio <= 1 and lr.weight_decay >= 0
    assert st_.num_shards >= 1 and st_.max_branches_per_position >= 1 and st_.max_tokens >= 1 and st_.beta >= 0
    assert st_.snapshot_every >= 0 and set(st_.scorer_weights) <= set(__import__("prefix_store.scoring").scoring.SCORERS) - {"combined"}
    assert ro.num_actors >= 1 and ro.temperature > 0 and ro.top_k_logprobs >= 0 and ro.kv_cache_gib >= 1
    assert ro.max_restarts >= 0 and ro.request_retries >= 0 and ro.weight_bucket_mb >= 1
    assert ro.num_cpus_per_actor >= 0 and ro.num_gpus_per_actor >= 0 and 0 < ro.gpu_memory_utilization <= 1
    m = cfg.model
    assert m.hidden_size >= 1 and m.num_layers >= 1 and m.num_heads >= 1 and m.hidden_size % m.num_heads == 0
    assert 0 < m.target_q <= 1 and m.sft_steps >= 1 and m.sft_batch_size >= 1 and m.sft_lr > 0
    assert cfg.run_name is None or (cfg.run_name not in ("", ".", "..") and "/" not in cfg.run_name)


def accepted_config(items: list[str]):
    """The config the overrides give, with its invariants checked; None when it is rejected with a one-line error."""
    try:
        cfg = load_config("configs/smoke.yaml", items)
        check_task(cfg.task, cfg.model.path)
    except ConfigError as e:
        check_one_line(e)
        return None
    invariants(cfg)
    return cfg


@FUZZ
@given(overrides)
def test_fuzz_overrides_valid_or_one_line_error(tmp_path_factory, items):
    cfg = accepted_config(items)
    if cfg is None:
        return
    save_config(cfg, str(tmp_path_factory.mktemp("cfg") / "config.yaml"))  # what main() writes next must not fail


chain_fields = st.fixed_dictionaries({
    "task.horizon": st.integers(-3, 40), "task.modulus": st.integers(-2, 14),
    "task.prompt_len": st.one_of(st.none(), st.integers(-2, 40)), "task.heldout_size": st.integers(-5, 10**7),
    "task.seed": st.integers(-10**6, 10**6)})


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(chain_fields)
def test_fuzz_chain_task_fields(fields):
    """Chain task settings: accepted ones build a task whose held-out set is drawn in bounded time."""
    items = [f"{k}={'null' if v is None else v}" for k, v in fields.items()]
    cfg = accepted_config(items)
    if cfg is None:
        return
    from actors.tasks import make_task

    task = make_task(cfg.task)
    held = task.heldout_prompts()
    assert len(held) == cfg.task.heldout_size and not any(task.is_heldout(p) is False for p in held)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"task.horizon": st.integers(-2, 12), "task.num_examples": st.integers(-3, 300),
                              "task.max_new_tokens": st.integers(-3, 10**6), "task.verifier": st.sampled_from(
                                  ["numeric", "gsm8k", "exact", "nope", "actors.verifiers:numeric", ":x", ".x:y",
                                   "x..y:z", "os:", "actors.verifiers:", "actors.verifiers:VERIFIERS", "null"])}))
def test_fuzz_arithmetic_task_fields(tiny_text_model_dir, fields):
    items = ["task.name=arithmetic", f"model.path={tiny_text_model_dir}"] + [f"{k}={v}" for k, v in fields.items()]
    cfg = accepted_config(items)
    if cfg is None:
        return


@pytest.fixture(scope="module")
def tiny_text_model_dir(tmp_path_factory):
    """A model folder with a tokenizer (the word-level one of the chain task is enough to tokenize text)."""
    from launch.base_model import build_tokenizer

    d = tmp_path_factory.mktemp("text_model")
    build_tokenizer().save_pretrained(str(d))
    return str(d)


@pytest.mark.parametrize("override", ["run_name=${oc.env:NO_SUCH_VAR_X}", "run_name=../escape"])
def test_cli_fuzz_found_inputs_one_line_nothing_written(tmp_path, override):
    p = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml", f"run_dir={tmp_path}/runs",
                        override], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()
