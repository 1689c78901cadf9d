"""Property tests over random score matrices, masks and list lengths, for every decoder."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrerank.decoding import DecodedLists, decode, list_log_prob

SETTINGS = settings(deadline=None, max_examples=60, derandomize=True)


@dataclass
class Problem:
    log_probs: torch.Tensor  # [B, N, M]
    mask: torch.Tensor  # [B, N]
    list_length: int | torch.Tensor
    item_repr: torch.Tensor  # [B, N, D]
    seed: int

    @property
    def expected_lengths(self) -> list[int]:
        b = self.mask.shape[0]
        asked = (
            self.list_length.tolist()
            if isinstance(self.list_length, torch.Tensor)
            else [self.list_length] * b
        )
        return [min(a, int(v)) for a, v in zip(asked, self.mask.sum(1), strict=True)]

    @property
    def width(self) -> int:
        if isinstance(self.list_length, torch.Tensor):
            return self.log_probs.shape[2]
        return self.list_length


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    big_m = draw(st.integers(1, 5))
    rows = [draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any)) for _ in range(b)]
    mask = torch.tensor(rows, dtype=torch.bool)
    if draw(st.booleans()):
        list_length: int | torch.Tensor = torch.tensor(
            [draw(st.integers(0, big_m)) for _ in range(b)]
        )
    else:
        list_length = draw(st.integers(0, big_m))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, big_m, generator=gen) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    if draw(st.booleans()):
        logits = logits.round()  # many exact ties
    lp = logits.masked_fill(~mask[:, :, None], float("-inf")).log_softmax(1)
    # Padded slots hold junk, even "probability 1": only the mask may exclude them.
    junk = draw(st.sampled_from([float("-inf"), 0.0, float("nan"), -1e30]))
    lp = lp.masked_fill(~mask[:, :, None], junk)
    item_repr = torch.randn(b, n, draw(st.integers(1, 4)), generator=gen)
    return Problem(lp, mask, list_length, item_repr, seed)


def run_all(p: Problem) -> dict[str, torch.Tensor | DecodedLists]:
    args = (p.log_probs, p.mask, p.list_length)
    return {
        "greedy": decode("greedy", *args),
        "contrastive": decode("contrastive", *args, item_repr=p.item_repr),
        "contrastive_a0": decode("contrastive", *args, item_repr=p.item_repr, alpha=0.0),
        "contrastive_a1": decode("contrastive", *args, item_repr=p.item_repr, alpha=1.0),
        "hungarian": decode("hungarian", *args),
        "beam": decode("beam", *args, beam_width=3),
        "beam_plain": decode("beam", *args, beam_width=4, k=2, include_greedy=False),
        "sample": decode("sample", *args, k=3, seed=p.seed),
        "sample_topk": decode("sample", *args, k=4, top_k=2, temperature=0.5, seed=p.seed),
    }


def check_list(name: str, row: list[int], real: list[bool], length: int) -> None:
    head, tail = row[:length], row[length:]
    assert all(0 <= i < len(real) and real[i] for i in head), (name, row, real)
    assert len(set(head)) == length, (name, row)
    assert all(i == -1 for i in tail), (name, row, length)


def each_list(out: torch.Tensor | DecodedLists) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lists [B, m], available [B]) for every list slot of a decoder's output."""
    if isinstance(out, DecodedLists):
        return [(out.lists[:, j], out.valid[:, j]) for j in range(out.lists.shape[1])]
    return [(out, torch.ones(out.shape[0], dtype=torch.bool))]


@SETTINGS
@given(problems())
def test_every_decoder_emits_real_distinct_items_then_minus_ones(p: Problem) -> None:
    lengths = p.expected_lengths
    for name, out in run_all(p).items():
        if isinstance(out, DecodedLists):
            b, k, m = out.lists.shape
            assert (b, m) == (p.mask.shape[0], p.width) and out.scores.shape == (b, k), name
            assert out.lists.dtype == torch.long
            valid = out.valid
            assert valid[:, 0].all(), name  # a list of L_b items always exists
            # Available lists first, scores are their log-probs, best first.
            assert (valid[:, :-1] >= valid[:, 1:]).all(), name
            assert torch.allclose(
                out.scores[valid], list_log_prob(p.log_probs, out.lists)[valid]
            ), name
            assert torch.isfinite(out.scores[valid]).all(), name
            assert (out.scores[:, :-1] >= out.scores[:, 1:]).all(), name
            for r in range(b):
                rows = [out.lists[r, j].tolist() for j in range(k) if valid[r, j]]
                assert len({tuple(x) for x in rows}) == len(rows), (name, rows)  # distinct
                for x in rows:
                    check_list(name, x, p.mask[r].tolist(), lengths[r])
                assert out.lists[r][~valid[r]].eq(-1).all(), name
        else:
            assert out.shape == (p.mask.shape[0], p.width) and out.dtype == torch.long, name
            for r, row in enumerate(out.tolist()):
                check_list(name, row, p.mask[r].tolist(), lengths[r])


@SETTINGS
@given(problems())
def test_decoders_are_deterministic_given_a_seed(p: Problem) -> None:
    first, second = run_all(p), run_all(p)
    for name, out in first.items():
        again = second[name]
        if isinstance(out, DecodedLists):
            assert torch.equal(out.lists, again.lists), name
            assert torch.equal(out.scores, again.scores), name
        else:
            assert torch.equal(out, again), name
    assert torch.equal(first["contrastive_a0"], first["greedy"])


@SETTINGS
@given(problems())
def test_beam_best_beats_greedy_and_hungarian_beats_everyone(p: Problem) -> None:
    outs = run_all(p)
    score = {name: list_log_prob(p.log_probs, outs[name]) for name in ("greedy", "hungarian")}
    tol = 1e-4
    assert (outs["beam"].scores[:, 0] >= score["greedy"] - tol).all()
    best = score["hungarian"]
    for name, out in outs.items():
        for lists, available in each_list(out):
            s = list_log_prob(p.log_probs, lists)
            assert (best >= s - tol)[available].all(), name


@SETTINGS
@given(problems())
def test_hungarian_and_wide_beam_match_brute_force(p: Problem) -> None:
    hung = list_log_prob(p.log_probs, decode("hungarian", p.log_probs, p.mask, p.list_length))
    # Wide enough to be exhaustive: 7 * 6 * 5 * 4 * 3 = 2520 >= every possible list count.
    wide = decode("beam", p.log_probs, p.mask, p.list_length, beam_width=2520, k=5)
    for r, length in enumerate(p.expected_lengths):
        real = p.mask[r].nonzero().squeeze(1).tolist()
        lp = p.log_probs[r]
        totals = sorted(
            (
                sum(float(lp[i, t]) for t, i in enumerate(perm))
                for perm in itertools.permutations(real, length)
            ),
            reverse=True,
        )
        assert abs(float(hung[r]) - totals[0]) < 1e-4
        got = wide.scores[r][wide.valid[r]].tolist()
        assert len(got) == min(5, len(totals))
        assert all(abs(a - b) < 1e-4 for a, b in zip(got, totals, strict=False))
