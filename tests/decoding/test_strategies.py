"""Hand-worked cases: each expected answer is derived in the comment next to it."""

from __future__ import annotations

import math

import pytest
import torch

from genrerank.decoding import (
    DECODERS,
    DecodedLists,
    decode,
    list_log_prob,
    register_decoder,
)
from genrerank.decoding.assignment import hungarian
from genrerank.decoding.beam import beam
from genrerank.decoding.contrastive import contrastive
from genrerank.decoding.greedy import greedy
from genrerank.decoding.sampling import sample

NEG = float("-inf")


def probs_to_log(columns: list[list[float]]) -> torch.Tensor:
    """Columns of probabilities (one list per position) -> log_probs [1, N, M]."""
    return torch.tensor(columns, dtype=torch.float32).T.log()[None]


# Candidates a, b, c (rows) x positions 0, 1 (columns).
#   pos 0: a .6  b .3  c .1        pos 1: a .9  b .06  c .04
# greedy: a at 0, then best of {b, c} at 1 -> b: log .6 + log .06 = -3.324
# optimum: b at 0, a at 1:                      log .3 + log .9  = -1.309
GREEDY_VS_OPTIMAL = probs_to_log([[0.6, 0.3, 0.1], [0.9, 0.06, 0.04]])


def test_registry_lists_all_strategies() -> None:
    assert {"greedy", "contrastive", "beam", "sample", "hungarian"} <= set(DECODERS)


def test_unknown_decoder_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known decoders.*greedy"):
        decode("nope", GREEDY_VS_OPTIMAL, None, 2)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("greedy")(greedy)


def test_decode_dispatches_to_the_registered_function() -> None:
    assert torch.equal(
        decode("greedy", GREEDY_VS_OPTIMAL, None, 2), greedy(GREEDY_VS_OPTIMAL, None, 2)
    )


def test_greedy_and_hungarian_differ_by_hand() -> None:
    g = greedy(GREEDY_VS_OPTIMAL, None, 2)
    h = hungarian(GREEDY_VS_OPTIMAL, None, 2)
    assert g.tolist() == [[0, 1]]
    assert h.tolist() == [[1, 0]]
    assert list_log_prob(GREEDY_VS_OPTIMAL, g).item() == pytest.approx(
        math.log(0.6) + math.log(0.06), abs=1e-5
    )
    assert list_log_prob(GREEDY_VS_OPTIMAL, h).item() == pytest.approx(
        math.log(0.3) + math.log(0.9), abs=1e-5
    )


def test_beam_by_hand() -> None:
    # Width 2. Step 0 keeps a (-0.51), b (-1.20). Step 1 children: (b,a) -1.309,
    # (a,b) -3.324, (a,c) -3.730, (b,c) -4.423 -> keeps (b,a), (a,b).
    out = beam(GREEDY_VS_OPTIMAL, None, 2, beam_width=2)
    assert isinstance(out, DecodedLists)
    assert out.lists.tolist() == [[[1, 0], [0, 1]]]
    expected = [math.log(0.3) + math.log(0.9), math.log(0.6) + math.log(0.06)]
    assert out.scores[0].tolist() == pytest.approx(expected, abs=1e-5)
    lists, scores = out  # unpacks like a tuple
    assert lists.shape == (1, 2, 2) and scores.shape == (1, 2)


def test_beam_marks_lists_that_do_not_exist() -> None:
    # n = m = 2: only 2 permutations, so 2 of 4 requested lists are unavailable.
    out = beam(GREEDY_VS_OPTIMAL[:, :2], None, 2, beam_width=4)
    assert out.valid.tolist() == [[True, True, False, False]]
    assert out.lists[0, 2:].eq(-1).all()
    assert out.scores[0, 2:].eq(NEG).all()
    assert sorted(map(tuple, out.lists[0, :2].tolist())) == [(0, 1), (1, 0)]


