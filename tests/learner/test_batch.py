import torch

from protocol.messages import Rollout
from learner.batch import build_train_batch, collate, token_logprobs


def ro(rid, prefix, toks, reward):
    return Rollout(request_id=rid, root_id="r", prompt_ids=[1, 5], prefix_ids=prefix, token_ids=toks,
                   logprobs=[-0.5] * len(toks), entropy=[0.0] * len(toks), top1_logprobs=[0.0] * len(toks),
                   alt_token_ids=[-1] * len(toks), alt_logprobs=[-1e9] * len(toks),
                   reward=reward, policy_version=0, actor_id=0)


def test_context_tokens_are_masked_and_groups_follow_requests():
    rs = [ro(0, [], [4, 6, 2], 1.0), ro(0, [], [4, 7, 2], 0.0), ro(1, [4, 6], [3], 1.0), ro(1, [4, 6], [9], 1.0)]
    b = build_train_batch(rs, advantage="group", nudge=0.0)
    assert b.advantages == [0.5, -0.5, 0.0, 0.0]
    t = collate(b, pad_id=0)
    assert t["mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert t["input_ids"][2].tolist() == [1, 5, 4, 6, 3]
    assert t["cont_index"][2, 0] == 4  # only the new token is trained on


def test_token_logprobs_picks_the_next_token():
    V = 6
    logits = torch.randn(1, 4, V)
    ids = torch.tensor([[1, 2, 3, 4]])
    lp = token_logprobs(logits, ids, torch.tensor([[2, 3]]))
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(lp, torch.stack([full[0, 1, 3], full[0, 2, 4]]).unsqueeze(0))


def test_token_logprobs_of_kept_last_positions_equal_the_full_logits():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 5), torch.randint(0, 5, (2, 6))
    cont = torch.tensor([[3, 4, 5], [4, 5, 0]])  # shortest context: 3 tokens; row 1 padded
    full = token_logprobs(logits, ids, cont)
    kept = token_logprobs(logits[:, 2:], ids, cont, offset=2)  # the logits from position 2 = context 3 - 1 on
    assert torch.allclose(kept[0], full[0]) and torch.allclose(kept[1, :2], full[1, :2])
