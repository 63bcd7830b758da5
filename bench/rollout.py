"""Rollout-actor benchmark: actor vs raw vLLM throughput, weight push vs its floor, prefix-cache hit rate.

    .venv/bin/python -m bench.rollout --quick   # < 3 min on 2 cores; prints one JSON object
    .venv/bin/python -m bench.rollout           # more requests and repetitions

One run, three engines started side by side in one local Ray: two rollout
actors on the default tiny model (block size 32, so its short sequences can
hit the prefix cache) and one on a randomly initialised ~100M-parameter
Llama (built once, cached under ~/.cache/graftrl/models/).

- actor_vs_raw_ratio: tokens/s of `RolloutWorker.generate` called through
  Ray from the driver (engine + top-k post-processing + rewards + transfer)
  over tokens/s of the bare `llm.generate` on the same engine and the same
  requests (chain-task prompts), repetitions interleaved. Target >= 0.9.
- weight_push_vs_floor_ratio: one push as the driver does it (the learner's
  `PackedWeights` into the object store, actor update_weights: staged in
  /dev/shm, reloaded from views, prefix cache reset) over the floor:
  serialisation to one buffer (the faster of `safetensors.torch.save` and
  joining the packed pieces) + `reload_weights` of the same tensors already in
  the engine worker's memory. Reported for both models; the key holds the
  worse one. Target <= 2. The same push with `safetensors.save` bytes (the
  earlier path) is measured alongside (`bytes_ratio`).
- cache_hit_rate_affinity / _no_affinity: share of prompt+prefix tokens
  served from the prefix cache for branch requests that re-enter prefixes
  generated one step earlier, with affinity routing on and off (n=1 branch
  requests: with n > 1, vLLM's sibling samples hit the cache whatever the routing).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
           vocab_size=32000, max_position_embeddings=512)


def build_big_llama(cache_dir: str = "~/.cache/graftrl/models") -> str:
    """A randomly initialised Llama of ~106M parameters with a WordLevel tokenizer; no downloads."""
    key = hashlib.sha1(json.dumps(BIG, sort_keys=True).encode()).hexdigest()[:12]
    out = os.path.join(os.path.expanduser(cache_dir), f"bench-llama100m-{key}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, BIG["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    model = LlamaForCausalLM(LlamaConfig(**BIG, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _state(model_dir: str, seed: int):
    """The folder's weights (HF names), slightly perturbed so every push really changes the engine."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_dir, f)))
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 1e-4 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}


