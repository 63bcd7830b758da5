"""Calibrate ReBalance for one model: S, the steering layer and the schedule's constants, in one file.

    python -m actors.rebalance_calibrate --model ~/.cache/graftrl/models/smollm2-135m-instruct \\
        --problems 200 --out runs/rebalance/smollm2.safetensors

1. vLLM samples one completion for each of N reasoning-gym problems (unsteered, temperature 0.7 as in the paper).
2. One teacher-forced HF forward per completion gives the hidden state at the input of every third decoder layer at
   each step-end token, and the max-probability of the distribution every token was drawn from.
3. Each step-end token is labelled by the step that follows it (what steering there acts on): its confidence c
   (mean max-prob) and whether it holds a reflection word. Layer: the one whose step-end hidden states best
   predict c (held-out ridge R^2, the released code's criterion). S = mean(h | reflective or c < q25) -
   mean(h | not reflective and c > q75). The schedule's quartiles come from all steps (`fit_schedule`).
4. Written with `Calibration.save` (safetensors: the vector; JSON metadata: layer, schedule, counts, scores).

Bad input (no model folder, no problems, too few steps) is one line on stderr and exit status 2; nothing is
written then.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from actors.rebalance import (STEP_RULES, Calibration, fit_schedule, is_reflective, label_steps, ridge_r2,
                              step_segments, steering_vector)


def prompts(tokenizer, generator: str, size: int, seed: int):
    """(prompt token ids, Example) of `size` reasoning-gym problems, chat template applied (as `TextTask` does)."""
    from actors.tasks.reasoning_gym import make_examples

    out = []
    for ex in make_examples(generator, None, size=size, seed=seed):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        out.append((list(ids), ex))
    return out


def sample(model_dir: str, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int):
    """One completion per prompt from the rollout engine's settings (unsteered)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from actors.rollout_worker import engine_kwargs
    from launch.config import RolloutConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(**engine_kwargs(model_dir, RolloutConfig(), seed))
    params = SamplingParams(temperature=temperature, top_p=0.95, max_tokens=max_new_tokens, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()  # its processes would otherwise compete with the HF pass for the cores
    return [list(o.outputs[0].token_ids) for o in outs]


def following_steps(completion, max_probs, table, tokenizer):
    """For each step-end token e of a completion: (e, c, reflective) of the step that follows it (up to the next
    step end, or to the end of the completion)."""
    ends = np.flatnonzero(table.ends(completion))
    out = []
    for j, e in enumerate(ends):
        stop = ends[j + 1] if j + 1 < len(ends) else len(completion)
        if stop > e + 1:
            text = tokenizer.decode(completion[e + 1:stop])
            out.append((int(e), float(np.mean(max_probs[e + 1:stop])), is_reflective(text)))
    return out


def calibrate(model_dir: str, *, problems: int, generator: str, seed: int, max_new_tokens: int, temperature: float,
              step_rule: str, layer: int | None, log=print) -> Calibration:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rebalance_hf import step_hidden, step_table

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = prompts(tokenizer, generator, problems, seed)
    t0 = time.perf_counter()
    completions = sample(model_dir, [p for p, _ in items], max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed)
    log(f"[rebalance] sampled {len(completions)} completions, {sum(map(len, completions))} tokens in "
        f"{time.perf_counter() - t0:.0f} s")
    table = step_table(tokenizer, step_rule)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    layers = list(range(2, num_layers, 3)) if layer is None else [layer]  # every third layer: the R^2 scan
    feats: dict[int, list] = {k: [] for k in layers}
    conf, refl, step_conf = [], [], []
    t0 = time.perf_counter()
    for i, ((prompt, _), comp) in enumerate(zip(items, completions)):
        if i % 25 == 0:
            log(f"[rebalance] hidden states of completion {i}/{len(completions)} ({time.perf_counter() - t0:.0f} s)")
        if len(comp) < 2:
            continue
        hidden, max_probs = step_hidden(model, prompt, comp, layers)
        step_conf.append([c for _, _, c in step_segments(comp, max_probs, table)])
        for e, c, r in following_steps(comp, max_probs, table, tokenizer):
            for k in layers:
                feats[k].append(hidden[k][e])
            conf.append(c)
            refl.append(r)
    if len(conf) < 20:
        raise ValueError(f"only {len(conf)} step ends in {len(completions)} completions (step rule {step_rule!r}); "
                         "calibrate on more problems, a longer --max-new-tokens, or --step-rule newline")
    conf, refl = np.array(conf), np.array(refl)
    scores = {k: ridge_r2(np.stack(feats[k]), conf, lam=1.0, seed=seed) for k in layers}
    best = max(scores, key=scores.get)
    q25, q75 = np.quantile(conf, [0.25, 0.75])
    labels = label_steps(conf, refl, q25, q75)
    vector = steering_vector(np.stack(feats[best]), labels)
    schedule = fit_schedule([c for c in step_conf if c])
    meta = {"model": os.path.abspath(model_dir), "generator": generator, "problems": len(completions), "seed": seed,
            "temperature": temperature, "max_new_tokens": max_new_tokens, "step_ends": int(len(conf)),
            "reflective": int(refl.sum()), "positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
            "label_q25": float(q25), "label_q75": float(q75), "vector_norm": float(np.linalg.norm(vector)),
            "hidden_norm": float(np.linalg.norm(np.stack(feats[best]), axis=1).mean()),
            "layer_r2": {str(k): round(v, 4) for k, v in scores.items()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    log(f"[rebalance] layer {best} (R^2 {scores[best]:.3f}); {len(conf)} step ends, {int(refl.sum())} reflective, "
        f"|S| {meta['vector_norm']:.3f} vs mean |h| {meta['hidden_norm']:.2f}; schedule {schedule}")
    return Calibration(vector=vector, layer=best, schedule=schedule, step_rule=step_rule, meta=meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="HF model folder, or a name of launch.models.MODELS")
    ap.add_argument("--problems", type=int, default=200, help="calibration problems (the paper: a few hundred)")
    ap.add_argument("--generator", default="gsm_symbolic", help="reasoning-gym dataset of the problems")
    ap.add_argument("--seed", type=int, default=12345, help="problem and sampling seed (keep it apart from eval's)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--step-rule", default="blank_line", help=f"one of {', '.join(STEP_RULES)}")
    ap.add_argument("--layer", type=int, default=None, help="steering layer (default: best held-out R^2)")
    ap.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"rebalance_calibrate: {msg}", file=sys.stderr)
        return 2

    model = os.path.expanduser(args.model)
    if not os.path.isdir(model):
        from launch.models import MODELS

        if args.model not in MODELS:
            return fail(f"--model {args.model!r} is neither a model folder nor one of {', '.join(MODELS)}")
        from launch.models import ensure_model

        model = ensure_model(args.model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        return fail(f"--model {model!r} has no config.json; give a Hugging Face model folder")
    if args.problems < 1:
        return fail(f"--problems={args.problems} must be >= 1 (the paper calibrates on a few hundred)")
    if args.step_rule not in STEP_RULES:
        return fail(f"--step-rule={args.step_rule!r} is not valid; choose one of {', '.join(STEP_RULES)}")
    if args.layer is not None:
        import json

        n = json.load(open(os.path.join(model, "config.json"))).get("num_hidden_layers", 0)
        if not 0 <= args.layer < n:
            return fail(f"--layer={args.layer} must lie in [0, {n}) for this model")
    try:
        cal = calibrate(model, problems=args.problems, generator=args.generator, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, step_rule=args.step_rule,
                        layer=args.layer)
    except ValueError as e:
        return fail(str(e))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    cal.save(tmp)
    os.replace(tmp, args.out)
    print(f"[rebalance] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
