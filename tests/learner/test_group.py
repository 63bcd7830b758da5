"""LearnerGroup with 2 data-parallel Ray ranks (gloo on CPU) makes the same update as one in-process learner;
a rank other than 0 dying is reported as that rank's death."""
import os
import signal

import pytest
import torch

from tests.learner.conftest import learner_cfg, make_batch


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1])
def test_two_ranks_equal_one(tiny_model_dir, tmp_path, zero_stage):
    import ray
    from safetensors.torch import load

    from actors.weight_transport import payload_bytes
    from launch.cluster import actor_env_vars
    from learner.group import LearnerGroup

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        kw = dict(model_dir=tiny_model_dir, seed=0, micro_batch_size=2)
        one = LearnerGroup(learner_cfg=learner_cfg(zero_stage=zero_stage), local=True, **kw)
        two = LearnerGroup(learner_cfg=learner_cfg(zero_stage=zero_stage, world_size=2, num_cpus=1), env_vars=actor_env_vars(1), **kw)
        for _ in range(2):
            m1, m2 = one.train_step(make_batch()), two.train_step(make_batch())
            assert m2["learner/loss"] == pytest.approx(m1["learner/loss"], rel=1e-5)
            assert m2["learner/tokens"] == m1["learner/tokens"] == 8
        w1, w2 = load(ray.get(one.async_weights())), load(ray.get(two.async_weights()))
        assert all(torch.allclose(w1[k], w2[k], atol=5e-5, rtol=0) for k in w1)
        # the update and its weights in one call: the same update, and exactly the weights exported afterwards
        (m1, p1), (m2, p2) = one.train_step_and_export(make_batch()), two.train_step_and_export(make_batch())
        assert m2["learner/loss"] == pytest.approx(m1["learner/loss"], rel=1e-5) and m2["learner/version"] == 3
        e1, e2 = load(payload_bytes(ray.get(p1))), load(payload_bytes(ray.get(p2)))
        after = load(ray.get(two.async_weights()))
        assert set(e2) == set(after) and all(torch.equal(e2[k], after[k]) for k in after)
        assert not all(torch.equal(e2[k], w2[k]) for k in w2)  # the weights of update 3, not of update 2
        assert all(torch.allclose(e1[k], e2[k], atol=5e-5, rtol=0) for k in e1)
        assert two.version() == 3
        ids = [1, 5, 3, 4, 2]
        assert two.sequence_logprobs(ids) == pytest.approx(one.sequence_logprobs(ids), abs=1e-4)
        # a bad batch is rejected by every rank, checkpoints are written by all ranks together
        assert two.train_step(make_batch(behaviour=float("nan")))["learner/rejected_batches"] == 1
        path = two.save_checkpoint(str(tmp_path / "ck"), extra={"step": 3}, keep=1)
        assert os.path.isfile(os.path.join(path, "hf", "model.safetensors"))
        assert two.load_checkpoint(str(tmp_path / "ck")) == {"step": 3} and two.version() == 3
        # rank 1 killed: rank 0's all-reduce fails too, but the error names the dead rank
        from learner.group import LearnerDied

        os.kill(two.pids[1], signal.SIGKILL)
        with pytest.raises(LearnerDied, match=rf"learner rank 1 \(pid {two.pids[1]}\) died during train_step_and_export"):
            two.train_step_and_export(make_batch())
        two.shutdown()
    finally:
        ray.shutdown()
