"""ReBalance steering on a Hugging Face causal LM: a forward pre-hook on one decoder layer, a plain greedy loop.

The simplest place to get the method exactly right, and the reference the vLLM worker extension
(`actors.rebalance_vllm`) is checked against. Also the hidden-state pass of calibration (`step_hidden`).
Owns: token texts -> `StepTable`, the layer hook, `generate` (batch 1, greedy, KV cache), `step_hidden`.
Does not know vLLM or the rollout protocol.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cal = Calibration.load("runs/rebalance/smollm2.safetensors")
    out = generate(model, prompt_ids, max_new_tokens=256, eos_ids={2}, calibration=cal, table=step_table(tok))
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.rebalance import Calibration, StepTable, StepTracker


def token_texts(tokenizer) -> list[str]:
    """Decoded text of every token id (byte-level pieces that are not whole characters decode to U+FFFD)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def step_table(tokenizer, rule: str = "blank_line") -> StepTable:
    return StepTable.from_texts(token_texts(tokenizer), rule)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (Llama/Qwen layout: model.model.layers)."""
    return model.model.layers


def _hidden_arg(args, kwargs):
    """(where, hidden_states) of a decoder layer's call: HF passes it positionally or by name."""
    return ("args", args[0]) if args else ("kwargs", kwargs["hidden_states"])


@contextmanager
def layer_steer(layer: torch.nn.Module, vector: torch.Tensor, rows: dict):
    """While active: the input hidden state of `layer` gets h[b, -1] += rows[b] * vector for every batch row b
    in `rows` (the caller sets `rows` before each forward; empty: no change). Out of place, so the caller's
    tensors are not modified."""
    def hook(module, args, kwargs):
        if not rows:
            return None
        key, h = _hidden_arg(args, kwargs)
        h = h.clone()  # (B, T, D)
        for b, alpha in rows.items():
            h[b, -1] += alpha * vector.to(h.dtype)
        if key == "args":
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (the eos token included when it ended the generation)."""
    steered: dict[int, float] = field(default_factory=dict)
    """{index into `tokens`: alpha} of the tokens whose forward was steered."""
    max_probs: list[float] = field(default_factory=list)
    """max_a pi(a | .) of the distribution each token was drawn from."""


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int, eos_ids, calibration: Calibration | None = None,
             table: StepTable | None = None) -> Generation:
    """Greedy decoding, batch 1, KV cache; with `calibration` (and the tokenizer's `table`), ReBalance steering:
    the forward of each generated step-end token adds alpha * S at the input of layer `calibration.layer`."""
    eos_ids = set(eos_ids)
    rows: dict = {}
    tracker = None
    if calibration is not None:
        tracker = StepTracker(table, calibration.schedule, prev_token=prompt_ids[-1])
        vector = torch.as_tensor(calibration.vector)
        ctx = layer_steer(decoder_layers(model)[calibration.layer], vector, rows)
    else:
        ctx = nullcontext()
    out = Generation(tokens=[])
    with ctx:
        ids = torch.tensor([prompt_ids])
        past = None
        pending = None
        for t in range(max_new_tokens):
            rows.clear()
            if t > 0 and tracker is not None:
                alpha = tracker.feed(out.tokens[-1], pending)
                if alpha is not None:
                    rows[0] = alpha
                    out.steered[t - 1] = alpha
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            probs = torch.softmax(res.logits[0, -1].float(), -1)
            pending = float(probs.max())
            tok = int(res.logits[0, -1].argmax())
            out.tokens.append(tok)
            out.max_probs.append(pending)
            if tok in eos_ids:
                break
            ids = torch.tensor([[tok]])
    return out


@torch.no_grad()
def step_hidden(model, prompt_ids: list[int], completion: list[int], layers: list[int],
                steer: tuple[int, torch.Tensor, dict] | None = None) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """One teacher-forced forward over prompt + completion.

    Returns ({layer: (T, D) hidden state at the input of that decoder layer (after any steering) for the
    completion's positions}, (T,) max_a pi(a | .) of the distribution each completion token was drawn from).
    `steer` = (layer, S, {completion index: alpha}) adds alpha * S at those positions' input of that layer."""
    ids = torch.tensor([prompt_ids + completion])
    n = len(prompt_ids)
    blocks = decoder_layers(model)
    handles, seen = [], {}
    if steer is not None:
        layer, vector, where = steer

        def add(module, args, kwargs):
            key, h = _hidden_arg(args, kwargs)
            h = h.clone()  # (1, n + T, D)
            for t, alpha in where.items():
                h[0, n + t] += alpha * vector.to(h.dtype)
            return ((h, *args[1:]), kwargs) if key == "args" else (args, {**kwargs, "hidden_states": h})

        handles.append(blocks[layer].register_forward_pre_hook(add, with_kwargs=True))
    for layer in layers:  # registered after the steering hook: they see its result
        def record(module, args, kwargs, layer=layer):
            seen[layer] = _hidden_arg(args, kwargs)[1][0, n:].float().numpy().copy()

        handles.append(blocks[layer].register_forward_pre_hook(record, with_kwargs=True))
    try:
        res = model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    max_probs = torch.softmax(res.logits[0, n - 1:-1].float(), -1).max(-1).values.numpy()
    return seen, max_probs
