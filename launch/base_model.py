"""Build (or reuse) the tiny Llama base policy for the chain task, entirely offline.

    python -m launch.base_model --config configs/default.yaml [key=value ...] [--report]

The base model is trained from scratch by supervised learning on *noisy*
demonstrations: at step i, given the previous answer token o_{i-1}, the demo
writes the locally right step (o_{i-1} + d_i) mod 10 with probability q and a
uniformly chosen wrong digit otherwise. The model therefore gets the right
step with probability ~q after a correct prefix (a mild advantage), and after
a wrong turn no continuation can earn reward: the seed paper's hard instance,
with root-start success ~q^H.

Models are cached under `model.cache_dir/<hash of the fields that shape them>`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

BUILDER_VERSION = 1


def model_key(model_cfg, task_cfg) -> str:
    fields = {k: getattr(model_cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "target_q",
                                                  "sft_steps", "sft_batch_size", "sft_lr")}
    fields.update(horizon=task_cfg.horizon, task=task_cfg.name, split_seed=task_cfg.seed, v=BUILDER_VERSION)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    from actors.tasks import TOKEN_ID

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def noisy_demos(task, rng, n: int, q: float):
    """(input_ids, loss_mask) of n demonstrations; the loss covers answer tokens only."""
    from actors.tasks import EOS, digit_token

    seqs, masks = [], []
    for digits in task.train_prompts(rng, n):
        prompt = task.prompt_ids(digits)
        prev, answer = 0, []
        for d in digits:
            right = (prev + d) % 10
            step = right if rng.random() < q else rng.choice([x for x in range(10) if x != right])
            answer.append(digit_token(step))
            prev = step
        seqs.append(prompt + answer + [EOS])
        masks.append([0] * len(prompt) + [1] * (len(answer) + 1))
    return seqs, masks


def correct_step_prob(model, task, prompts) -> tuple[float, float]:
    """Teacher-forced along the right answer: (mean P(right step | right prefix), mean P(all H right))."""
    import torch

    ids = torch.tensor([task.prompt_ids(d) + task.answer_ids(d)[: task.horizon] for d in prompts])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)  # (B, T, V)
    p0 = len(task.prompt_ids(prompts[0]))
    tgt = ids[:, p0:]  # (B, H)
    lp = logp[:, p0 - 1 : -1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, H)
    return float(lp.exp().mean()), float(lp.sum(-1).exp().mean())


def train_base_model(model_cfg, task_cfg, out_dir: str, log=print) -> dict:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from actors.tasks import BOS, EOS, PAD, VOCAB, make_task

    torch.manual_seed(task_cfg.seed)
    rng = random.Random(task_cfg.seed)
    task = make_task(task_cfg.name, horizon=task_cfg.horizon, heldout_size=task_cfg.heldout_size, seed=task_cfg.seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=model_cfg.hidden_size,
                      intermediate_size=4 * model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
                      num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_heads,
                      max_position_embeddings=max(64, 4 * task_cfg.horizon + 8), tie_word_embeddings=False,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=model_cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=model_cfg.sft_lr, total_steps=model_cfg.sft_steps, pct_start=0.1)
    t0 = time.time()
    from tqdm import tqdm

    for step in tqdm(range(model_cfg.sft_steps), desc="base model (SFT)", leave=False, disable=None):
        seqs, masks = noisy_demos(task, rng, model_cfg.sft_batch_size, model_cfg.target_q)
        ids = torch.tensor(seqs)  # (B, T): all demos have the same length
        mask = torch.tensor(masks, dtype=torch.float32)[:, 1:]
        logits = model(ids).logits[:, :-1]  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    q, p_all = correct_step_prob(model, task, task.heldout_prompts())
    report = {"horizon": task.horizon, "target_q": model_cfg.target_q, "teacher_forced_q": q,
              "teacher_forced_success": p_all, "sft_seconds": round(time.time() - t0, 1), "final_sft_loss": float(loss.detach())}
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer().save_pretrained(tmp)
    with open(os.path.join(tmp, "graftrl_base.json"), "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"[base model] built {out_dir} in {report['sft_seconds']} s: q={q:.3f} (target {model_cfg.target_q})")
    return report


def ensure_base_model(model_cfg, task_cfg, log=print) -> str:
    """Path of the policy to train: the user's folder, or the cached tiny base model (built on a miss)."""
    if model_cfg.path is not None:
        return os.path.expanduser(model_cfg.path)
    out_dir = os.path.join(os.path.expanduser(model_cfg.cache_dir), f"chain-h{task_cfg.horizon}-{model_key(model_cfg, task_cfg)}")
    if not os.path.isfile(os.path.join(out_dir, "graftrl_base.json")):
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        train_base_model(model_cfg, task_cfg, out_dir, log=log)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from launch.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--report", action="store_true", help="print the model's build report as one JSON line")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = ensure_base_model(cfg.model, cfg.task, log=lambda m: print(m, file=sys.stderr))
    if args.report:
        with open(os.path.join(path, "graftrl_base.json")) as f:
            print(json.dumps(json.load(f)))
    else:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
