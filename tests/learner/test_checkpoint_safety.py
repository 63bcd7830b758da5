"""Checkpoints load without running pickled code: a file holding any object but tensors and containers is refused."""
import os

import pytest
import torch

from tests.learner.conftest import learner_cfg, make_batch


class Payload:
    """Unpickling this creates a marker file: what a hostile checkpoint would do with os.system instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def new_learner(model_dir, **over):
    from learner.learner import Learner

    return Learner(model_dir=model_dir, learner_cfg=learner_cfg(**over), seed=0, micro_batch_size=4)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_checkpoint_with_pickled_object_is_refused(tiny_model_dir, tmp_path, victim):
    from learner.learner import UnsafeCheckpoint

    ck, marker = str(tmp_path / "ck"), str(tmp_path / "code_ran")
    L = new_learner(tiny_model_dir, ref_ema=0.1)
    L.train_step(make_batch())
    path = L.save_checkpoint(ck, extra={"step": 1})
    assert sorted(f for f in os.listdir(path) if not f.endswith(".pt")) == ["hf", "ref_ema.safetensors", "rng_rank0.safetensors"]
    # the untampered checkpoint loads weights-only
    assert new_learner(tiny_model_dir, ref_ema=0.1).load_checkpoint(ck) == {"step": 1}
    state = torch.load(os.path.join(path, victim), weights_only=False)  # our own file, trusted here
    state["graftrl_payload"] = Payload(marker)
    torch.save(state, os.path.join(path, victim))
    with pytest.raises(UnsafeCheckpoint, match=f"{victim}: refused to load: it holds a pickled _?io.open"):
        new_learner(tiny_model_dir, ref_ema=0.1).load_checkpoint(ck)
    assert not os.path.exists(marker)
    # the same file under an unrestricted load would have run the payload (so the check above can fail)
    torch.load(os.path.join(path, victim), weights_only=False)
    assert os.path.exists(marker)


def test_uncommitted_checkpoint_is_not_resumed(tiny_model_dir, tmp_path):
    """A checkpoint written with commit=False (the driver adds the store first) leaves `latest` on the previous one."""
    from learner.learner import commit_checkpoint, latest_tag

    ck = str(tmp_path / "ck")
    L = new_learner(tiny_model_dir)
    L.train_step(make_batch())
    L.save_checkpoint(ck, extra={"step": 1}, keep=1)
    L.train_step(make_batch())
    L.save_checkpoint(ck, extra={"step": 2}, keep=1, commit=False)  # e.g. killed before the commit
    assert latest_tag(ck) == "step00000001" and new_learner(tiny_model_dir).load_checkpoint(ck) == {"step": 1}
    commit_checkpoint(ck, "step00000002", keep=1)
    assert latest_tag(ck) == "step00000002" and [f for f in os.listdir(ck) if f.startswith("step")] == ["step00000002"]
