"""RolloutWorker without an engine: per-request validation and error records, rollout assembly (fake vLLM)."""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import pytest

from protocol.messages import RolloutRequest
from actors.rollout_worker import Generated, RolloutWorker, StaleWeights


@dataclass
class _LP:
    logprob: float


class _Comp:
    def __init__(self, tokens, vocab):
        self.token_ids = tokens
        # top-k (k=2) plus the sampled token, like vLLM
        self.logprobs = [{t: _LP(-0.1), (t + 1) % vocab: _LP(-2.5), (t + 2) % vocab: _LP(-3.0)} for t in tokens]


class _Out:
    def __init__(self, n, vocab, cached):
        self.outputs = [_Comp([3, 4], vocab) for _ in range(n)]
        self.num_cached_tokens = cached


class FakeLLM:
    """Mimics `vllm.LLM.generate` on TokensPrompt/SamplingParams; rejects prompts containing `poison`."""

    def __init__(self, vocab=15, poison=None):
        self.vocab, self.poison, self.calls = vocab, poison, 0

    def generate(self, prompts, params, use_tqdm=False):
        self.calls += 1
        for p in prompts:
            if self.poison is not None and self.poison in p["prompt_token_ids"]:
                raise ValueError("engine rejected the prompt")
        return [_Out(sp.n, self.vocab, cached=len(p["prompt_token_ids"]) // 2) for p, sp in zip(prompts, params)]


class FakeTask:
    max_new_tokens = 5

    def reward(self, prompt_ids, continuation):
        return 1.0 if continuation[-1:] == [4] else 0.0

    def pop_verifier_errors(self):
        return 0


def make_worker(llm=None):
    w = RolloutWorker.__new__(RolloutWorker)
    w.cfg = types.SimpleNamespace(temperature=1.0, top_k_logprobs=2)
    w.actor_id, w.version, w.prompt_tokens, w.cached_tokens, w.engine_s = 7, 3, 0, 0, 0.0
    w.task, w.llm = FakeTask(), llm or FakeLLM()
    w.vocab_size, w.max_len = 15, 16
    return w


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    """`from vllm import SamplingParams, TokensPrompt` without starting anything heavy."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    mod.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", mod)


def req(i, prompt=(1, 5, 6), prefix=(), n=2):
    return RolloutRequest(request_id=i, root_id=f"r{i}", prompt_ids=list(prompt), prefix_ids=list(prefix), n=n,
                          branch_ref=100 + i)


def test_good_requests_give_n_rollouts_each_with_observations():
    w = make_worker()
    out = w.generate([req(0), req(1, prefix=[3], n=3)])
    assert isinstance(out, Generated) and out.errors == [] and out.actor_id == 7 and out.version == 3
    assert [r.request_id for r in out.rollouts] == [0, 0, 1, 1, 1]
    r = out.rollouts[0]
    assert r.token_ids == [3, 4] and r.logprobs == [-0.1, -0.1] and r.top1_logprobs == [-0.1, -0.1]
    assert r.alt_token_ids == [4, 5] and r.alt_logprobs == [-2.5, -2.5]
    assert all(e > 0 and math.isfinite(e) for e in r.entropy)
    assert r.reward == 1.0 and r.policy_version == 3 and r.actor_id == 7 and r.cached_tokens == 1
    assert w.cache_stats() == {"prompt_tokens": 7, "cached_tokens": 3}


@pytest.mark.parametrize("bad,needle", [
    (dict(n=0), "n=0"),
    (dict(n=-2), "n=-2"),
    (dict(prompt=(1, 15, 2)), "outside the vocabulary"),
    (dict(prompt=(1, -1)), "outside the vocabulary"),
    (dict(prompt=tuple([1] * 16)), "no room in the model context"),
])
def test_bad_request_is_one_error_others_are_served(bad, needle):
    w = make_worker()
    out = w.generate([req(0), req(1, **bad), req(2)])
    assert sorted({r.request_id for r in out.rollouts}) == [0, 2]
    assert len(out.rollouts) == 4
    [err] = out.errors
    assert err.request_id == 1 and err.branch_ref == 101 and err.actor_id == 7 and needle in err.message
    # the worker keeps serving
    assert len(w.generate([req(3)]).rollouts) == 2


def test_request_the_engine_rejects_fails_alone():
    w = make_worker(FakeLLM(poison=9))
    out = w.generate([req(0), req(1, prompt=(1, 9)), req(2)])
    assert sorted({r.request_id for r in out.rollouts}) == [0, 2]
    [err] = out.errors
    assert err.request_id == 1 and "engine rejected" in err.message


def test_all_bad_requests_make_no_engine_call():
    w = make_worker()
    out = w.generate([req(0, n=0)])
    assert out.rollouts == [] and len(out.errors) == 1 and w.llm.calls == 0


def test_stale_engine_refuses_to_serve():
    w = make_worker()
    with pytest.raises(StaleWeights):
        w.generate([req(0)], min_version=4)
    assert len(w.generate([req(0)], min_version=3).rollouts) == 2
