"""The satiation decoder (greedy with a same-category penalty), by hand."""

from __future__ import annotations

import pytest
import torch

from genrerank.decoding import decode


def column(scores: list[float], m: int) -> torch.Tensor:
    """An item-scoring model's matrix: every position column the same log-softmax."""
    lp = torch.log_softmax(torch.tensor(scores), dim=0)
    return lp[None, :, None].expand(1, len(scores), m)


def test_penalty_moves_a_repeated_category_down() -> None:
    lp = column([3.0, 2.8, 2.0, 0.0], 3)
    category = torch.tensor([[1, 1, 2, 2]])
    # No penalty: the score order.
    assert decode("satiation", lp, None, 3, category=category, penalty=0.0).tolist() == [[0, 1, 2]]
    # Penalty 1: after item 0 (category 1), item 1 scores 2.8 - 1 = 1.8 < 2.0 of item 2; then
    # item 1 (satiety 0.5 * 1 = 0.5: 2.3) beats item 3 (category 2 just shown: 0 - 1 = -1).
    assert decode("satiation", lp, None, 3, category=category, penalty=1.0).tolist() == [[0, 2, 1]]


def test_padding_and_lengths() -> None:
    lp = column([3.0, 2.8, 2.0, 9.0], 3)
    mask = torch.tensor([[True, True, True, False]])
    category = torch.tensor([[1, 1, 2, 1]])
    out = decode("satiation", lp, mask, torch.tensor([2]), category=category, penalty=1.0)
    assert out.tolist() == [[0, 2, -1]]  # padded item 3 never chosen; length 2


def test_bad_options() -> None:
    lp = column([1.0, 0.0], 2)
    with pytest.raises(ValueError, match="penalty"):
        decode("satiation", lp, None, 2, category=torch.tensor([[1, 1]]), penalty=-1.0)
    with pytest.raises(ValueError, match="category must be"):
        decode("satiation", lp, None, 2, category=torch.tensor([1, 1]), penalty=1.0)
