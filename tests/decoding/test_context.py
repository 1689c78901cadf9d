"""The context decoder (greedy under a learned category-transition table), by hand and against
the decoders it generalises."""

from __future__ import annotations

import pytest
import torch

from genrerank.decoding import decode
from tests.decoding.test_satiation import column


def test_complementary_category_is_pulled_up() -> None:
    lp = column([3.0, 2.8, 2.0, 0.0], 3)
    category = torch.tensor([[1, 1, 2, 2]])
    pair = torch.zeros(3, 3)
    assert decode("context", lp, None, 3, category=category, pair=pair, decay=0.5).tolist() == [
        [0, 1, 2]]
    # After category 1, category 2 gains 1.0: item 2 (2.0 + 1.0) beats item 1 (2.8); then item 3
    # gains 0.5 * 1.0 from item 0 only (2 -> 2 is 0): 0.5 + 0.0 - log-normaliser < item 1.
    pair[1, 2] = 1.0
    assert decode("context", lp, None, 3, category=category, pair=pair, decay=0.5).tolist() == [
        [0, 2, 1]]


def test_a_negative_diagonal_is_the_satiation_decoder() -> None:
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 12, 6), dim=1)
    category = torch.randint(0, 4, (5, 12))
    mask = torch.rand(5, 12) > 0.2
    for penalty, decay in ((0.3, 0.5), (1.0, 0.8)):
        want = decode("satiation", lp, mask, 6, category=category, penalty=penalty, decay=decay)
        got = decode("context", lp, mask, 6, category=category, pair=-penalty * torch.eye(4),
                     decay=decay)
        assert torch.equal(got, want)
    assert torch.equal(decode("context", lp, mask, 6, category=category,
                              pair=torch.zeros(4, 4), decay=0.5),
                       decode("greedy", lp, mask, 6))


def test_penalty_is_subtracted_from_the_learned_diagonal() -> None:
    torch.manual_seed(1)
    lp = torch.log_softmax(torch.randn(5, 12, 6), dim=1)
    category = torch.randint(0, 4, (5, 12))
    mask = torch.rand(5, 12) > 0.2
    pair = torch.randn(4, 4)
    got = decode("context", lp, mask, 6, category=category, pair=pair, decay=0.6, penalty=0.7)
    want = decode("context", lp, mask, 6, category=category, pair=pair - 0.7 * torch.eye(4),
                  decay=0.6)
    assert torch.equal(got, want)
    # By hand: a learned +0.5 for repeating category 1 keeps item 1 second without a penalty;
    # penalty 1.0 makes the repeat cost 0.5 and item 2 (other category) takes the slot.
    lp = column([3.0, 2.8, 2.5, 0.0], 3)
    category = torch.tensor([[1, 1, 2, 2]])
    pair = torch.zeros(3, 3)
    pair[1, 1] = 0.5
    assert decode("context", lp, None, 3, category=category, pair=pair,
                  decay=0.5).tolist()[0][:2] == [0, 1]
    assert decode("context", lp, None, 3, category=category, pair=pair, decay=0.5,
                  penalty=1.0).tolist()[0][:2] == [0, 2]


def test_padding_lengths_and_a_json_table() -> None:
    lp = column([3.0, 2.8, 2.0, 9.0], 3)
    mask = torch.tensor([[True, True, True, False]])
    category = torch.tensor([[1, 1, 2, 7]])  # 7 is beyond the table: clamped, and padded anyway
    out = decode("context", lp, mask, torch.tensor([2]), category=category,
                 pair=[[0.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]], decay=0.5)
    assert out.tolist() == [[0, 2, -1]]


def test_bad_options() -> None:
    lp = column([1.0, 0.0], 2)
    category = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="square"):
        decode("context", lp, None, 2, category=category, pair=torch.zeros(2, 3), decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        decode("context", lp, None, 2, category=category, pair=torch.zeros(2, 2), decay=1.5)
    with pytest.raises(ValueError, match="penalty"):
        decode("context", lp, None, 2, category=category, pair=torch.zeros(2, 2), decay=0.5,
               penalty=-1.0)
    with pytest.raises(ValueError, match="category must be"):
        decode("context", lp, None, 2, category=torch.tensor([1, 1]), pair=torch.zeros(2, 2),
               decay=0.5)
