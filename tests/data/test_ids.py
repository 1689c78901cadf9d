"""Stable item-id hashes: the same in every process, hand-checked against CRC-32."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from genrerank.data.ids import hash_item_id, hash_item_ids


def test_hash_is_crc32_masked_to_31_bits() -> None:
    assert hash_item_id("v367") == zlib.crc32(b"v367") & 0x7FFFFFFF
    assert hash_item_id("") == 0
    # Non-ASCII ids hash their UTF-8 bytes.
    assert hash_item_id("caf\u00e9") == zlib.crc32("caf\u00e9".encode()) & 0x7FFFFFFF


def test_many_ids_match_one_by_one_in_any_container() -> None:
    ids = ["a", "b", "a", "item-42", "b", "\u00e9"]
    want = np.array([hash_item_id(s) for s in ids], dtype=np.int64)
    for given in (ids, pa.array(ids), pa.chunked_array([ids[:2], ids[2:]])):
        got = hash_item_ids(given)
        assert got.dtype == np.int64 and np.array_equal(got, want)
    assert hash_item_ids([]).shape == (0,)
    assert (want >= 0).all() and (want < 2**31).all()
