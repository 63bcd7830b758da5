"""The real-model benchmark: SmolLM2-135M-Instruct on reasoning-gym chain_sum, on the real stack, in one run.

    .venv/bin/python -m bench.real_model --quick     # < 15 min on 2 cores; one JSON line
    .venv/bin/python -m bench.real_model             # more prompts and repetitions, a larger discovery budget

Side by side, with the same model, prompts and machine:
  base accuracy      held-out chain_sum (3 terms) accuracy, greedy and sampled (temperature 1)
  rollout speed      tokens/s of the graftrl actor's generate (rollouts, logprobs, verifier) vs the bare
                     `vllm.LLM.generate` inside it vs transformers `generate` in this process on every core
                     (what a single-box TRL user gets without vLLM)
  weight push        a 135M push through the actor vs its floor (serialise + reload of tensors already there)
  learner            the DeepSpeed learner's update vs a bare PyTorch AdamW loop on the same batch and threads
  prefix cache       hit rate of branch requests re-entering stored prefixes, with and without affinity
                     routing over two actors
  discovery          policy frozen: correct answers and distinct problems solved per 1K generated tokens,
                     root-start sampling vs prefix branching with each scorer, same token budget, chain_sum with
                     2-5 terms (the seed paper's quantity on a real model)
Writes bench/results/real_model[_quick].json; prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG = "configs/smollm2_chain_sum.yaml"
SCORERS = ("outcome_uncertainty", "first_surprise", "random", "entropy")
SECTIONS = ("hf_generate", "base_accuracy", "throughput", "weight_push", "cache", "learner", "lr_probe", "discovery")


def log(msg: str) -> None:
    print(f"[bench.real_model] {msg}", file=sys.stderr, flush=True)


def chain_sum_overrides(terms: int) -> list[str]:
    return [f"task.generator_options={{min_terms: {terms}, max_terms: {terms}, min_digits: 1, max_digits: 2}}"]


def heldout_requests(task, n: int, samples: int):
    from protocol.messages import RolloutRequest

    return [RolloutRequest(request_id=i, root_id=task.root_id(p), prompt_ids=task.prompt_ids(p), n=samples)
            for i, p in enumerate(task.heldout_prompts()[:n])]


def base_accuracy(group, task, prompts: int, samples: int) -> dict:
    greedy = group.generate(heldout_requests(task, prompts, 1), temperature=0.0)
    sampled = group.generate(heldout_requests(task, prompts, samples))
    return {"prompts": prompts, "greedy": round(statistics.mean(r.reward for r in greedy), 4),
            "sampled": round(statistics.mean(r.reward for r in sampled), 4), "sampled_samples": samples,
            "greedy_tokens_mean": round(statistics.mean(len(r.token_ids) for r in greedy), 1)}


def hf_generate_speed(model_dir: str, task, prompts: int, samples: int, max_new_tokens: int) -> dict:
    """transformers `generate`, sampling at temperature 1 like the rollouts, every core of this process."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
    ids = [task.prompt_ids(p) for p in task.heldout_prompts()[:prompts]]
    width = max(map(len, ids))
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
    att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples, pad_token_id=pad)
    dt = time.perf_counter() - t0
    new = out[:, width:]
    eos_ids = set([eos] if isinstance(eos, int) else eos)
    tokens = 0
    for row in new.tolist():  # up to and including the first end token
        tokens += next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
    return {"prompts": prompts, "samples": samples, "tokens": tokens, "seconds": round(dt, 2),
            "tokens_per_s": round(tokens / dt, 1), "threads": torch.get_num_threads()}


def cache_hit_rates(group, base_weights, task, roots: int, branches_per_root: int, seed: int) -> dict:
    """Step 1: root starts of `roots` held-out prompts (n=4) over the actors; step 2: `branches_per_root` single-
    sample requests per root re-entering a prefix of a step-1 rollout. Step 2's hit rate (tokens served from the
    prefix cache / prompt + prefix tokens), routed by prefix affinity and by load alone. Each arm starts from
    empty caches (the weights are pushed again, which resets them)."""
    from bench.rollout import branch_hit_rate

    out = {}
    for affinity in (True, False):
        group.cfg = _with(group.cfg, affinity=affinity)
        group.update_weights(base_weights, 0)  # empty caches
        group.root_owner.clear()
        rng = random.Random(seed)
        step1 = group.generate(heldout_requests(task, roots, 4))
        out["affinity" if affinity else "no_affinity"] = branch_hit_rate(group, step1, rng, branches_per_root)
    return out