def test_beam_includes_greedy_where_plain_beam_loses_it() -> None:
    # Items a b e x y (rows), 4 positions; logits (columns are log-softmaxed, which shifts
    # every full list by the same constant). Width 2:
    #  t0: a 0, b -.1             -> beams a (0), b (-.1)
    #  t1: a .2, e 0              -> (b,a) .1, (a,e) 0            [greedy prefix (a,e) kept]
    #  t2: e .5, x 0, y -.5       -> (b,a,e) .6, (b,a,x) .1 beat (a,e,x) 0: greedy prefix lost
    #  t3: b 10, x -9             -> both beams hold b: best (b,a,e,x) -8.4; greedy (a,e,x,b) 10.
    low = -10.0
    logits = torch.tensor(
        [
            # t0    t1    t2    t3
            [0.0, 0.2, low, low],  # a
            [-0.1, low, low, 10.0],  # b
            [low, 0.0, 0.5, low],  # e
            [low, low, 0.0, -9.0],  # x
            [low, low, -0.5, low],  # y
        ]
    )[None]
    lp = logits.log_softmax(1)
    g = greedy(lp, None, 4)
    assert g.tolist() == [[0, 2, 3, 1]]
    plain = beam(lp, None, 4, beam_width=2, include_greedy=False)
    assert plain.lists[0, 0].tolist() == [1, 0, 2, 3]
    assert plain.scores[0, 0] < list_log_prob(lp, g)[0]
    merged = beam(lp, None, 4, beam_width=2)
    assert merged.lists[0, 0].tolist() == [0, 2, 3, 1]
    assert merged.lists[0, 1].tolist() == [1, 0, 2, 3]  # greedy replaced the worst list
    assert merged.scores[0, 0] == pytest.approx(list_log_prob(lp, g)[0].item())


def test_padding_is_never_chosen_even_if_most_likely() -> None:
    # Candidate 1 is padded but holds probability ~1 everywhere.
    lp = torch.tensor([[[-5.0, -5.0], [0.0, 0.0], [-1.0, -2.0], [-2.0, -1.0]]])
    mask = torch.tensor([[True, False, True, True]])
    h = torch.eye(4)[None]
    assert greedy(lp, mask, 2).tolist() == [[2, 3]]
    assert hungarian(lp, mask, 2).tolist() == [[2, 3]]
    assert contrastive(lp, mask, 2, item_repr=h).tolist() == [[2, 3]]
    assert beam(lp, mask, 2, beam_width=3).lists[0, 0].tolist() == [2, 3]
    drawn = sample(lp, mask, 2, k=6, seed=0)
    assert not (drawn.lists == 1).any()


def test_short_requests_and_variable_lengths() -> None:
    # Request 0: 3 real candidates, length 2. Request 1: 1 real candidate, length 3.
    lp = torch.tensor(
        [
            [[-0.1, -3.0, -3.0], [-2.0, -0.2, -3.0], [-3.0, -3.0, -0.1]],
            [[-9.0, -9.0, -9.0], [0.0, 0.0, 0.0], [-9.0, -9.0, -9.0]],
        ]
    )
    mask = torch.tensor([[True, True, True], [False, True, False]])
    lengths = torch.tensor([2, 3])
    expected = [[0, 1, -1], [1, -1, -1]]
    assert greedy(lp, mask, lengths).tolist() == expected
    assert hungarian(lp, mask, lengths).tolist() == expected
    assert (
        contrastive(lp, mask, lengths, item_repr=torch.eye(3).expand(2, 3, 3)).tolist() == expected
    )
    assert beam(lp, mask, lengths, beam_width=1).lists[:, 0].tolist() == expected
    # An int length gives width m; a tensor gives width M.
    assert greedy(lp, mask, 1).tolist() == [[0], [1]]
    assert greedy(lp, mask, torch.tensor([0, 0])).tolist() == [[-1] * 3] * 2


def test_empty_list_is_one_available_list() -> None:
    out = beam(GREEDY_VS_OPTIMAL, None, torch.tensor([0]), beam_width=3)
    assert out.valid.tolist() == [[True, False, False]]
    assert out.scores[0, 0].item() == 0.0
    drawn = sample(GREEDY_VS_OPTIMAL, None, 0, k=3, seed=0)
    assert drawn.lists.shape == (1, 3, 0)
    assert drawn.valid.tolist() == [[True, False, False]]


# Contrastive: candidates 0 and 1 are near-duplicates (cos ~ 0.99995), 2 is orthogonal.
#   pos 0: p = .5 .3 .2   -> item 0 (penalty is 0 at t = 0)
#   pos 1: p = .2 .45 .35 -> greedy: item 1.
#   alpha .6: item 1: .4 * .45 - .6 * .99995 = -.42; item 2: .4 * .35 - 0 = .14 -> item 2.
#   alpha .01: item 1: .99 * .45 - .01 * .99995 = .4355; item 2: .99 * .35 = .3465 -> item 1.
NEAR_DUP_LP = probs_to_log([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35]])
NEAR_DUP_REPR = torch.tensor([[[1.0, 0.0], [0.99, 0.01], [0.0, 1.0]]])