def weight_push(actor, model_dir: str, reps: int) -> dict:
    """Median push time through the actor vs the floor (serialise + reload of tensors already in the worker).

    Per repetition (after one untimed push of each kind), in alternating order: the push as the driver does it
    (the learner's `PackedWeights`, header + views of its tensors, go into the object store in one copy; the
    actor's update_weights writes them as a safetensors file in /dev/shm, the engine worker reloads from views of
    it, the prefix cache is reset); the same push with `safetensors.torch.save` bytes (the path before: a
    serialiser in between, and Ray copies `bytes` for every reader); and the floor: the faster serialisation of
    the two (`save`, or joining the packed pieces into one buffer) + `reload_weights` of the same tensors already
    in the worker's memory."""
    import ray
    from safetensors.torch import save, save_file

    from actors.weight_transport import pack_weights

    def push(state, version, as_bytes):
        t0 = time.perf_counter()
        ref = ray.put(save(state) if as_bytes else pack_weights(state))  # the driver only passes the ref on
        ray.get(actor.update_weights.remote(ref, version))
        return time.perf_counter() - t0

    state = _state(model_dir, 99)
    push(state, 98, False), push(state, 99, True)  # first pushes: imports, first file, first mapping
    t = {k: [] for k in ("push", "push_bytes", "floor", "join", "save", "reload")}
    for r in range(reps):
        state = _state(model_dir, r)
        for as_bytes in ((False, True) if r % 2 == 0 else (True, False)):
            t["push_bytes" if as_bytes else "push"].append(push(state, 100 + 2 * r + as_bytes, as_bytes))
        t0 = time.perf_counter()
        pack_weights(state).tobytes()
        t["join"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        save(state)
        t["save"].append(time.perf_counter() - t0)
        with tempfile.NamedTemporaryFile(suffix=".safetensors", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
            save_file(state, f.name)
            t["reload"].append(ray.get(actor.engine_rpc.remote("time_reload_from_file", f.name)))
        t["floor"].append(min(t["join"][-1], t["save"][-1]) + t["reload"][-1])
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"params": sum(v.numel() for v in state.values()),
            "mbytes": round(sum(v.numel() * v.element_size() for v in state.values()) / 2**20, 1),
            **{f"{k}_s": round(v, 4) for k, v in med.items()},
            "ratio": round(med["push"] / med["floor"], 3), "bytes_ratio": round(med["push_bytes"] / med["floor"], 3),
            "runs_s": {k: [round(x, 3) for x in v] for k, v in t.items()}}


def throughput(actor, task, requests: int, reps: int) -> dict:
    """Interleaved repetitions: generate through the actor (timed at the driver) vs bare llm.generate (timed inside)."""
    import ray

    from protocol.messages import RolloutRequest

    rng = random.Random(0)
    reqs = [RolloutRequest(request_id=i, root_id=task.root_id(p), prompt_ids=task.prompt_ids(p), n=4)
            for i, p in enumerate(task.train_prompts(rng, requests))]
    ray.get(actor.generate.remote(reqs[:8]))  # warm-up
    ray.get(actor.raw_generate.remote(reqs[:8]))
    a_tok = a_s = r_tok = r_s = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        out = ray.get(actor.generate.remote(reqs))
        a_s += time.perf_counter() - t0
        a_tok += sum(len(r.token_ids) for r in out.rollouts)
        tok, dt = ray.get(actor.raw_generate.remote(reqs))
        r_tok, r_s = r_tok + tok, r_s + dt
    return {"requests": requests, "samples_per_request": 4, "actor_tokens_per_s": round(a_tok / a_s),
            "raw_tokens_per_s": round(r_tok / r_s), "ratio": round((a_tok / a_s) / (r_tok / r_s), 3)}


def cache_hit_rate(group, affinity: bool, roots: int, seed: int, vocab: int) -> dict:
    """Step 1: root starts for `roots` random 40-token prompts; step 2: four single-sample branch requests per root
    re-entering a prefix of a step-1 rollout. Hit rate of step 2 (tokens served from the prefix cache / prompt+prefix tokens)."""
    from protocol.messages import RolloutRequest

    rng = random.Random(seed)
    group.cfg = dataclasses.replace(group.cfg, affinity=affinity)
    prompts = {f"s{seed}r{j}": [1] + [rng.randrange(3, vocab) for _ in range(39)] for j in range(roots)}
    step1 = group.generate([RolloutRequest(request_id=j, root_id=r, prompt_ids=p, n=4)
                            for j, (r, p) in enumerate(prompts.items())])
    return branch_hit_rate(group, step1, rng, per_root=4)


def branch_hit_rate(group, step1, rng: random.Random, per_root: int) -> dict:
    """Cache statistics of `per_root` single-sample branch requests per root, each re-entering a random prefix of one
    of that root's `step1` rollouts (n=1: with n>1 vLLM's sibling samples hit the cache whatever the routing)."""
    from protocol.messages import RolloutRequest

    by_root: dict[str, list] = {}
    for r in step1:
        by_root.setdefault(r.root_id, []).append(r)
    branch = []
    for root, outs in by_root.items():
        for _ in range(per_root):
            src = rng.choice(outs)
            k = rng.randint(1, max(1, len(src.token_ids) - 1))
            branch.append(RolloutRequest(request_id=len(branch), root_id=root, prompt_ids=src.prompt_ids,
                                         prefix_ids=src.token_ids[:k], n=1))
    group.cache_stats(reset=True)
    group.generate(branch)
    return group.cache_stats(reset=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny-model", default=None, help="tiny model folder (default: build or reuse the default base model)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from actors.group import RolloutGroup
    from bench.workers import BenchRolloutWorker
    from actors.tasks import make_task
    from bench.common import write_result
    from launch.base_model import ensure_base_model
    from launch.cluster import actor_env_vars
    from launch.config import ModelConfig, RolloutConfig, TaskConfig

    t_start = time.time()
    task_cfg = TaskConfig()
    tiny_dir = args.tiny_model or ensure_base_model(ModelConfig(), task_cfg, log=lambda *a: print(*a, file=sys.stderr))
    big_dir = build_big_llama()
    print(f"[bench.rollout] models ready after {time.time() - t_start:.0f}s; starting 3 engines", file=sys.stderr)
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             log_to_driver=False)
    cfg = RolloutConfig(num_actors=2, block_size=32)
    env = actor_env_vars(cfg.kv_cache_gib)
    with ThreadPoolExecutor(2) as pool:
        f_tiny = pool.submit(RolloutGroup, model_dir=tiny_dir, rollout_cfg=cfg, task_cfg=task_cfg, seed=0, env_vars=env,
                             worker_cls=BenchRolloutWorker)
        f_big = pool.submit(RolloutGroup, model_dir=big_dir, rollout_cfg=RolloutConfig(num_actors=1), task_cfg=task_cfg,
                            seed=0, env_vars=env, worker_cls=BenchRolloutWorker)
        tiny, big = f_tiny.result(), f_big.result()
    t_up = time.time() - t_start
    print(f"[bench.rollout] engines up after {t_up:.0f}s", file=sys.stderr)
    task = make_task(task_cfg)
    reps = 3 if args.quick else 5
    thr = throughput(tiny.actors[0], task, requests=256 if args.quick else 1024, reps=reps)
    roots = 32 if args.quick else 128
    hit_aff = cache_hit_rate(tiny, True, roots, seed=1, vocab=15)
    hit_no = cache_hit_rate(tiny, False, roots, seed=2, vocab=15)
    push_tiny = weight_push(tiny.actors[0], tiny_dir, reps)
    push_big = weight_push(big.actors[0], big_dir, reps)
    result = {
        "actor_vs_raw_ratio": thr["ratio"],
        "weight_push_vs_floor_ratio": max(push_tiny["ratio"], push_big["ratio"]),
        "cache_hit_rate_affinity": round(hit_aff["hit_rate"], 3),
        "cache_hit_rate_no_affinity": round(hit_no["hit_rate"], 3),
        "throughput": thr, "weight_push_tiny": push_tiny, "weight_push_100m": push_big,
        "cache_affinity": hit_aff, "cache_no_affinity": hit_no,
        "quick": args.quick, "engines_up_s": round(t_up, 1), "total_s": round(time.time() - t_start, 1),
    }
    tiny.shutdown()
    big.shutdown()
    ray.shutdown()
    path = write_result("rollout_quick" if args.quick else "rollout", result)
    print(f"[bench.rollout] wrote {path}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
