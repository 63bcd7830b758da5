"""A tiny random Llama (vocab 15) saved once per session, and learner configs; no base-model build needed."""
import dataclasses

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def learner_cfg(**over):
    """launch.config.LearnerConfig with the tests' lr 1e-2 and kl_coef 0.05 (visible in a few steps), then `over`."""
    from launch.config import LearnerConfig

    return dataclasses.replace(LearnerConfig(lr=1e-2, kl_coef=0.05), **over)


def make_batch(behaviour=-2.0, adv=(0.5, -0.5, 0.5, -0.5)):
    from learner.batch import TrainBatch

    return TrainBatch(context_ids=[[1, 5], [1, 5], [1, 6, 7], [1, 6, 7]], token_ids=[[3, 4], [3, 9], [2], [8, 8, 8]],
                      behaviour_logprobs=[[behaviour] * 2, [behaviour] * 2, [behaviour], [behaviour] * 3],
                      advantages=list(adv), versions=[0] * 4, rewards=[1.0, 0.0, 1.0, 0.0], group_ids=[0, 0, 1, 1],
                      forced=[False, False, True, True])
