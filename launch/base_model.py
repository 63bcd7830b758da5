"""Build (or reuse) the tiny Llama base policy for the chain task, entirely offline.

    python -m launch.base_model --config configs/default.yaml [key=value ...] [--report]

The base model is trained from scratch by supervised learning on *noisy*
demonstrations: at step i, given the previous answer token o_{i-1}, the demo
writes the locally right step (o_{i-1} + d_i) mod m with probability q and a
uniformly chosen other symbol otherwise. The model therefore gets the right
step with probability ~q after a correct prefix (a mild advantage), and after
a wrong turn no continuation can earn reward (the globally right symbol gets
only ~(1-q)/(m-1)): the seed paper's hard instance, root-start success ~q^H.

The loss at each answer position is the cross-entropy to the demonstrator's
step distribution (q on the locally right symbol, (1-q)/(m-1) on each other
one) given the sampled noisy prefix: the expectation of the one-hot loss over
the demonstrator's choice, with the same minimiser and far less gradient
noise, so a short run lands close to q.

`--report` prints one JSON line: horizon, target_q, measured_q (by sampling
the policy on held-out prompts: among sampled steps whose prefix was fully
right, the share that are right), heldout_root_success (share of sampled
answers fully right), the teacher-forced numbers and build seconds.

Models are cached under `model.cache_dir/<hash of the fields that shape them>`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

BUILDER_VERSION = 2
REPORT_FILE = "graftrl_base.json"
REPORT_SAMPLES = 16  # samples per held-out prompt for measured_q / heldout_root_success


def sft_steps(model_cfg, task_cfg) -> int:
    from launch.config import default_sft_steps

    return model_cfg.sft_steps or default_sft_steps(task_cfg.horizon)


def model_key(model_cfg, task_cfg) -> str:
    fields = {k: getattr(model_cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "target_q",
                                                  "sft_steps", "sft_batch_size", "sft_lr")}
    fields.update(sft_steps=sft_steps(model_cfg, task_cfg))
    fields.update(horizon=task_cfg.horizon, task=task_cfg.name, split_seed=task_cfg.seed, v=BUILDER_VERSION,
                  modulus=task_cfg.modulus, prompt_len=task_cfg.prompt_len or task_cfg.horizon)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def chain_task(task_cfg):
    from actors.tasks import ChainTask

    return ChainTask(horizon=task_cfg.horizon, heldout_size=task_cfg.heldout_size, seed=task_cfg.seed,
                     modulus=task_cfg.modulus, prompt_len=task_cfg.prompt_len)


def build_task_cfg(model_cfg, task_cfg):
    """The chain task the base model is built on: `task_cfg` itself, or with `model.build_horizon` H_b set, the same
    task at horizon H_b with prompt_len = task_cfg.prompt_len or H_b. The training task at task.horizon = H <= H_b
    on the same prompts is its first H steps (the running sums do not depend on H), so one model serves every H."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    h = getattr(model_cfg, "build_horizon", None)
    if h is None:
        return task_cfg
    plain = OmegaConf.to_object(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
    return dataclasses.replace(plain, horizon=h, prompt_len=task_cfg.prompt_len or h)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from actors.tasks import TOKEN_ID

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def noisy_demos(task, rng, n: int, q: float):
    """n noisy demonstrations: (input_ids, loss_mask, locally right symbol per answer position (-1: EOS))."""
    from actors.tasks import EOS, digit_token

    m = task.modulus
    seqs, masks, rights = [], [], []
    for digits in task.train_prompts(rng, n):
        prompt = task.prompt_ids(digits)
        prev, answer, right_syms = 0, [], []
        for i in range(task.horizon):
            right = (prev + task.step_digit(digits, i)) % m
            step = right if rng.random() < q else rng.choice([x for x in range(m) if x != right])
            answer.append(digit_token(step))
            right_syms.append(right)
            prev = step
        seqs.append(prompt + answer + [EOS])
        masks.append([0] * len(prompt) + [1] * (len(answer) + 1))
        rights.append(right_syms + [-1])
    return seqs, masks, rights


def soft_target_loss(logp, rights, q: float, m: int):
    """Cross-entropy to the demonstrator's step distributions, mean over answer positions.

    logp: (B, H+1, V) log-probabilities predicting the H answer symbols and EOS;
    rights: (B, H+1) locally right symbol per position (-1: the EOS position).
    Target at a symbol position: q on the right symbol, (1-q)/(m-1) on each other
    symbol of the alphabet; at the EOS position: EOS.
    """
    import torch

    from actors.tasks import DIGIT0, EOS

    r = torch.as_tensor(rights)  # (B, H+1)
    sym = r >= 0
    lp_right = logp.gather(-1, (DIGIT0 + r.clamp(min=0)).unsqueeze(-1)).squeeze(-1)  # (B, H+1)
    lp_alphabet = logp[..., DIGIT0 : DIGIT0 + m].sum(-1)  # (B, H+1)
    other = (1 - q) / (m - 1)
    ce_sym = -(q * lp_right + other * (lp_alphabet - lp_right))
    ce = torch.where(sym, ce_sym, -logp[..., EOS])
    return ce.mean()


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


def sampled_success(model, task, prompts, samples: int, seed: int = 0) -> dict:
    """Sample H steps (temperature 1, plain torch) `samples` times per prompt.

    measured_q: among sampled steps whose prefix was fully right, the share that
    are right; heldout_root_success: share of samples with all H steps right;
    measured_q_per_step: the same ratio at each step i (conditioned on steps < i right).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([task.prompt_ids(d) for d in prompts for _ in range(samples)])  # (B, L+2)
    target = torch.tensor([task.answer_ids(d)[: task.horizon] for d in prompts for _ in range(samples)])  # (B, H)
    with torch.no_grad():
        for _ in range(task.horizon):
            logits = model(ids).logits[:, -1].float()  # (B, V)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # (B, 1)
            ids = torch.cat([ids, nxt], 1)
    right = ids[:, -task.horizon :] == target  # (B, H)
    prefix_ok = torch.cat([torch.ones_like(right[:, :1]), right.cumprod(1)[:, :-1].bool()], 1)  # (B, H): steps < i right
    per_step = [float((right[:, i] & prefix_ok[:, i]).sum() / prefix_ok[:, i].sum().clamp(min=1)) for i in range(task.horizon)]
    return {"measured_q": float((right & prefix_ok).sum() / prefix_ok.sum()),
            "heldout_root_success": float(right.all(1).float().mean()),
            "measured_q_per_step": [round(x, 4) for x in per_step], "sampled_answers": int(ids.size(0))}


def load_model(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, torch_dtype="float32").eval()


def train_base_model(model_cfg, task_cfg, out_dir: str, log=print) -> dict:
    import random

    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.tasks import BOS, EOS, PAD, VOCAB

    torch.manual_seed(task_cfg.seed)
    rng = random.Random(task_cfg.seed)
    task = chain_task(task_cfg)
    seq_len = task.prompt_len + 2 + task.horizon + 1
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=model_cfg.hidden_size,
                      intermediate_size=4 * model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
                      num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_heads,
                      max_position_embeddings=max(64, 2 * seq_len + 8), tie_word_embeddings=False,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=model_cfg.sft_lr, weight_decay=0.0)
    n_steps = sft_steps(model_cfg, task_cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=model_cfg.sft_lr, total_steps=n_steps, pct_start=0.1)
    q, m, h = model_cfg.target_q, task.modulus, task.horizon
    t0 = time.time()
    log(f"[base model] building {out_dir}: H={h}, {n_steps} SFT steps")
    for step in tqdm(range(n_steps), desc="base model (SFT)", leave=False, disable=None):
        seqs, _, rights = noisy_demos(task, rng, model_cfg.sft_batch_size, q)
        ids = torch.tensor(seqs)  # (B, T): all demos have the same length
        logp = torch.log_softmax(model(ids).logits[:, -(h + 2) : -1], -1)  # (B, H+1, V): predictions of the answer tokens
        loss = soft_target_loss(logp, rights, q, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, n_steps // 10) == 0 and step + 1 < n_steps:  # visible where the bar is not (no TTY)
            log(f"[base model] SFT step {step + 1}/{n_steps}, loss {float(loss.detach()):.4f}, {time.time() - t0:.0f} s")
    model.eval()
    sft_s = time.time() - t0
    heldout = task.heldout_prompts()
    tf_q, tf_all = correct_step_prob(model, task, heldout)
    report = {"horizon": h, "target_q": q, **sampled_success(model, task, heldout, REPORT_SAMPLES, seed=task_cfg.seed),
              "target_root_success": q ** h, "teacher_forced_q": tf_q, "teacher_forced_success": tf_all,
              "modulus": m, "prompt_len": task.prompt_len, "sft_steps": n_steps,
              "sft_seconds": round(sft_s, 1), "final_sft_loss": float(loss.detach()), "builder_version": BUILDER_VERSION}
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer().save_pretrained(tmp)
    with open(os.path.join(tmp, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.isfile(os.path.join(out_dir, REPORT_FILE)):  # another process finished the same build first:
        shutil.rmtree(tmp, ignore_errors=True)              # keep its copy (it may be in use)
        return report
    shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of an interrupted build
    try:
        os.replace(tmp, out_dir)
    except OSError:  # lost a race with another build of the same model: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(out_dir, REPORT_FILE)):
            raise
    log(f"[base model] built {out_dir} in {report['sft_seconds']} s: sampled q={report['measured_q']:.3f} "
        f"(target {q}), held-out root success {report['heldout_root_success']:.3f} (q^H={q ** h:.3f})")
    return report


def base_model_dir(model_cfg, task_cfg) -> str:
    m, L = task_cfg.modulus, task_cfg.prompt_len or task_cfg.horizon
    tag = f"chain-h{task_cfg.horizon}" + (f"-m{m}" if m != 10 else "") + (f"-l{L}" if L != task_cfg.horizon else "")
    return os.path.join(os.path.expanduser(model_cfg.cache_dir), f"{tag}-{model_key(model_cfg, task_cfg)}")


def ensure_base_model(model_cfg, task_cfg, log=print) -> str:
    """Path of the policy to train: the user's folder (`model.path`), the prepared real model (`model.name`, converted
    on a cache miss, launch/models.py), or the cached tiny base model (built on a miss).

    Raises launch.config.ConfigError (one line) when the task or model settings are unusable, before anything starts.
    """
    from launch.config import ConfigError

    check_task(task_cfg, model_cfg, log=log)
    if model_cfg.path is not None:
        return os.path.expanduser(model_cfg.path)
    if getattr(model_cfg, "name", None):
        return prepared_model(model_cfg, log)
    if task_cfg.name != "chain":
        raise ConfigError(f"task.name={task_cfg.name!r} needs model.path (a Hugging Face model folder with a tokenizer) "
                          "or model.name=smollm2; the built-in tiny base model only speaks the chain task")
    task_cfg = build_task_cfg(model_cfg, task_cfg)  # model.build_horizon: the base model of a longer chain
    out_dir = base_model_dir(model_cfg, task_cfg)
    if not os.path.isfile(os.path.join(out_dir, REPORT_FILE)):
        import fcntl

        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        with open(f"{out_dir}.lock", "w") as lock:  # runs started together build it once: the others wait, then reuse it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(os.path.join(out_dir, REPORT_FILE)):
                train_base_model(model_cfg, task_cfg, out_dir, log=log)
    return out_dir


def prepared_model(model_cfg, log=print) -> str:
    """The folder of `model.name` under `model.cache_dir` (converted on a miss); ConfigError when it cannot be made."""
    from launch.config import ConfigError
    from launch.models import ModelUnavailable, ensure_model

    try:
        return ensure_model(model_cfg.name, model_cfg.cache_dir, log=log)
    except (ModelUnavailable, OSError) as e:
        raise ConfigError(f"model.name={model_cfg.name!r} could not be prepared: {one_line(e)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_model_folder(path: str) -> None:
    """A user's model folder must hold a tokenizer (and be a Hugging Face folder, not a bare GGUF file)."""
    from launch.config import ConfigError

    folder = os.path.expanduser(path)
    names = os.listdir(folder)
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if ggufs and "config.json" not in names:
        raise ConfigError(f"model.path={path!r} holds a GGUF file ({ggufs[0]}) but no Hugging Face config.json; use "
                          "model.name=smollm2 for the bundled SmolLM2-135M-Instruct, or convert it to a folder")
    if not any(n in names for n in TOKENIZER_FILES):
        raise ConfigError(f"model.path={path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                          "policy's tokenizer there (tokenizer.save_pretrained(folder))")


def check_vocab(tokenizer, folder: str) -> None:
    """The tokenizer may not produce ids the model has no embedding for (len(tokenizer) <= config vocab_size;
    a padded embedding, more rows than tokens, is fine)."""
    from launch.config import ConfigError

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return
    try:
        with open(cfg_path) as f:
            vocab = int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model folder {folder!r}: config.json has no readable vocab_size ({one_line(e)})") from None
    if len(tokenizer) > vocab:
        raise ConfigError(f"model folder {folder!r}: its tokenizer has {len(tokenizer)} tokens but config.json's "
                          f"vocab_size is {vocab} (ids >= {vocab} have no embedding); use the tokenizer saved with "
                          "this model")


def _model_of(task_cfg, model):
    """(model config or None, model path or None) from check_task's second argument.

    `model` is a ModelConfig, or a path (or None) as launch/train.py passes `cfg.model.path`; then the model
    config is found as the task config's sibling when the task config belongs to a whole OmegaConf config."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, model.path
    model_cfg = None
    if model is None:
        parent = getattr(task_cfg, "_get_parent", lambda: None)()
        model_cfg = getattr(parent, "model", None) if parent is not None else None
    return model_cfg, (None if model is None else str(model))


def check_task(task_cfg, model=None, log=print) -> None:
    """Build the task once so bad settings (model folder, tokenizer, data file, bad lines, generator, verifier) fail
    early as a one-line ConfigError. `model`: the ModelConfig, or a model folder path (None: no folder given).

    With `model.name` set (and no path) the prepared model is made here on a cache miss (~20 s, once), after the
    task's data has been checked."""
    from actors.data import DataError
    from actors.tasks import load_tokenizer, make_task
    from launch.config import ConfigError

    model_cfg, path = _model_of(task_cfg, model)
    name = getattr(model_cfg, "name", None) if path is None else None
    if path is not None:
        check_model_folder(path)
    if task_cfg.name != "chain" and path is None and name is None:
        raise ConfigError(f"task.name={task_cfg.name!r} needs model.path (a Hugging Face model folder with a tokenizer) "
                          "or model.name=smollm2; the built-in tiny base model only speaks the chain task")
    where = f"model.path={path!r}" if path is not None else f"model.name={name!r}"
    try:
        if task_cfg.name == "chain":
            make_task(task_cfg)
            return
        if task_cfg.name == "reasoning_gym":  # generator and answers first: cheap, and before any model conversion
            from actors.tasks.reasoning_gym import check_generator

            check_generator(task_cfg.generator)
        folder = os.path.expanduser(path) if path is not None else prepared_model(model_cfg, log)
        try:
            tokenizer = load_tokenizer(folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a broken tokenizer
            raise ConfigError(f"{where}: the tokenizer cannot be loaded ({type(e).__name__}: {one_line(e)})") from None
        check_vocab(tokenizer, folder)
        make_task(task_cfg, tokenizer=tokenizer)
    except (ValueError, OSError, DataError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task {task_cfg.name!r} could not be set up from {where}: {one_line(e)}") from None


def main(argv: list[str] | None = None) -> int:
    from launch.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--report", action="store_true", help="print the model's build report as one JSON line")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        path = ensure_base_model(cfg.model, cfg.task, log=lambda m: print(m, file=sys.stderr))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report:
        report_path = os.path.join(path, REPORT_FILE)
        if not os.path.isfile(report_path):
            print(f"error: {path} was not built by graftrl (no {REPORT_FILE}); --report covers the built-in base model",
                  file=sys.stderr)
            return 2
        with open(report_path) as f:
            print(json.dumps(json.load(f)))
    else:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
