"""teacher_forced_logprob on plain tensors: the right positions, the product of the probabilities."""
import math

import pytest
import torch

from learner.exact_success import teacher_forced_logprob


def _loop(logits, ids, first, horizon):
    """Reference: one factor at a time, softmax by hand."""
    out = []
    for b in range(ids.size(0)):
        p = 1.0
        for i in range(horizon):
            pos = int(first[b]) + i
            row = logits[b, pos - 1].tolist()
            z = sum(math.exp(v) for v in row)
            p *= math.exp(row[int(ids[b, pos])]) / z
        out.append(math.log(p))
    return out


def test_product_of_the_step_probabilities_at_the_answer_positions():
    # vocabulary 3; row 0: prompt [0, 1], answer [2, 1]; logits at the positions predicting the answer put
    # 1/2 and 1/4 on the right tokens; the prompt positions' logits are huge decoys (an off-by-one reads them)
    V = 3
    logits = torch.full((1, 5, V), 0.0)
    logits[0, 0] = torch.tensor([50.0, 0.0, 0.0])  # predicts position 1 (prompt): not counted
    logits[0, 1] = torch.log(torch.tensor([0.25, 0.25, 0.5]))  # predicts position 2 = answer token 2: 1/2
    logits[0, 2] = torch.log(torch.tensor([0.5, 0.25, 0.25]))  # predicts position 3 = answer token 1: 1/4
    logits[0, 3] = torch.tensor([0.0, 0.0, 50.0])  # predicts position 4 (after the horizon): not counted
    ids = torch.tensor([[0, 1, 2, 1, 0]])
    got = teacher_forced_logprob(logits, ids, torch.tensor([2]), horizon=2)
    assert got.exp().item() == pytest.approx(1 / 8)
    assert teacher_forced_logprob(logits, ids, torch.tensor([2]), horizon=1).exp().item() == pytest.approx(1 / 2)


def test_matches_a_loop_for_random_rows_with_different_answer_starts():
    g = torch.Generator().manual_seed(0)
    B, L, V, H = 6, 9, 7, 3
    logits = torch.randn(B, L, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    first = torch.tensor([1, 2, 3, 4, 5, 6])
    got = teacher_forced_logprob(logits, ids, first, H)
    assert got.shape == (B,)
    assert got.tolist() == pytest.approx(_loop(logits, ids, first, H), rel=1e-5)
    # scaled logits change the probabilities, so the values are not a constant of the shapes
    assert not torch.allclose(teacher_forced_logprob(logits * 2, ids, first, H), got)


def test_answer_outside_the_sequence_is_refused():
    logits, ids = torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="answer positions"):
        teacher_forced_logprob(logits, ids, torch.tensor([2]), horizon=3)
    with pytest.raises(ValueError, match="answer positions"):
        teacher_forced_logprob(logits, ids, torch.tensor([0]), horizon=1)


def test_trainer_exact_success_averages_the_chain_answers_probabilities():
    from actors.tasks import ChainTask
    from launch.trainer import exact_success

    task = ChainTask(horizon=3, heldout_size=4, seed=0)
    calls = []

    class Group:  # a learner group whose policy gives every held-out answer log-probability -1, -2, -3, -4
        def teacher_forced_logprob(self, token_ids, first, horizon):
            calls.append((token_ids, first, horizon))
            return [-1.0, -2.0, -3.0, -4.0]

    got = exact_success(Group(), task)
    assert got == pytest.approx(sum(math.exp(-k) for k in (1, 2, 3, 4)) / 4)
    (ids, first, horizon), = calls
    d = task.heldout_prompts()[0]
    assert horizon == 3 and first == [len(task.prompt_ids(d))] * 4  # <bos> d_1..d_3 : -> the answer starts at 5
    assert ids[0] == task.prompt_ids(d) + task.answer_ids(d)[:3] and first[0] == 5


def test_learner_teacher_forced_logprob_equals_the_sum_of_its_sequence_logprobs(tiny_model_dir):
    """The batched, padded forward pass agrees with the one-sequence scorer the weight-sync check uses."""
    from learner.learner import Learner
    from tests.learner.conftest import learner_cfg

    L = Learner(model_dir=tiny_model_dir, learner_cfg=learner_cfg(), seed=0, micro_batch_size=4)
    seqs = [[1, 5, 6, 14, 7, 8], [1, 9, 14, 4, 4, 4, 10], [1, 5, 6, 7, 14, 3, 11]]  # different lengths: padded
    first, H = [4, 3, 5], 2
    got = L.teacher_forced_logprob(seqs, first, H, batch_size=2)
    want = [sum(L.sequence_logprobs(s)[f - 1: f - 1 + H]) for s, f in zip(seqs, first)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == 3