def test_contrastive_skips_the_near_duplicate() -> None:
    assert greedy(NEAR_DUP_LP, None, 2).tolist() == [[0, 1]]
    assert contrastive(NEAR_DUP_LP, None, 2, item_repr=NEAR_DUP_REPR).tolist() == [[0, 2]]
    assert contrastive(NEAR_DUP_LP, None, 2, item_repr=NEAR_DUP_REPR, alpha=0.01).tolist() == [
        [0, 1]
    ]
    assert contrastive(NEAR_DUP_LP, None, 2, item_repr=NEAR_DUP_REPR, alpha=0.0).tolist() == [
        [0, 1]
    ]
    assert decode("contrastive", NEAR_DUP_LP, None, 2, item_repr=NEAR_DUP_REPR).tolist() == [[0, 2]]


def test_contrastive_uses_probabilities_not_log_probabilities() -> None:
    # alpha .5 (scores halved): pos 0 p = .9 .05 .05 -> item 0. cos(h1, h0) = .6, cos(h2, h0) = 0.
    # pos 1 p = .45 .5 .05: probabilities: item 1 .5*.5 - .5*.6 = -.05, item 2 .5*.05 = .025 -> 2.
    # (log-probabilities would give item 1: .5 log .5 - .3 = -.65 > .5 log .05 = -1.50.)
    lp = probs_to_log([[0.9, 0.05, 0.05], [0.45, 0.5, 0.05]])
    h = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    assert contrastive(lp, None, 2, item_repr=h, alpha=0.5).tolist() == [[0, 2]]


def test_contrastive_penalty_is_max_over_all_earlier_items() -> None:
    # Items 0, 1 orthogonal; item 2 duplicates item 0, item 3 is orthogonal to both... nearly.
    # pos 0 -> 0 (p .7); pos 1 -> 1 (p .6, no similarity to 0); pos 2: item 2 has p .6 but
    # cos with item 0 (chosen two steps back) = 1 -> alpha .6 picks item 3 (p .3, cos 0).
    lp = probs_to_log([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.05, 0.05, 0.6, 0.3]])
    h = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert greedy(lp, None, 3).tolist() == [[0, 1, 2]]
    assert contrastive(lp, None, 3, item_repr=h).tolist() == [[0, 1, 3]]


def test_contrastive_tolerates_junk_in_padded_representations() -> None:
    h = NEAR_DUP_REPR.clone()
    h[0, 1] = float("nan")
    mask = torch.tensor([[True, False, True]])
    assert contrastive(NEAR_DUP_LP, mask, 2, item_repr=h).tolist() == [[0, 2]]


def test_sample_n_equals_m_equals_one_has_one_list() -> None:
    lp = torch.zeros(1, 1, 1)
    out = sample(lp, None, 1, k=3, seed=0)
    assert out.lists.tolist() == [[[0], [-1], [-1]]]
    assert out.valid.tolist() == [[True, False, False]]
    assert out.scores[0, 0].item() == 0.0 and out.scores[0, 1:].eq(NEG).all()


def test_sample_returns_all_permutations_when_k_exceeds_them() -> None:
    # n = 3, m = 2: 6 ordered lists exist; k = 8 gets all 6 (flat distribution), 2 missing.
    lp = torch.full((1, 3, 2), math.log(1 / 3))
    out = sample(lp, None, 2, k=8, seed=3)
    got = {
        tuple(x) for x, ok in zip(out.lists[0].tolist(), out.valid[0].tolist(), strict=True) if ok
    }
    assert got == {(i, j) for i in range(3) for j in range(3) if i != j}
    assert out.valid.sum().item() == 6


def test_sample_frequencies_follow_temperature_and_top_k() -> None:
    # 4000 identical requests, 1 list each: the first item's frequency estimates p ** (1/T)
    # renormalised; top_k = 2 removes the third candidate entirely.
    p = torch.tensor([0.5, 0.3, 0.2])
    lp = p.log()[None, :, None].expand(4000, 3, 1).contiguous()
    n = lp.shape[0]
    for temperature, top_k in [(1.0, None), (0.5, None), (1.0, 2)]:
        out = sample(lp, None, 1, k=1, temperature=temperature, top_k=top_k, seed=11)
        freq = torch.bincount(out.lists[:, 0, 0], minlength=3).float() / n
        target = p ** (1 / temperature)
        if top_k is not None:
            target[top_k:] = 0.0
        target = target / target.sum()
        tol = 4 * torch.sqrt(target * (1 - target) / n) + 1e-6
        assert ((freq - target).abs() <= tol).all(), (temperature, top_k, freq, target)