def _with(cfg, **changes):
    from omegaconf import OmegaConf

    new = OmegaConf.merge(cfg, changes)
    OmegaConf.set_readonly(new, True)
    return new


def discovery(group, model_dir: str, terms: list[int], budget: int, scorers, prompts: int, n: int, seed: int,
              out: dict | None = None, save=None) -> dict:
    """Policy frozen. For each number of terms and mode, rounds of `prompts` requests x `n` samples until `budget`
    generated tokens: `root` starts every request from a fresh prompt; `prefix:<scorer>` sends half of each
    round's requests to the store's best branch points under that scorer (the rest fresh prompts, the same ones
    in the same order as root-start). Counts correct samples and distinct problems solved."""
    from actors.tasks import make_task
    from bench.workers import set_task
    from launch.config import load_config
    from launch.trainer import make_requests, model_vocab_size
    from prefix_store.store import PrefixStore

    out = {} if out is None else out  # cells already measured (an interrupted run) are kept, not redone
    for k in terms:
        cfg = load_config(CONFIG, chain_sum_overrides(k))
        set_task(group, cfg.task, model_dir)
        task = make_task(cfg.task, tokenizer_dir=model_dir)
        out.setdefault(str(k), {})
        for mode in ("root", *[f"prefix:{s}" for s in scorers]):
            if mode in out[str(k)]:
                continue
            scorer = mode.split(":", 1)[1] if ":" in mode else "outcome_uncertainty"
            over = [f"store.scorer={scorer}"] + (["store.branch_action=force"] if scorer == "first_surprise" else [])
            store = PrefixStore(store_cfg=load_config(CONFIG, chain_sum_overrides(k) + over).store,
                                vocab_size=model_vocab_size(model_dir), seed=seed, remote=False)
            rng, tokens, correct, samples, solved, rnd, t0 = random.Random(seed), 0, 0, 0, set(), 0, time.time()
            while tokens < budget:
                bps = store.select(prompts // 2) if mode != "root" else []
                reqs = make_requests(task, rng, bps, prompts=prompts, n=n, step=rnd)
                rollouts = group.generate(reqs)
                store.release([(e.root_id, e.branch_ref) for e in group.pop_errors() if e.branch_ref >= 0])
                store.insert(rollouts)
                tokens += sum(len(r.token_ids) for r in rollouts)
                samples += len(rollouts)
                correct += sum(r.reward > 0.5 for r in rollouts)
                solved |= {r.root_id for r in rollouts if r.reward > 0.5}
                rnd += 1
            out[str(k)][mode] = {"tokens": tokens, "samples": samples, "correct": correct, "solved": len(solved),
                                 "correct_per_1k_tokens": round(1000 * correct / tokens, 3),
                                 "solved_per_1k_tokens": round(1000 * len(solved) / tokens, 3),
                                 "seconds": round(time.time() - t0, 1)}
            log(f"discovery terms={k} {mode}: {out[str(k)][mode]}")
            if save is not None:
                save(out)
    return out


def in_child(fn, *args):
    """fn(*args) in a fresh process: a 135M learner and its baseline hold ~10 GB, which a child returns to the
    machine when it exits (this process keeps the engines and their caches)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def learner_vs_torch(model_dir: str, rollouts, threads: int, rounds: int, warmup: int) -> dict:
    """One DeepSpeed learner update vs one bare AdamW update on the same batch (median of interleaved rounds)."""
    import torch

    from bench.learner import ds_vs_torch
    from learner.batch import build_train_batch

    torch.set_num_threads(threads)
    batch = build_train_batch(rollouts, advantage="group", nudge=0.0)
    r = ds_vs_torch(model_dir, batch, rounds=rounds, per_round=1, zero_stage=1, warmup=warmup)
    return {**r, "threads": threads, "warmup_steps": warmup, "sequences": len(batch),
            "context_tokens": sum(len(c) for c in batch.context_ids), "trained_tokens": sum(len(t) for t in batch.token_ids)}


def one_update(model_dir: str, rollouts, kl_rollouts, lr: float, out_path: str, threads: int) -> dict:
    """A bare AdamW loop with the learner's loss, one update at `lr`; writes the new weights to `out_path` and
    returns the per-token KL(pi_base || pi_new) on `kl_rollouts` (samples of the base: k1 and k3 estimates)."""
    import torch
    from safetensors.torch import save_file

    from bench.learner import TorchLoop, learner_cfg
    from learner.batch import build_train_batch, collate, token_logprobs

    torch.set_num_threads(threads)
    loop = TorchLoop(model_dir, learner_cfg(lr=lr))
    loop.train_step(build_train_batch(rollouts, advantage="group", nudge=0.0))
    with torch.no_grad():
        t = collate(build_train_batch(kl_rollouts, advantage="group", nudge=0.0), loop.pad_id)
        lp = {name: token_logprobs(m(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits,
                                   t["input_ids"], t["cont_index"]) for name, m in (("new", loop.model), ("base", loop.ref))}
    m, log_r = t["mask"], lp["new"] - lp["base"]  # log pi_new / pi_base at tokens sampled from pi_base
    state = loop.model.state_dict()
    if loop.model.config.tie_word_embeddings:  # the output layer is the embedding; safetensors refuses shared tensors
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out_path)
    return {"kl_k1_per_token": round(float((-log_r * m).sum() / m.sum()), 5),
            "kl_k3_per_token": round(float(((torch.expm1(log_r) - log_r) * m).sum() / m.sum()), 5)}


def lr_probe(group, model_dir: str, task, train_rollouts, lrs: list[float], eval_prompts: int) -> dict:
    """One update from the base model at each learning rate, on the same batch of real rollouts (only the rate
    differs): how far it moves the policy, as the per-token KL(pi_base || pi_new) on fresh held-out samples of the
    base, and held-out sampled accuracy after the update (the new weights pushed to the engines)."""
    import tempfile

    import ray

    samples = group.generate(heldout_requests(task, eval_prompts, 2))  # from the base policy
    out = {"batch_sequences": len(train_rollouts), "kl_samples": len(samples),
           "heldout_sampled_base": round(statistics.mean(r.reward for r in samples), 4), "runs": {}}
    for lr in lrs:
        with tempfile.NamedTemporaryFile(suffix=".safetensors", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
            run = in_child(one_update, model_dir, train_rollouts, samples, lr, f.name, os.cpu_count() or 1)
            group.update_weights(ray.put(open(f.name, "rb").read()), 1)
        after = group.generate(heldout_requests(task, eval_prompts, 2))
        out["runs"][f"{lr:g}"] = {**run, "heldout_sampled_after": round(statistics.mean(r.reward for r in after), 4)}
        log(f"lr probe {lr:g}: {out['runs'][f'{lr:g}']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and repetitions, one learning rate, discovery "
                    "at 2 and 4 terms with two scorers and 1.5K tokens per cell")
    ap.add_argument("--terms", type=int, nargs="*", help="discovery: numbers of terms (default 2 4 quick, 2-5 full)")
    ap.add_argument("--budget", type=int, default=None, help="discovery: generated tokens per (terms, mode)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections not to measure")
    ap.add_argument("--resume", action="store_true", help="keep the sections an interrupted run already wrote")
    args = ap.parse_args(argv)
    q = args.quick
    import ray

    from actors.group import RolloutGroup
    from actors.tasks import make_task
    from bench.common import stamp, write_result
    from bench.rollout import throughput, weight_push
    from bench.workers import BenchRolloutWorker
    from launch.cluster import actor_env_vars, connect
    from launch.config import load_config
    from launch.models import ensure_model

    t_start = time.time()
    cfg = load_config(CONFIG, ["rollout.num_actors=2", "rollout.block_size=32"])
    model_dir = ensure_model("smollm2", cfg.model.cache_dir, log=log)
    task = make_task(cfg.task, tokenizer_dir=model_dir)
    name = "real_model_quick" if q else "real_model"
    path = os.path.join("bench", "results", f"{name}.json")
    result: dict = {"model": "SmolLM2-135M-Instruct (float32)", "task": "chain_sum", "quick": q, "started": stamp()}
    if args.resume and os.path.isfile(path):
        with open(path) as f:
            result = {k: v for k, v in json.load(f).items() if k != "partial"}
        log(f"resuming {path}: {', '.join(k for k in SECTIONS if k in result) or 'nothing'} already measured")
    todo = [s for s in SECTIONS if s not in result and s not in args.skip]

    def done(section: str, value) -> None:  # each section is written as soon as it is measured
        result[section] = value
        log(f"{section}: {value}")
        write_result(name, {**result, "partial": True})

    if "hf_generate" in todo:  # before the engines start: this process has every core to itself
        done("hf_generate", hf_generate_speed(model_dir, task, prompts=4 if q else 16, samples=4,
                                              max_new_tokens=cfg.task.max_new_tokens))
    connect(cfg.ray)
    group = RolloutGroup(model_dir=model_dir, rollout_cfg=cfg.rollout, task_cfg=cfg.task, seed=0,
                         env_vars=actor_env_vars(cfg.rollout.kv_cache_gib), worker_cls=BenchRolloutWorker)
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        base_weights = ray.put(f.read())  # pushed back after the perturbed weight-push runs, and to empty the caches
    log(f"engines up after {time.time() - t_start:.0f} s")
    try:
        if "base_accuracy" in todo:
            done("base_accuracy", base_accuracy(group, task, prompts=32 if q else 64, samples=2 if q else 4))
        if "throughput" in todo:
            done("throughput", throughput(group.actors[0], task, requests=16 if q else 32, reps=1 if q else 2))
        if "weight_push" in todo:
            done("weight_push", {k: v for k, v in weight_push(group.actors[0], model_dir, reps=1 if q else 3).items()
                                 if k != "runs_s"})
        if "cache" in todo:
            done("cache", cache_hit_rates(group, base_weights, task, roots=6 if q else 16, branches_per_root=4, seed=1))
        if "learner" in todo or "lr_probe" in todo:
            group.update_weights(base_weights, 0)
            from protocol.messages import RolloutRequest

            rollouts = group.generate([RolloutRequest(request_id=i, root_id=task.root_id(p), prompt_ids=task.prompt_ids(p),
                                                      n=cfg.train.samples_per_request)
                                       for i, p in enumerate(task.train_prompts(random.Random(0), cfg.train.prompts_per_step))])
        if "learner" in todo:
            done("learner", in_child(learner_vs_torch, model_dir, rollouts, os.cpu_count() or 1, 1 if q else 3, 0 if q else 1))
        if "lr_probe" in todo:
            done("lr_probe", lr_probe(group, model_dir, task, rollouts, [1e-5] if q else
                                      [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 2e-4], eval_prompts=16 if q else 32))
        if "discovery" in todo:
            group.update_weights(base_weights, 0)
            terms = args.terms or ([2, 4] if q else [2, 3, 4, 5])
            cells = result.pop("discovery_cells", {})
            done("discovery", discovery(group, model_dir, terms, budget=args.budget or (1500 if q else 20000),
                                        scorers=SCORERS[:2] if q else SCORERS, prompts=8, n=4, seed=0, out=cells,
                                        save=lambda c: write_result(name, {**result, "discovery_cells": c, "partial": True})))
    finally:
        group.shutdown()
        ray.shutdown()
    result["last_run_s"] = round(time.time() - t_start, 1)
    result.update(stamp())
    path = write_result(name, result)
    log(f"wrote {path}")
    line = {
        "actor_tok_per_s": result.get("throughput", {}).get("actor_tokens_per_s"),
        "raw_vllm_tok_per_s": result.get("throughput", {}).get("raw_tokens_per_s"),
        "hf_generate_tok_per_s": result.get("hf_generate", {}).get("tokens_per_s"),
        "weight_push_s": result.get("weight_push", {}).get("push_s"),
        "weight_push_floor_s": result.get("weight_push", {}).get("floor_s"),
        "cache_hit_rate_affinity": round(result["cache"]["affinity"]["hit_rate"], 3) if "cache" in result else None,
        "cache_hit_rate_no_affinity": round(result["cache"]["no_affinity"]["hit_rate"], 3) if "cache" in result else None,
        "learner_tok_per_s": result.get("learner", {}).get("ds_tokens_per_s"),
        "bare_torch_tok_per_s": result.get("learner", {}).get("torch_tokens_per_s"),
        "base_accuracy_greedy": result.get("base_accuracy", {}).get("greedy"),
        "base_accuracy_sampled": result.get("base_accuracy", {}).get("sampled"),
        "discovery": {k: {m: v["correct_per_1k_tokens"] for m, v in modes.items()}
                      for k, modes in result.get("discovery", {}).items()},
        "last_run_s": result["last_run_s"],
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
