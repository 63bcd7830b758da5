"""The DeepSpeed learner in-process (world size 1, gloo on CPU): bad input, NaN skip, configs, EMA, checkpoints."""
import math
import os

import pytest
import torch

from learner.schedule import lr_factor
from tests.learner.conftest import learner_cfg, make_batch


def new_learner(model_dir, **over):
    from learner.learner import Learner

    return Learner(model_dir=model_dir, learner_cfg=learner_cfg(**over), seed=0, micro_batch_size=4)


def weights(learner):
    return {k: v.clone() for k, v in learner.state_dict().items()}


def same(a, b, atol=0.0):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_lr_schedules_by_hand():
    kw = dict(warmup_steps=2, decay_steps=4, min_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(4, schedule="linear", **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(4, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        lr_factor(0, schedule="step", **kw)


def test_bad_input_rejected_and_nan_step_skipped_with_weights_unchanged(tiny_model_dir):
    L = new_learner(tiny_model_dir)
    w0 = weights(L)
    m = L.train_step(make_batch(behaviour=float("nan")))
    assert m["learner/rejected_batches"] == 1 and L.version == 0
    m = L.train_step(make_batch(adv=(0.5, float("inf"), 0.0, 0.0)))
    assert m["learner/rejected_batches"] == 2
    # finite input whose loss is NaN: ratio exp(logp + 1e30) = inf times advantage 0
    m = L.train_step(make_batch(behaviour=-1e30, adv=(0.0, 0.0, 0.0, 0.0)))
    assert m["learner/skipped_steps"] == 1 and L.version == 0
    assert same(w0, weights(L))
    m = L.train_step(make_batch())  # a good batch still trains
    assert m["learner/version"] == 1 and math.isfinite(m["learner/loss"]) and not same(w0, weights(L))


def test_a_finite_loss_with_non_finite_gradients_counts_as_a_skipped_step(tiny_model_dir):
    # KL in the reward (the default): a behaviour logprob of -1e30 makes the shaped reward huge but finite, the loss
    # finite and its gradients infinite; DeepSpeed leaves the weights alone and the learner must say so
    L = new_learner(tiny_model_dir)
    w0 = weights(L)
    bad = make_batch()
    bad.behaviour_logprobs[1] = [-1e30] * len(bad.behaviour_logprobs[1])
    m = L.train_step(bad)
    assert m["learner/skipped_steps"] == 1 and m["learner/version"] == 0 and L.version == 0
    assert same(w0, weights(L))
    assert L.train_step(make_batch())["learner/version"] == 1 and not same(w0, weights(L))


def test_nan_skip_with_grad_accumulation_leaves_weights_and_optimizer_unchanged(tiny_model_dir):
    # the NaN comes from the batch's advantage 0 times an infinite ratio: KL in the loss keeps the given advantages
    # (kl_mode=reward, the default, recomputes them from the shaped rewards)
    L = new_learner(tiny_model_dir, grad_accum_steps=2, kl_mode="loss")
    L.train_step(make_batch())
    w1 = weights(L)
    bad = make_batch(adv=(0.5, -0.5, 0.0, 0.0))
    bad.behaviour_logprobs[3] = [-1e30] * 3  # only the second micro-batch goes NaN
    assert L.train_step(bad)["learner/skipped_steps"] == 1
    assert same(w1, weights(L))
    # the next good step equals the one a learner without the skipped step makes
    L.train_step(make_batch())
    R = new_learner(tiny_model_dir, grad_accum_steps=2, kl_mode="loss")
    R.train_step(make_batch())
    R.train_step(make_batch())
    assert same(weights(L), weights(R), atol=1e-7)


def test_grad_accumulation_and_zero3_equal_the_full_batch_update(tiny_model_dir):
    A = new_learner(tiny_model_dir, zero_stage=0)
    B = new_learner(tiny_model_dir, zero_stage=3, grad_accum_steps=3)
    for _ in range(2):
        ma, mb = A.train_step(make_batch()), B.train_step(make_batch())
        assert mb["learner/loss"] == pytest.approx(ma["learner/loss"], rel=1e-5)
    # Adam turns float-rounding differences of near-zero gradients into up to ~1e-3 of a step (lr 1e-2)
    assert same(weights(A), weights(B), atol=5e-5)


def test_ema_reference_and_kl_in_reward(tiny_model_dir):
    L = new_learner(tiny_model_dir, ref_ema=0.25, kl_mode="reward", kl_estimator="k1", zero_stage=2)
    ref0 = {k: v.cpu().clone() for k, v in L.ref.state_dict().items()}  # the reference lives on the learner's device
    m = L.train_step(make_batch())
    assert m["learner/kl"] == 0.0 and math.isfinite(m["learner/loss"])  # KL is in the reward, not the loss
    w1 = weights(L)
    for k, v in L.ref.state_dict().items():
        assert torch.allclose(v.cpu(), 0.75 * ref0[k] + 0.25 * w1[k], atol=1e-6)


def test_bf16_trains(tiny_model_dir):
    L = new_learner(tiny_model_dir, dtype="bfloat16", zero_stage=1, lr_schedule="cosine", warmup_steps=1, decay_steps=2)
    ms = [L.train_step(make_batch()) for _ in range(2)]
    assert all(math.isfinite(m["learner/loss"]) for m in ms) and L.engine.module.lm_head.weight.dtype == torch.bfloat16


def test_checkpoint_exact_resume_keep_last_and_hf_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ck = str(tmp_path / "ck")
    L = new_learner(tiny_model_dir, lr_schedule="linear", decay_steps=5, ref_ema=0.1)
    L.train_step(make_batch())
    L.save_checkpoint(ck, extra={"step": 1}, keep=2)
    L.train_step(make_batch())
    path = L.save_checkpoint(ck, extra={"step": 2, "rng": [3, [1, 2], None]}, keep=2)
    L.train_step(make_batch())
    want = weights(L)
    L.save_checkpoint(ck, extra={"step": 3}, keep=2)
    assert sorted(f for f in os.listdir(ck) if f.startswith("step")) == ["step00000002", "step00000003"]  # the newest 2
    # exact resume from step 2: optimizer, scheduler, step counter, reference, RNG, data position
    R = new_learner(tiny_model_dir, lr_schedule="linear", decay_steps=5, ref_ema=0.1)
    extra = R.load_checkpoint(ck, tag="step00000002")
    assert extra == {"step": 2, "rng": [3, [1, 2], None]} and R.version == 2
    m = R.train_step(make_batch())
    assert m["learner/version"] == 3 and same(weights(R), want)
    # the HF folder loads with transformers and gives the policy's logprobs
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(path, "hf"), dtype=torch.float32)
    R2 = new_learner(tiny_model_dir)
    R2.load_checkpoint(ck, tag="step00000002")
    ids = [1, 5, 3, 4, 2]
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits, -1)[0, :-1]
    hf_lp = lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
    assert hf_lp == pytest.approx(R2.sequence_logprobs(ids), abs=1e-6)
    assert os.path.isfile(os.path.join(path, "hf", "model.safetensors"))
