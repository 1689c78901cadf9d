"""Shared loader helpers: candidate order, long-tail flags, vocabularies, delimited reading."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrerank.data.loaders._common import (
    LINE,
    build_vocab,
    long_tail_flags,
    lookup,
    order_candidates,
    read_delimited,
)
from genrerank.data.schema import DataValidationError


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=6),
    st.integers(0, 2**16),
)
def test_order_candidates(scores, seed):
    lengths = np.array([len(s) for s in scores])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.asarray(s, float) for s in scores])
    perm, exposed = order_candidates(offsets, flat, seed)
    for r in range(len(lengths)):
        lo, hi = offsets[r], offsets[r + 1]
        slots = perm[lo:hi]
        assert sorted(slots) == list(range(lo, hi))  # a permutation inside the request
        assert list(flat[slots]) == sorted(flat[slots], reverse=True)  # by score
        # exposed[j] is the candidate slot of display row j.
        assert [slots[e] for e in exposed[lo:hi]] == list(range(lo, hi))


def test_long_tail_flags():
    counts = np.array([0, 1, 1, 1, 2, 3])
    # Seen counts 1 1 1 2 3: 80th percentile 2.2 -> only count 3 is in the head.
    assert long_tail_flags(counts).tolist() == [True, True, True, True, True, False]
    assert long_tail_flags(np.zeros(3)).tolist() == [True, True, True]


def test_vocab_lookup():
    vocab = build_vocab(pa.array(["b", None, "a", "b"]))
    assert vocab.to_pylist() == ["a", "b"]
    assert lookup(pa.array(["a", "b", "c", None]), vocab).tolist() == [1, 2, 0, 0]


def test_read_delimited_lines(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\tb\n1\t2.5\n\n3\t\n4\t0.5\n")
    t = read_delimited(path, {"a": pa.int64(), "b": pa.float64()}, delimiter="\t", nullable=["b"])
    assert t["a"].to_pylist() == [1, 3, 4]
    assert t[LINE].to_pylist() == [2, 4, 5]  # the blank line 3 is skipped, numbering kept
    with pytest.raises(DataValidationError, match=r"x.tsv: line 4, field 'b': empty value"):
        read_delimited(path, {"a": pa.int64(), "b": pa.float64()}, delimiter="\t")
    path.write_text("a\tb\n1\t2.5\n2\tx\n")
    with pytest.raises(DataValidationError, match=r"line 3, field 'b': 'x' is not a valid float"):
        read_delimited(path, {"a": pa.int64(), "b": pa.float64()}, delimiter="\t")
