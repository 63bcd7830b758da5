"""The real model (SmolLM2-135M-Instruct, gsm_symbolic prompts): multi-token decoding changes no greedy token.

- `actors.mtp.decode` with the mask-embedding probe and with drafts from earlier rollouts returns exactly what
  transformers' own greedy `generate` returns, on two prompts (tree mask, positions and the cropped KV cache
  all have to be right for 32 tokens to agree);
- a graftrl rollout actor whose engine runs vLLM's ngram speculative decoding (`rollout.speculative=ngram`)
  serves rollouts with logprobs, and its greedy tokens are transformers' greedy tokens.
"""
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
NEW = 32


@pytest.fixture(scope="module")
def real():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.mtp import gsm_prompts
    from launch.models import ensure_model

    path = ensure_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = gsm_prompts(tok, 2)
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
               for p in prompts]
    return path, tok, model, prompts, ref


def test_greedy_multi_token_decoding_equals_plain_greedy(real):
    import torch

    from actors.drafts import SuffixDraft
    from actors.mtp import MaskProbe, decode

    _, tok, model, prompts, ref = real
    gen = torch.Generator().manual_seed(0)
    calls = 0
    for p, want in zip(prompts, ref):
        earlier = [p + decode(model, p, max_new_tokens=NEW, temperature=1.0, generator=gen)[0] for _ in range(1)]
        for prop in (MaskProbe(k=4, top_k=3, max_nodes=12), SuffixDraft(earlier + [p + want[:16]])):
            out, st = decode(model, p, max_new_tokens=NEW, proposer=prop, eos_token_id=tok.eos_token_id)
            assert out == want[:len(out)] and (len(out) == NEW or out[-1] == tok.eos_token_id), type(prop).__name__
            assert st.new_tokens == len(out) and st.calls <= st.new_tokens
            calls += st.calls
    assert calls < sum(2 * len(r) for r in ref)  # some drafts were accepted (the store held 16 tokens of each answer)


def test_rollout_actor_with_vllm_ngram_speculation(real):
    from actors.rollout_worker import RolloutWorker
    from launch.config import load_config
    from protocol.messages import RolloutRequest

    path, tok, _, prompts, ref = real
    cfg = load_config("configs/smollm2_gsm.yaml", ["rollout.speculative=ngram", f"task.max_new_tokens={NEW}"])
    w = RolloutWorker(model_dir=path, rollout_cfg=cfg.rollout, task_cfg=cfg.task, actor_id=0, seed=0)
    reqs = [RolloutRequest(request_id=i, root_id=f"r{i}", prompt_ids=p, n=1) for i, p in enumerate(prompts)]
    got = w.generate(reqs, temperature=0.0)
    assert not got.errors
    by_id = {r.request_id: r for r in got.rollouts}
    for i, want in enumerate(ref):
        r = by_id[i]
        assert r.token_ids == want[:len(r.token_ids)] and len(r.token_ids) >= min(NEW, len(want)) - 1
        assert len(r.logprobs) == len(r.token_ids)
