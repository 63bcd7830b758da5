"""Learner throughput: the DeepSpeed learner against a bare PyTorch AdamW loop, same model, same batch, same run.

    .venv/bin/python -m bench.learner --quick      # < 3 min on 2 CPU cores; one JSON line
    .venv/bin/python -m bench.learner              # more steps, a wider model
    DS_ACCELERATOR=cuda python -m bench.learner --no-ranks --model <hf folder> --name learner_gpu   # on a GPU

Both paths do the same work per update: collate the TrainBatch, a no-grad
reference forward, a policy forward, the clipped KL-regularised loss
(learner.objectives.policy_loss), backward, gradient clipping, AdamW step.
Steps are interleaved in rounds (DS, torch, DS, torch, ...) and the median
step time of each is used, so load from other processes on a shared
machine hits both alike. tokens/s counts trained (continuation) tokens.
Then 1 vs 2 data-parallel ranks (LearnerGroup, Ray actors, gloo on CPU) on
the same batch and the same cores in total (1 rank x 2 threads vs 2 x 1). Writes bench/results/learner[_quick].json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

from launch.config import LearnerConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_model(hidden: int, layers: int, vocab: int, out_dir: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32), max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def make_batch(n: int, ctx: int, cont: int, vocab: int, seed: int = 0):
    import random

    from learner.batch import TrainBatch

    rng = random.Random(seed)
    toks = [[rng.randrange(3, vocab) for _ in range(rng.randint(cont // 2, cont))] for _ in range(n)]
    return TrainBatch(context_ids=[[1] + [rng.randrange(3, vocab) for _ in range(ctx - 1)] for _ in range(n)], token_ids=toks,
                      behaviour_logprobs=[[-2.0 - rng.random() * 0.1 for _ in t] for t in toks],
                      advantages=[rng.choice([0.5, -0.5]) for _ in range(n)], versions=[0] * n,
                      rewards=[0.0] * n, group_ids=[i // 4 for i in range(n)])


def learner_cfg(**over) -> LearnerConfig:
    """launch.config.LearnerConfig with the benchmark's learning rate (1e-5) and `over`; every other field its default."""
    return dataclasses.replace(LearnerConfig(lr=1e-5), **over)


class TorchLoop:
    """The bare PyTorch baseline: the same update without DeepSpeed."""

    def __init__(self, model_dir: str, cfg):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.cfg = torch, cfg
        self.device = torch.device("cuda" if os.environ["DS_ACCELERATOR"] == "cuda" else "cpu")  # where the learner runs
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pad_id = self.model.config.pad_token_id or 0

    def train_step(self, batch) -> float:
        from learner.batch import collate, token_logprobs
        from learner.objectives import policy_loss

        torch = self.torch
        t = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        with torch.no_grad():
            ref = token_logprobs(self.ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["input_ids"], t["cont_index"])
        self.model.train()
        logp = token_logprobs(self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["input_ids"], t["cont_index"])
        loss, _ = policy_loss(logp, t["behaviour"], ref, t["advantages"], t["mask"], clip_ratio=self.cfg.clip_ratio,
                              kl_coef=self.cfg.kl_coef, kl_estimator=self.cfg.kl_estimator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())


def timed(fn, batch) -> float:
    t0 = time.perf_counter()
    fn(batch)  # returns a Python float: the step has finished on the device too
    return time.perf_counter() - t0


def ds_vs_torch(model_dir: str, batch, rounds: int, per_round: int, zero_stage: int, warmup: int = 2) -> dict:
    from learner.learner import Learner

    cfg = learner_cfg(zero_stage=zero_stage)
    ds = Learner(model_dir=model_dir, learner_cfg=cfg, seed=0, micro_batch_size=len(batch))
    bare = TorchLoop(model_dir, cfg)
    for _ in range(warmup):
        ds.train_step(batch), bare.train_step(batch)
    t_ds, t_torch = [], []
    for _ in range(rounds):
        t_ds += [timed(ds.train_step, batch) for _ in range(per_round)]
        t_torch += [timed(bare.train_step, batch) for _ in range(per_round)]
    tokens = sum(len(t) for t in batch.token_ids)
    med_ds, med_torch = statistics.median(t_ds), statistics.median(t_torch)
    return {"zero_stage": zero_stage, "steps_each": len(t_ds), "trained_tokens_per_step": tokens,
            "ds_step_ms": round(1e3 * med_ds, 2), "torch_step_ms": round(1e3 * med_torch, 2),
            "ds_tokens_per_s": round(tokens / med_ds, 1), "torch_tokens_per_s": round(tokens / med_torch, 1),
            "ds_vs_torch_ratio": round(med_torch / med_ds, 3)}


def ranks(model_dir: str, batch, steps: int, world_sizes=(1, 2)) -> dict:
    import ray

    from launch.cluster import actor_env_vars
    from learner.group import LearnerGroup

    ray.init(num_cpus=max(world_sizes), include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    out = {}
    try:
        for ws in world_sizes:
            # the same cores in total: Ray sets each rank's torch threads to its num_cpus
            g = LearnerGroup(model_dir=model_dir, learner_cfg=learner_cfg(world_size=ws, num_cpus=max(world_sizes) // ws), seed=0,
                             micro_batch_size=max(1, len(batch) // ws), env_vars=actor_env_vars(1))
            g.train_step(batch)
            ts = [timed(g.train_step, batch) for _ in range(steps)]
            g.shutdown()
            tokens = sum(len(t) for t in batch.token_ids)
            out[f"ranks{ws}_tokens_per_s"] = round(tokens / statistics.median(ts), 1)
        out["ranks2_vs_ranks1"] = round(out["ranks2_tokens_per_s"] / out["ranks1_tokens_per_s"], 3)
    finally:
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run, < 3 min on 2 cores")
    ap.add_argument("--model", default=None, help="a Hugging Face model folder (default: a random Llama built here)")
    ap.add_argument("--no-ranks", action="store_true", help="skip the 1 vs 2 ranks measurement")
    ap.add_argument("--name", default=None, help="results file stem under bench/results (default: learner or learner_quick)")
    args = ap.parse_args()
    hidden, layers, rounds, per_round, n, ctx, cont, rank_steps = (
        (128, 2, 4, 3, 64, 8, 16, 4) if args.quick else (256, 4, 6, 5, 64, 16, 32, 8))
    from bench.common import stamp, write_result

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(hidden, layers, 15, os.path.join(tmp, "model"))
        vocab = 15 if args.model is None else json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
        batch = make_batch(n, ctx, cont, vocab)
        t0 = time.time()
        result = {"model": args.model or f"random Llama h{hidden} L{layers} vocab 15",
                  "batch": {"samples": n, "context_tokens": ctx, "max_continuation_tokens": cont},
                  **ds_vs_torch(model_dir, batch, rounds, per_round, zero_stage=1)}
        if not args.no_ranks:
            result.update(ranks(model_dir, batch, rank_steps))
        result["bench_seconds"] = round(time.time() - t0, 1)
    result["accelerator"] = os.environ["DS_ACCELERATOR"]
    write_result(args.name or ("learner_quick" if args.quick else "learner"), result)
    print(json.dumps({**stamp(), **result}))


if __name__ == "__main__":
    main()
