"""RolloutWorker: one vLLM engine that samples from the prompt or from any stored prefix.

A plain class: `actors.group.RolloutGroup` makes it a Ray actor; tests may
build it directly. It owns the engine, the task verifier (rewards are
computed here, next to the samples) and its policy version. It does not
know the prefix store or the learner.
"""
from __future__ import annotations

import os

from actors.messages import Rollout, RolloutRequest
from actors.tasks import make_task
from prefix_store.scoring import entropy_from_topk


class RolloutRequestError(ValueError):
    """A request that cannot be served; the worker keeps serving others."""


class RolloutWorker:
    def __init__(self, *, model_dir: str, rollout_cfg, task_cfg, actor_id: int, seed: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.kv_cache_gib))
        from vllm import LLM

        self.cfg = rollout_cfg
        self.actor_id = actor_id
        self.version = 0
        self.task = make_task(task_cfg.name, horizon=task_cfg.horizon, heldout_size=task_cfg.heldout_size, seed=task_cfg.seed)
        self.llm = LLM(model=model_dir, dtype=rollout_cfg.dtype, enforce_eager=rollout_cfg.enforce_eager,
                       gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, enable_prefix_caching=True,
                       seed=seed, worker_extension_cls="actors.weight_receiver.WeightReceiver")
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_len = self.llm.llm_engine.model_config.max_model_len

    def _check(self, req: RolloutRequest) -> None:
        ids = req.prompt_ids + req.prefix_ids
        if req.n <= 0:
            raise RolloutRequestError(f"request {req.request_id}: n={req.n} must be >= 1")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RolloutRequestError(f"request {req.request_id}: token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(ids) + 1 > self.max_len:
            raise RolloutRequestError(f"request {req.request_id}: prompt+prefix of {len(ids)} tokens leaves no room in the model context of {self.max_len}")

    def generate(self, requests: list[RolloutRequest], *, temperature: float | None = None) -> list[Rollout]:
        """Sample `req.n` continuations after prompt + prefix for every request; score each."""
        from vllm import SamplingParams, TokensPrompt

        for req in requests:
            self._check(req)
        temperature = self.cfg.temperature if temperature is None else temperature
        prompts, params = [], []
        for req in requests:
            ids = req.prompt_ids + req.prefix_ids
            budget = max(1, self.task.max_new_tokens - len(req.prefix_ids))
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(n=req.n, temperature=temperature, max_tokens=min(budget, self.max_len - len(ids)),
                                         logprobs=self.cfg.top_k_logprobs, detokenize=False))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rollouts = []
        for req, out in zip(requests, outputs):
            for comp in out.outputs:
                tokens = list(comp.token_ids)
                lps, ents, top1s, alts, alt_lps = [], [], [], [], []
                for tok, pos in zip(tokens, comp.logprobs):
                    lps.append(pos[tok].logprob)
                    # vLLM returns the top-k plus the sampled token; keep exactly the top-k.
                    topk = sorted(((lp.logprob, t) for t, lp in pos.items()), reverse=True)[: self.cfg.top_k_logprobs]
                    ents.append(entropy_from_topk([lp for lp, _ in topk]))
                    top1s.append(topk[0][0])
                    alt = next(((lp, t) for lp, t in topk if t != tok), (-1e9, -1))
                    alts.append(alt[1])
                    alt_lps.append(alt[0])
                rollouts.append(Rollout(
                    request_id=req.request_id, root_id=req.root_id, prompt_ids=req.prompt_ids,
                    prefix_ids=req.prefix_ids, token_ids=tokens, logprobs=lps, entropy=ents, top1_logprobs=top1s,
                    alt_token_ids=alts, alt_logprobs=alt_lps,
                    reward=self.task.reward(req.prompt_ids, req.prefix_ids + tokens),
                    policy_version=self.version, actor_id=self.actor_id, branch_ref=req.branch_ref,
                    forced=req.forced))
        return rollouts

    def update_weights(self, payload: bytes, version: int) -> int:
        """Load new weights, drop the now-stale KV prefix cache, adopt the learner's version."""
        n = self.llm.collective_rpc("load_weights_from_bytes", args=(payload,))[0]
        self.llm.reset_prefix_cache()
        self.version = version
        return n

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log pi(x_t | x_<t) for t >= 1 of a fixed sequence (prompt logprobs), to compare with the learner."""
        from vllm import SamplingParams, TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=token_ids)],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
        return [pos[tok].logprob for tok, pos in zip(token_ids[1:], out.prompt_logprobs[1:])]

    def get_version(self) -> int:
        return self.version
