"""The async rollout worker on vLLM's real AsyncLLM (slow, ~1.5 min on 2 cores): one `rollout.engine=async` actor
in a local Ray. After a weight push (packed buffer through the object store, as the driver does) the rollouts'
per-token logprobs and `sequence_logprobs` equal the pushed model's (Hugging Face forward, the learner's
computation) within 1e-4; rollouts have the sync worker's structure; a bad request fails alone; overlapping
calls are served."""
from __future__ import annotations

import os

import pytest

from tests.actors.local_group import local_rollout_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    with local_rollout_group(num_actors=1, engine="async") as (g, model_dir):
        yield g, model_dir


def hf_model(model_dir: str, state: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.load_state_dict(state)
    return model.eval()


def hf_logprobs(model, token_ids: list[int]) -> list[float]:
    """log pi(x_t | x_<t), t >= 1 (what Learner.sequence_logprobs computes)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([token_ids])).logits.float(), -1)[0, :-1]
    return logp.gather(-1, torch.tensor(token_ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()


def test_async_engine_rollouts_logprobs_after_a_push_and_bad_requests(setup):
    import ray
    import torch
    from safetensors.torch import load_file

    from actors.async_rollout_worker import AsyncRolloutWorker
    from protocol.messages import RolloutRequest
    from actors.tasks import make_task
    from actors.weight_transport import pack_weights
    from launch.config import TaskConfig

    group, model_dir = setup
    assert isinstance(group.actors[0], ray.actor.ActorHandle)
    assert ray.get(group.actors[0].__ray_call__.remote(lambda self: type(self).__name__)) == AsyncRolloutWorker.__name__

    # a push that really changes the policy
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    model = hf_model(model_dir, state)
    probe = [1, 3, 5, 14, 6, 9, 4, 2]
    before = group.sequence_logprobs(probe)
    group.update_weights(ray.put(pack_weights(state)), 7)
    after = group.sequence_logprobs(probe)
    want = hf_logprobs(model, probe)
    assert max(abs(a - b) for a, b in zip(before, want)) > 1e-2  # the push mattered
    assert max(abs(a - b) for a, b in zip(after, want)) < 1e-4

    # rollouts: structure, version, rewards, and each sampled token's logprob under the pushed model
    task = make_task(TaskConfig(), tokenizer_dir=model_dir)
    reqs = [RolloutRequest(request_id=i, root_id=f"r{i}", prompt_ids=[1, 3 + i % 10, 5, 14],
                           prefix_ids=[6] if i % 2 else [], n=3, branch_ref=40 + i) for i in range(8)]
    bad = [RolloutRequest(request_id=90, root_id="x", prompt_ids=[1, 99], n=2),   # outside the vocabulary
           RolloutRequest(request_id=91, root_id="y", prompt_ids=[1, 5], n=0)]    # n <= 0
    out = group.generate(reqs[:4] + bad + reqs[4:])
    assert sorted(r.request_id for r in out) == sorted([i for i in range(8)] * 3)
    errors = {e.request_id: e.message for e in group.pop_errors()}
    assert set(errors) == {90, 91} and "vocabulary" in errors[90] and "n=0" in errors[91]
    worst = 0.0
    for r in out:
        k = len(r.token_ids)
        assert k >= 1 and all(len(x) == k for x in (r.logprobs, r.entropy, r.top1_logprobs, r.alt_token_ids, r.alt_logprobs))
        assert r.policy_version == 7 and r.actor_id == 0 and r.branch_ref == 40 + r.request_id
        assert r.prefix_ids == ([6] if r.request_id % 2 else [])
        assert r.reward == task.reward(r.prompt_ids, r.prefix_ids + r.token_ids)
        assert all(t1 >= lp - 1e-6 for t1, lp in zip(r.top1_logprobs, r.logprobs)) and all(e > 0 for e in r.entropy)
        seq = r.prompt_ids + r.prefix_ids + r.token_ids
        ref = hf_logprobs(model, seq)[-k:]
        worst = max(worst, max(abs(a - b) for a, b in zip(r.logprobs, ref)))
    assert worst < 1e-4, worst

    # two overlapping calls to the one actor are both served (an async actor runs them concurrently)
    a = group.actors[0]
    refs = [a.generate.remote(reqs[:4], min_version=7), a.generate.remote(reqs[4:], min_version=7)]
    both = ray.get(refs)
    assert [len(o.rollouts) for o in both] == [12, 12] and all(o.version == 7 for o in both)
    assert len(group.generate(reqs[:2])) == 6  # still serving after all of it
