"""Pure functions: padding, response cutting, batch schedule, label lookup, score selection."""
import math

import pytest
import torch

from rlhf_recipes import RecipeError
from rlhf_recipes.components.data import batch_indices
from rlhf_recipes.components.reward import check_rewards, label_index, select_score
from rlhf_recipes.components.rollout import cut_response, pad_batch


def test_pad_batch():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    ids, mask = pad_batch(seqs, pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch(seqs, pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("tokens, length, expected", [
    ([4, 5, 6, 7], 2, [4, 5]), ([4, 2, 6, 7], 4, [4, 2]), ([2, 2, 2], 3, [2]), ([4, 5], 9, [4, 5]),
    ([4, 9, 2, 7], 4, [4, 9]),  # an instruct model's end of turn (9) ends it as EOS (2) does
])
def test_cut_response_stops_at_length_and_first_end_token(tokens, length, expected):
    assert cut_response(torch.tensor(tokens), length, ends=[2, 9]).tolist() == expected


def test_batch_indices_is_a_pure_epoch_schedule():
    n, bs = 10, 4
    stream = [i for s in range(5) for i in batch_indices(n, bs, s, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(n, bs, 3, seed=3) == batch_indices(n, bs, 3, seed=3)
    assert batch_indices(n, bs, 0, seed=3) != batch_indices(n, bs, 0, seed=4)
    assert len(batch_indices(3, 8, 0, seed=0)) == 8  # fewer prompts than a batch: epochs repeat


def test_label_index_is_by_name():
    assert label_index({0: "POSITIVE", 1: "NEGATIVE"}, "POSITIVE") == 0
    assert label_index({0: "NEGATIVE", 1: "POSITIVE"}, "POSITIVE") == 1
    assert label_index({0: "LABEL_0"}, None) == 0
    with pytest.raises(RecipeError, match="valid labels: nothate, hate"):
        label_index({0: "nothate", 1: "hate"}, "positive")
    with pytest.raises(RecipeError, match="required"):
        label_index({0: "a", 1: "b"}, None)


def test_select_score():
    logits = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    assert select_score(logits, 1, "logit").tolist() == [3.0, 0.0]
    probs = select_score(logits, 1, "probability")
    assert torch.allclose(probs, torch.softmax(logits, -1)[:, 1])
    single = select_score(torch.tensor([[0.0], [math.log(3)]]), 0, "probability")
    assert torch.allclose(single, torch.tensor([0.5, 0.75]))


def test_check_rewards():
    assert check_rewards([1, 2.5], 2, "f") == [1.0, 2.5]
    assert check_rewards(torch.tensor([0.5]), 1, "f") == [0.5]
    assert math.isnan(check_rewards([float("nan")], 1, "f")[0])  # passed on: the loop skips the batch
    with pytest.raises(RecipeError, match="returned 1 rewards for 2 texts"):
        check_rewards([1.0], 2, "f")
    with pytest.raises(RecipeError, match="must return numbers, got 'good'"):
        check_rewards(["good"], 1, "f")
    with pytest.raises(RecipeError, match="must return a list"):
        check_rewards(3.0, 1, "f")
