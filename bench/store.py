"""Prefix-store benchmark: insert throughput, select latency at 10K/100K/1M positions, bytes per token, 1/2/4 shards.

    .venv/bin/python -m bench.store            # full: also 1, 2, 4 Ray shards
    .venv/bin/python -m bench.store --quick    # < 2 min; prints one JSON object

Workload: rollouts of realistic shape (128 new tokens, vocab 32K), a quarter
root starts and the rest branches re-entering random stored prefixes, the
way the driver feeds the store. Everything is generated before timing.
Targets (issue 4): >= 200K tokens/s insert per shard, <= 20 ms median select
at 1M positions, <= 32 bytes per stored token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc

import numpy as np

from protocol.messages import Rollout
from prefix_store.tree import PrefixShard

VOCAB = 32_000
CONT = 128


def make_shard(max_tokens: int = 10**9) -> PrefixShard:
    return PrefixShard(scorer="entropy", beta=0.1, max_branches_per_position=2, max_tokens=max_tokens,
                       vocab_size=VOCAB, seed=0)


def workload(total_tokens: int, seed: int = 0, roots: int | None = None) -> list[list[Rollout]]:
    """Batches of 64 rollouts adding ~total_tokens new tokens; branches re-enter earlier rollouts' prefixes."""
    rng = np.random.default_rng(seed)
    n = total_tokens // CONT
    roots = roots or max(1, n // 32)
    made: list[tuple[str, list[int]]] = []
    out, batch = [], []
    for i in range(n):
        root = f"root{rng.integers(roots)}"
        prefix: list[int] = []
        same_root = [c for r, c in made[-64:] if r == root]
        if same_root and rng.random() < 0.75:
            base = same_root[rng.integers(len(same_root))]
            prefix = base[: int(rng.integers(1, len(base)))]
        toks = rng.integers(0, VOCAB, CONT).tolist()
        lp = (-rng.random(CONT) * 3).tolist()
        batch.append(Rollout(request_id=i, root_id=root, prompt_ids=[1, 2, 3], prefix_ids=prefix, token_ids=toks,
                             logprobs=lp, entropy=rng.random(CONT).tolist(), top1_logprobs=(-rng.random(CONT)).tolist(),
                             alt_token_ids=rng.integers(0, VOCAB, CONT).tolist(), alt_logprobs=lp,
                             reward=float(rng.random() < 0.3), policy_version=0, actor_id=0))
        if len(batch) == 64:  # branches only re-enter rollouts of earlier batches (already stored)
            out.append(batch)
            made += [(r.root_id, r.continuation) for r in batch]
            batch = []
    if batch:
        out.append(batch)
    return out


def bench_insert(batches) -> dict:
    shard = make_shard()
    new_tokens = sum(len(r.token_ids) for b in batches for r in b)
    t0 = time.perf_counter()
    for b in batches:
        shard.insert(b)
    dt = time.perf_counter() - t0
    return {"insert_tokens_per_s": new_tokens / dt, "insert_new_tokens": new_tokens, "insert_seconds": dt}, shard


def bench_select(shard: PrefixShard, k: int = 64, reps: int = 15) -> dict:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        shard.select(k)
        times.append((time.perf_counter() - t0) * 1000)
    return {"positions": int(shard._available().sum()), "select_p50_ms": statistics.median(times),
            "select_p90_ms": float(np.percentile(times, 90))}


def bench_bytes(batches) -> dict:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    shard = make_shard()
    for b in batches:
        shard.insert(b)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tokens = shard.live_tokens
    return {"bytes_per_token": shard.bytes_used() / tokens, "bytes_per_token_traced": traced / tokens,
            "nodes_per_1k_tokens": 1000 * shard.stats()["nodes"] / tokens}


def bench_ray_shards(num_shards: int, batches) -> dict:
    from omegaconf import OmegaConf

    from launch.config import StoreConfig
    from prefix_store.store import PrefixStore

    cfg = OmegaConf.structured(StoreConfig(num_shards=num_shards, max_tokens=10**9, beta=0.1))
    store = PrefixStore(store_cfg=cfg, vocab_size=VOCAB, seed=0)
    new_tokens = sum(len(r.token_ids) for b in batches for r in b)
    t0 = time.perf_counter()
    for b in batches:
        store.insert(b)
    dt = time.perf_counter() - t0
    times = []
    for _ in range(10):
        t1 = time.perf_counter()
        store.select(64)
        times.append((time.perf_counter() - t1) * 1000)
    return {"shards": num_shards, "insert_tokens_per_s": new_tokens / dt, "select_p50_ms": statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.time()
    res: dict = {"quick": args.quick, "workload": {"new_tokens_per_rollout": CONT, "vocab": VOCAB, "branch_share": 0.75}}
    ins, _ = bench_insert(workload(200_000 if args.quick else 1_000_000, seed=1))
    res["insert"] = ins
    res["select"] = {}
    for size in (10_000, 100_000, 1_000_000):
        _, shard = bench_insert(workload(size, seed=2))
        res["select"][str(size)] = bench_select(shard)
        print(f"[bench.store] select at {size}: {res['select'][str(size)]}", file=sys.stderr)
    # the path-aware scorer reads the tree, not only per-row columns: same shard, side by side
    from prefix_store.scoring import get_scorer

    res["select_by_scorer_1m"] = {}
    for i, name in enumerate(("entropy", "first_surprise", "entropy")):
        shard.scorer = get_scorer(name)
        res["select_by_scorer_1m"][f"{name}#{i}"] = bench_select(shard)
    print(f"[bench.store] select at 1M by scorer: {res['select_by_scorer_1m']}", file=sys.stderr)
    res["memory"] = bench_bytes(workload(200_000, seed=3))
    if not args.quick:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        batches = workload(400_000, seed=4, roots=512)
        res["shards"] = [bench_ray_shards(n, batches) for n in (1, 2, 4)]
        ray.shutdown()
    res["seconds"] = round(time.time() - t_start, 1)
    summary = {"insert_tokens_per_s": round(ins["insert_tokens_per_s"]),
               "select_p50_ms_1m": round(res["select"]["1000000"]["select_p50_ms"], 2),
               "bytes_per_token": round(res["memory"]["bytes_per_token"], 1)}
    res["summary"] = summary
    path = f"store{'_quick' if args.quick else ''}"
    from bench.common import write_result

    write_result(path, res)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
