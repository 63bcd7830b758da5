"""ReBalance steering on the real model: tokens per answer and accuracy with and without steering, side by side.

    .venv/bin/python -m bench.rebalance --quick      # 64 problems, greedy; one JSON line
    .venv/bin/python -m bench.rebalance              # 256 problems, greedy and sampled (temperature 0.7, 4 each)

One vLLM engine (the rollout engine's settings with rollout.steering=rebalance) serves the same held-out
gsm_symbolic prompts (seed 2026, apart from calibration's 12345) in turn: unsteered (the extension's hooks not
installed), then steered with each calibration file given (`--calibration`, default the committed SmolLM2 ones).
Accuracy is the `reasoning` verifier's; tokens per answer counts every generated token, the eos included.
Timings are disturbed by other jobs on the box: only the ratio of the runs, measured back to back, is reported.
Writes bench/results/rebalance[_quick].json after every run (one mode, one steering); a second call with the same
settings skips the runs already there (the full benchmark takes about an hour on 2 cores), other settings are
refused unless `--fresh`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CALIBRATIONS = ("bench/results/rebalance_smollm2_newline.safetensors",
                "bench/results/rebalance_smollm2_blank40.safetensors")


def log(msg: str) -> None:
    print(f"[bench.rebalance] {msg}", file=sys.stderr, flush=True)


def summarise(comps, answers, tok, table, prompts) -> dict:
    import numpy as np

    from actors.verifiers import reasoning

    lengths = [len(c) for c in comps]
    correct = [reasoning(tok.decode(c, skip_special_tokens=True), a) for c, a in zip(comps, answers)]
    ends = [int(table.ends(c, first_prev=p[-1]).sum()) if c else 0 for c, p in zip(comps, prompts)]
    return {"tokens_per_answer": round(float(np.mean(lengths)), 2), "accuracy": round(float(np.mean(correct)), 4),
            "correct": int(sum(correct)), "answers": len(comps), "step_ends_per_answer": round(float(np.mean(ends)), 2),
            "hit_token_limit": int(sum(1 for c in comps if c and c[-1] != tok.eos_token_id))}


def earlier_runs(path: str, settings: dict) -> dict | None:
    """The runs already measured in `path` with these settings ({} when there is no file); None (after one line on
    stderr) when the file was made with other settings."""
    from bench.common import other_settings

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if other_settings(path, old, settings, "rerun with those settings to resume it, or pass --fresh to start over"):
        return None
    return old.get("runs", {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="~/.cache/graftrl/models/smollm2-135m-instruct")
    ap.add_argument("--calibration", action="append", default=None, help="calibration file(s) to compare")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming the results file")
    args = ap.parse_args(argv)
    model = os.path.expanduser(args.model)
    cals = [c for c in (args.calibration or CALIBRATIONS) if os.path.isfile(c)]
    if not os.path.isdir(model) or not cals:
        print(f"bench.rebalance: needs the model folder {model!r} and a calibration file (run python -m "
              "actors.rebalance_calibrate --out bench/results/rebalance_smollm2_newline.safetensors)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    from actors.rebalance import Calibration
    from actors.rebalance_calibrate import prompts as make_prompts
    from actors.rebalance_hf import step_table
    from actors.rollout_worker import engine_kwargs
    from bench.common import write_result
    from launch.config import RolloutConfig

    n = args.problems or (64 if args.quick else 256)
    name = "rebalance_quick" if args.quick else "rebalance"
    settings = {"model": model, "problems": n, "max_new_tokens": args.max_new_tokens,
                "calibrations": [os.path.basename(c) for c in cals]}
    done = {} if args.fresh else earlier_runs(f"bench/results/{name}.json", settings)
    if done is None:
        return 2
    tok = AutoTokenizer.from_pretrained(model)
    items = make_prompts(tok, "gsm_symbolic", n, seed=2026)
    prompts, answers = [p for p, _ in items], [e.answer for _, e in items]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    modes = {"greedy": (SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, detokenize=False), 1)}
    if not args.quick:
        modes["sampled_t0.7"] = (SamplingParams(temperature=0.7, top_p=0.95, n=4, max_tokens=args.max_new_tokens,
                                                detokenize=False), 4)
    tables = {}
    result = {**settings, "runs": done}
    arms = [("none", None)] + [(os.path.basename(c).removesuffix(".safetensors"), c) for c in cals]
    left = sum(k for mode, (_, k) in modes.items() for arm, _ in arms if arm not in done.get(mode, {}))
    log(f"{left * n} completions to generate ({sum(len(v) for v in done.values())} runs kept from the results "
        f"file); about {left * n * 85 / 60 / 60:.0f} min at ~60 tokens/s, 85 tokens per answer")
    steer_cfg = RolloutConfig(steering="rebalance", steering_path=cals[0])
    llm = LLM(**engine_kwargs(model, steer_cfg, seed=0)) if left else None
    for mode, (params, k) in modes.items():
        runs = result["runs"].setdefault(mode, {})
        for arm, cal_path in arms:
            if arm in runs:
                continue
            if cal_path is None:
                llm.collective_rpc("rebalance_disable")
                table_rule = Calibration.load(cals[0]).step_rule
            else:
                llm.collective_rpc("rebalance_setup", args=(cal_path, 1.0, True))
                table_rule = Calibration.load(cal_path).step_rule
            table = tables.setdefault(table_rule, step_table(tok, table_rule))
            t0 = time.perf_counter()
            outs = llm.generate(inputs, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            comps = [list(c.token_ids) for o in outs for c in o.outputs]
            reps = [a for a in answers for _ in range(k)]
            ps = [p for p in prompts for _ in range(k)]
            summary = summarise(comps, reps, tok, table, ps)
            summary["seconds"] = round(seconds, 2)
            if cal_path is not None:
                steer_log = llm.collective_rpc("rebalance_log")[0]
                alphas = [a for *_, a in steer_log]
                summary.update(steered_tokens=len(alphas),
                               mean_alpha=round(sum(alphas) / max(1, len(alphas)), 4),
                               alpha_over_gate=sum(1 for a in alphas if a <= -1.9),
                               alpha_positive=sum(1 for a in alphas if a > 0),
                               layer=Calibration.load(cal_path).layer, step_rule=table_rule)
            runs[arm] = summary
            log(f"{mode} {arm}: {summary}")
            write_result(name, result)  # each run lands as soon as it is measured
        base = runs["none"]
        for arm, s in runs.items():
            if arm != "none":
                s["token_change"] = round(s["tokens_per_answer"] / base["tokens_per_answer"] - 1, 4)
                s["accuracy_change_points"] = round(100 * (s["accuracy"] - base["accuracy"]), 2)
                s["time_ratio"] = round(s["seconds"] / base["seconds"], 3)
    greedy = result["runs"]["greedy"]
    steered_name = next(k for k in greedy if k != "none")
    line = {"tokens_per_answer": {"none": greedy["none"]["tokens_per_answer"],
                                  "rebalance": greedy[steered_name]["tokens_per_answer"]},
            "accuracy": {"none": greedy["none"]["accuracy"], "rebalance": greedy[steered_name]["accuracy"]},
            "calibration": steered_name, "problems": len(prompts)}
    result["summary"] = line
    path = write_result(name, result)
    log(f"wrote {path}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
