"""Tasks: prompts, held-out split and outcome reward. The rollout actor calls `reward` on each sample.

    chain       H dependent steps (running sums mod m of the prompt symbols); token ids, tiny base model
    arithmetic  synthetic multi-step word problems with a numeric answer; needs a tokenizer (model.path)
    jsonl       the user's prompts from a JSONL file, scored by a named or imported verifier
    reasoning_gym  problems of a reasoning-gym generator (task.generator, task.generator_options); needs a tokenizer

Every task serves: train_prompts(rng, n), heldout_prompts(), root_id(p),
prompt_ids(p), answer_ids(p), max_new_tokens, reward(prompt_ids,
continuation_ids) -> float, verifier_errors / pop_verifier_errors().
See docs/TASKS.md.
"""
from __future__ import annotations

from protocol.registry import check
from actors.tasks.chain import (BOS, DIGIT0, EOS, MAX_MODULUS, PAD, SEP, SPECIAL_TOKENS, TOKEN_ID, VOCAB, ChainTask,
                                digit_token)

TASKS = ("chain", "arithmetic", "jsonl", "reasoning_gym")
DEFAULT_VERIFIER = {"chain": "chain", "arithmetic": "numeric", "jsonl": "numeric", "reasoning_gym": "reasoning"}

__all__ = ["BOS", "DIGIT0", "EOS", "PAD", "SEP", "SPECIAL_TOKENS", "TOKEN_ID", "VOCAB", "MAX_MODULUS", "TASKS",
           "ChainTask", "digit_token", "make_task", "load_tokenizer"]


def load_tokenizer(model_dir: str):
    """The policy's tokenizer (a Hugging Face model folder); no downloads."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def make_task(cfg_or_name, *, horizon: int | None = None, heldout_size: int | None = None, seed: int | None = None,
              tokenizer_dir: str | None = None, tokenizer=None):
    """The task of a `TaskConfig` (or, for the chain task, of a name plus keyword arguments).

    Text tasks (arithmetic, jsonl, reasoning_gym) need the policy's tokenizer: pass `tokenizer`
    or the model folder as `tokenizer_dir`. Raises ValueError (or
    actors.data.DataError) with a one-line message on bad task settings.
    """
    if isinstance(cfg_or_name, str):
        name, get = cfg_or_name, {"horizon": horizon, "heldout_size": heldout_size, "seed": seed}.get
    else:
        cfg = cfg_or_name
        name = cfg.name

        def get(key, default=None):
            value = getattr(cfg, key, default)
            return default if value is None else value
    check("task", TASKS, name)
    horizon, heldout_size, seed = get("horizon", 4), get("heldout_size", 128), get("seed", 0)
    if name == "chain":
        return ChainTask(horizon=horizon, heldout_size=heldout_size, seed=seed, modulus=get("modulus", 10),
                         prompt_len=get("prompt_len"))

    from actors.data import load_jsonl
    from actors.tasks.text import TextTask

    if tokenizer is None:
        if tokenizer_dir is None:
            raise ValueError(f"task {name!r} needs the policy's tokenizer: set model.path to a Hugging Face model folder")
        tokenizer = load_tokenizer(tokenizer_dir)
    verifier = get("verifier") or DEFAULT_VERIFIER[name]
    common = dict(verifier=verifier, heldout_size=heldout_size, seed=seed, max_new_tokens=get("max_new_tokens", 256),
                  chat_template=get("chat_template", True), name=name)
    if name == "arithmetic":
        from actors.tasks.arithmetic import make_problems

        return TextTask(make_problems(get("num_examples", 5000), steps=horizon, seed=seed), tokenizer, **common)
    if name == "reasoning_gym":
        from actors.tasks.reasoning_gym import make_examples
        from actors.verifiers import NUMERIC_VERIFIERS

        options = get("generator_options") or {}
        if hasattr(options, "items") and not isinstance(options, dict):  # an OmegaConf node
            from omegaconf import OmegaConf

            options = OmegaConf.to_container(options, resolve=True)
        examples = make_examples(get("generator"), options, size=get("num_examples", 5000), seed=seed,
                                 numeric=verifier in NUMERIC_VERIFIERS)
        return TextTask(examples, tokenizer, **common)
    data_path = get("data_path")
    if data_path is None:
        raise ValueError("task 'jsonl' needs task.data_path: a JSONL file of {\"prompt\": ..., \"answer\": ...} lines")
    policy = get("on_bad_line", "skip")
    heldout_path = get("heldout_path")
    held = load_jsonl(heldout_path, policy) if heldout_path else None
    return TextTask(load_jsonl(data_path, policy), tokenizer, heldout_examples=held, **common)
