"""The learner's weights as vLLM's `WeightSource` (what the nccl / ipc transports send), on the CPU learner.

vLLM's trainer engines size the engines' receive buffers from `metadata()` and send what iteration yields, so the
two must agree name for name, dtype for dtype, shape for shape, and without a gather for metadata under ZeRO-3.
"""
import pytest
import torch

from tests.learner.conftest import learner_cfg, make_batch


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_metadata_matches_iteration_and_iteration_is_the_state_dict(tiny_model_dir, zero_stage):
    from learner.learner import Learner

    L = Learner(model_dir=tiny_model_dir, learner_cfg=learner_cfg(zero_stage=zero_stage), seed=0, micro_batch_size=4)
    L.train_step(make_batch())
    want = L.state_dict()  # what the object-store path sends (fp32 CPU copies, gathered)
    for keep in (False, True):
        source = L.weight_source(keep=keep)
        meta = source.metadata()
        got = list(source)
        assert [(m.name, m.dtype, m.shape) for m in meta] == [(k, v.dtype, tuple(v.shape)) for k, v in got]
        assert [k for k, _ in got] == list(want)
        assert all(torch.equal(v.cpu(), want[k]) for k, v in got)
        assert list(source.groups())  # vLLM's per-layer grouping works on these names
    if zero_stage == 3:  # after the iteration the parameters are partitioned again: the clones still hold data
        kept = dict(L.weight_source(keep=True))
        assert all(torch.equal(kept[k], want[k]) for k in want)
