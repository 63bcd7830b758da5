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


def make_task(cfg, *, tokenizer_dir: str | None = None, tokenizer=None):
    """The task of a `TaskConfig` (launch.config; a structured OmegaConf node or the dataclass itself).

    Text tasks (arithmetic, jsonl, reasoning_gym) need the policy's tokenizer: pass `tokenizer`
    or the model folder as `tokenizer_dir`. Raises ValueError (or
    actors.data.DataError) with a one-line message on bad task settings.
    """
    name = check("task", TASKS, cfg.name)
    horizon, heldout_size, seed = cfg.horizon, cfg.heldout_size, cfg.seed
    if name == "chain":
        return ChainTask(horizon=horizon, heldout_size=heldout_size, seed=seed, modulus=cfg.modulus,
                         prompt_len=cfg.prompt_len)

    from actors.data import load_jsonl
    from actors.tasks.text import TextTask

    if tokenizer is None:
        if tokenizer_dir is None:
            raise ValueError(f"task {name!r} needs the policy's tokenizer: set model.path to a Hugging Face model folder")
        tokenizer = load_tokenizer(tokenizer_dir)
    verifier = cfg.verifier or DEFAULT_VERIFIER[name]
    common = dict(verifier=verifier, heldout_size=heldout_size, seed=seed, max_new_tokens=cfg.max_new_tokens,
                  chat_template=cfg.chat_template, name=name)
    if name == "arithmetic":
        from actors.tasks.arithmetic import make_problems

        return TextTask(make_problems(cfg.num_examples, steps=horizon, seed=seed), tokenizer, **common)
    if name == "reasoning_gym":
        from actors.tasks.reasoning_gym import make_examples
        from actors.verifiers import NUMERIC_VERIFIERS

        options = cfg.generator_options or {}
        if hasattr(options, "items") and not isinstance(options, dict):  # an OmegaConf node
            from omegaconf import OmegaConf

            options = OmegaConf.to_container(options, resolve=True)
        examples = make_examples(cfg.generator, options, size=cfg.num_examples, seed=seed,
                                 numeric=verifier in NUMERIC_VERIFIERS)
        return TextTask(examples, tokenizer, **common)
    data_path = cfg.data_path
    if data_path is None:
        raise ValueError("task 'jsonl' needs task.data_path: a JSONL file of {\"prompt\": ..., \"answer\": ...} lines")
    policy = cfg.on_bad_line
    heldout_path = cfg.heldout_path
    held = load_jsonl(heldout_path, policy) if heldout_path else None
    return TextTask(load_jsonl(data_path, policy), tokenizer, heldout_examples=held, **common)