def test_sample_top_k_one_is_greedy() -> None:
    lp = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    out = sample(lp, None, 3, k=2, top_k=1, seed=0)
    assert torch.equal(out.lists[:, 0], greedy(lp, None, 3))
    assert not out.valid[:, 1].any()  # only one list is reachable with top_k = 1


def test_sample_seed_and_generator() -> None:
    lp = torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(1)).log_softmax(1)
    a = sample(lp, None, 3, k=3, seed=5)
    b = sample(lp, None, 3, k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.lists, b.lists) and torch.equal(a.scores, b.scores)


def test_scores_are_list_log_probs_sorted_best_first() -> None:
    lp = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(2)).log_softmax(1)
    for out in (beam(lp, None, 4, beam_width=5), sample(lp, None, 4, k=5, seed=0)):
        assert torch.allclose(out.scores, list_log_prob(lp, out.lists))
        assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()


def test_minus_inf_log_probs_of_real_candidates_stay_finite() -> None:
    # Every real candidate is impossible at position 1: decoders still fill it, scores finite.
    lp = torch.tensor([[[-0.1, NEG], [-2.0, NEG], [-3.0, NEG]]])
    assert greedy(lp, None, 2).tolist() == [[0, 1]]
    out = beam(lp, None, 2, beam_width=2)
    assert out.valid.all() and torch.isfinite(out.scores).all()
    assert hungarian(lp, None, 2)[0, 0].item() == 0


def test_outputs_do_not_track_gradients() -> None:
    lp = torch.randn(2, 5, 3, requires_grad=True)
    out = beam(lp.log_softmax(1), None, 3, beam_width=2)
    assert not out.scores.requires_grad
    assert greedy(lp.log_softmax(1), None, 3).dtype == torch.long


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: greedy(torch.zeros(2, 3), None, 1), r"\[B, N, M\]"),
        (lambda: greedy(torch.zeros(1, 3, 2), None, 3), "list_length"),
        (lambda: greedy(torch.zeros(1, 3, 2), None, torch.tensor([3])), "list_length"),
        (lambda: greedy(torch.zeros(1, 3, 2), torch.ones(1, 2, dtype=torch.bool), 1), "mask"),
        (
            lambda: contrastive(
                torch.zeros(1, 3, 2), None, 1, item_repr=torch.zeros(1, 3, 2), alpha=1.5
            ),
            "alpha",
        ),
        (
            lambda: contrastive(torch.zeros(1, 3, 2), None, 1, item_repr=torch.zeros(1, 2, 2)),
            "item_repr",
        ),
        (lambda: beam(torch.zeros(1, 3, 2), None, 1, beam_width=2, k=3), "k must"),
        (lambda: sample(torch.zeros(1, 3, 2), None, 1, temperature=0.0), "temperature"),
        (lambda: sample(torch.zeros(1, 3, 2), None, 1, top_k=0), "top_k"),
    ],
)
def test_invalid_arguments_raise(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_list_keys_are_exact_across_chunks() -> None:
    from genrerank.decoding.sampling import _list_keys

    # n = 500 packs 6 positions per int64 chunk, so m = 50 needs 9 chunks.
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(500, generator=gen)[:50] for _ in range(3)])
    b = a.clone()
    b[1, 49] = (b[1, 49] + 1) % 500  # differs only in the last position
    b[2, 49] = -1
    keys_a, keys_b = _list_keys(a, 500), _list_keys(b, 500)
    assert keys_a.shape == (3, 9)
    assert (keys_a == keys_b).all(-1).tolist() == [True, False, False]


def test_sample_long_lists_over_many_candidates_are_distinct() -> None:
    # n = 200 packs 8 positions per key chunk: m = 40 exercises 5 chunks.
    lp = torch.randn(2, 200, 40, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    out = sample(lp, None, 40, k=4, seed=0)
    assert out.valid.all()
    for r in range(2):
        assert len({tuple(x) for x in out.lists[r].tolist()}) == 4


def test_sample_stops_after_max_draws_on_a_peaked_distribution() -> None:
    # One candidate per position holds all the mass: only one list is ever drawn.
    lp = torch.full((1, 4, 2), -200.0)
    lp[0, 0, 0] = lp[0, 1, 1] = 0.0
    out = sample(lp, None, 2, k=3, seed=0, max_draws=12)
    assert out.lists[0, 0].tolist() == [0, 1]
    assert out.valid.tolist() == [[True, False, False]]
