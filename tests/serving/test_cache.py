"""ItemEmbeddingCache: LRU order, counters, fingerprints (never stale), model versions."""

from __future__ import annotations

import numpy as np
import pytest

from genrerank.serving.cache import ItemEmbeddingCache

DIM = 2


def _vec(x: float) -> np.ndarray:
    return np.array([[x, -x]], dtype=np.float32)


def _fp(tag: int) -> bytes:
    """The fingerprint of a one-row item whose only categorical feature is ``tag``."""
    return ItemEmbeddingCache.fingerprints(np.array([[tag]]), np.zeros((1, 1)))[0]


def _put(cache: ItemEmbeddingCache, key: str, value: float, tag: int = 0) -> None:
    cache.put_many([key], [_fp(tag)], _vec(value))


def _get(cache: ItemEmbeddingCache, *keys: str, tag: int = 0) -> tuple[np.ndarray, list[int]]:
    return cache.get_many(list(keys), [_fp(tag)] * len(keys), DIM)


def _hit(cache: ItemEmbeddingCache, key: str, tag: int = 0) -> bool:
    return _get(cache, key, tag=tag)[1] == []


def test_lru_evicts_the_least_recently_used_item() -> None:
    cache = ItemEmbeddingCache(3, "v1")
    for value, key in enumerate("abc", start=1):
        _put(cache, key, value)
    assert len(cache) == 3
    assert _hit(cache, "a")  # order (oldest first): b, c, a
    _put(cache, "d", 4.0)  # over capacity: b goes -> c, a, d
    assert len(cache) == 3
    assert not _hit(cache, "b")
    assert _hit(cache, "c")  # -> a, d, c
    _put(cache, "e", 5.0)  # a goes -> d, c, e
    assert not _hit(cache, "a")
    out, missing = _get(cache, "d", "c", "e")
    assert missing == []
    np.testing.assert_array_equal(out, [[4, -4], [3, -3], [5, -5]])


def test_put_of_one_batch_larger_than_the_capacity_keeps_its_last_items() -> None:
    cache = ItemEmbeddingCache(2)
    keys = ["a", "b", "c", "d"]
    cache.put_many(keys, [_fp(0)] * 4, np.arange(8, dtype=np.float32).reshape(4, 2))
    assert len(cache) == 2
    out, missing = _get(cache, "a", "b", "c", "d")
    assert missing == [0, 1]
    np.testing.assert_array_equal(out, [[0, 0], [0, 0], [4, 5], [6, 7]])  # misses left zero


def test_counters_and_hit_rate() -> None:
    cache = ItemEmbeddingCache(10, "v1")
    assert cache.stats() == {
        "hits": 0.0,
        "misses": 0.0,
        "size": 0.0,
        "capacity": 10.0,
        "hit_rate": 0.0,
    }
    _, missing = _get(cache, "a", "b", "c")
    assert missing == [0, 1, 2]
    _put(cache, "a", 1.0)
    _put(cache, "b", 2.0)
    out, missing = _get(cache, "a", "x", "b", "c")
    assert missing == [1, 3]
    np.testing.assert_array_equal(out, [[1, -1], [0, 0], [2, -2], [0, 0]])
    assert cache.stats() == {
        "hits": 2.0,
        "misses": 5.0,
        "size": 2.0,
        "capacity": 10.0,
        "hit_rate": 2 / 7,
    }


def test_capacity_zero_caches_nothing() -> None:
    cache = ItemEmbeddingCache(0, "v1")
    _put(cache, "a", 1.0)
    assert len(cache) == 0
    out, missing = _get(cache, "a", "a2")
    assert missing == [0, 1]
    np.testing.assert_array_equal(out, np.zeros((2, DIM)))
    assert cache.stats()["misses"] == 2.0 and cache.stats()["hit_rate"] == 0.0


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        ItemEmbeddingCache(-1)


def test_changed_features_for_the_same_id_miss_and_replace_the_entry() -> None:
    cache = ItemEmbeddingCache(5, "v1")
    _put(cache, "a", 1.0, tag=1)
    # The client now sends other features for "a": a stale vector must not be served.
    out, missing = _get(cache, "a", tag=2)
    assert missing == [0] and not out.any()
    _put(cache, "a", 7.0, tag=2)
    assert len(cache) == 1  # replaced, not duplicated
    out, missing = _get(cache, "a", tag=2)
    assert missing == []
    np.testing.assert_array_equal(out, _vec(7.0))
    assert not _hit(cache, "a", tag=1)  # the old features' vector is gone too


def test_bind_to_another_version_empties_the_cache() -> None:
    cache = ItemEmbeddingCache(5, "v1")
    _put(cache, "a", 1.0)
    cache.bind("v1")  # same model: keep the vectors
    assert len(cache) == 1 and _hit(cache, "a")
    cache.bind("v2")  # a new model must never read the old model's vectors
    assert cache.version == "v2"
    assert len(cache) == 0 and not _hit(cache, "a")
    _put(cache, "a", 2.0)
    cache.bind("v2")
    out, missing = _get(cache, "a")
    assert missing == []
    np.testing.assert_array_equal(out, _vec(2.0))


def test_fingerprints_are_equal_iff_the_features_are() -> None:
    cat = np.array([[1, 2], [1, 2], [1, 3], [1, 2], [2, 1]])
    dense = np.array([[0.5], [0.5], [0.5], [0.25], [0.5]], dtype=np.float32)
    fps = ItemEmbeddingCache.fingerprints(cat, dense)
    assert len(fps) == 5
    assert fps[0] == fps[1]  # identical rows
    assert len({fps[0], fps[2], fps[3], fps[4]}) == 4  # one categorical, one dense, swapped cats
    # Input dtypes do not matter: the model reads int64 / float32, so that is what is compared.
    again = ItemEmbeddingCache.fingerprints(cat.astype(np.int32), dense.astype(np.float64))
    assert again == fps
    # A value that rounds to another float32 is another feature row.
    moved = ItemEmbeddingCache.fingerprints(cat[:1], np.array([[0.5 + 1e-6]], dtype=np.float32))
    assert moved[0] != fps[0]


def test_fingerprints_without_item_features() -> None:
    # A spec without item features: every row is the same (empty) feature row.
    fps = ItemEmbeddingCache.fingerprints(np.zeros((3, 0), np.int64), np.zeros((3, 0)))
    assert len(fps) == 3 and len(set(fps)) == 1
