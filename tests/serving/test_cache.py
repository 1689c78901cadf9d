"""ItemEmbeddingCache: LRU order, counters, fingerprints (never stale), model versions, and the
byte bound (the cache's own byte accounting, checked against what tracemalloc sees)."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from genrerank.serving.cache import (
    DEFAULT_CACHE_BYTES,
    ENTRY_OVERHEAD_BYTES,
    ItemEmbeddingCache,
    entry_bytes,
)

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


def _size(key: str) -> int:
    """What an entry for ``key`` weighs (the cache stores a copy of the vector that owns its
    data, which ``sys.getsizeof`` counts; a view's data would not be)."""
    return entry_bytes(key, _fp(0), np.zeros(DIM, np.float32))


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
        "bytes": 0.0,
        "capacity_bytes": float(DEFAULT_CACHE_BYTES),
        "hit_rate": 0.0,
    }
    _, missing = _get(cache, "a", "b", "c")
    assert missing == [0, 1, 2]
    _put(cache, "a", 1.0)
    _put(cache, "b", 2.0)
    out, missing = _get(cache, "a", "x", "b", "c")
    assert missing == [1, 3]
    np.testing.assert_array_equal(out, [[1, -1], [0, 0], [2, -2], [0, 0]])
    two = 2 * _size("a")  # "a" and "b": same sizes
    assert cache.stats() == {
        "hits": 2.0,
        "misses": 5.0,
        "size": 2.0,
        "capacity": 10.0,
        "bytes": float(two),
        "capacity_bytes": float(DEFAULT_CACHE_BYTES),
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
    with pytest.raises(ValueError, match="byte bound must be >= 0"):
        ItemEmbeddingCache(10, max_bytes=-1)


def test_byte_bound_zero_caches_nothing() -> None:
    cache = ItemEmbeddingCache(10, "v1", max_bytes=0)
    _put(cache, "a", 1.0)
    assert len(cache) == 0 and cache.nbytes == 0
    assert _get(cache, "a")[1] == [0]


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


# --------------------------------------------------------------------------- the byte bound


def _stored_bytes(cache: ItemEmbeddingCache) -> int:
    """What the entries now in the cache weigh, recomputed from scratch."""
    return sum(entry_bytes(key, fp, vec) for key, (fp, vec, _) in cache._entries.items())


def test_entry_bytes_counts_key_fingerprint_vector_and_overhead() -> None:
    small = _size("a")
    # Each extra character of an ASCII id is one byte; each float32 of the vector four.
    assert _size("a" * 1001) == small + 1000
    assert entry_bytes("a", _fp(0), np.zeros(DIM + 10, np.float32)) == small + 40
    # A 4-byte character makes the whole id 4 bytes per character (CPython's compact strings).
    assert _size("\U0001f600" * 100) > small + 300
    assert small > ENTRY_OVERHEAD_BYTES + 8 + 2 * 4  # at least overhead + fingerprint + vector


def test_byte_bound_holds_under_many_long_unique_ids() -> None:
    """The reported attack: requests of 60 unique 50 KB ids. The item bound (huge here) never
    binds; the byte bound does, after every request."""
    bound = 1_000_000
    cache = ItemEmbeddingCache(10**9, "v1", max_bytes=bound)
    dim = 16
    one = entry_bytes("x" * 50_000, _fp(0), np.zeros(dim, np.float32))
    for request in range(100):
        ids = [f"{request}-{j}-".ljust(50_000, "x") for j in range(60)]
        _, missing = cache.get_many(ids, [_fp(0)] * 60, dim)
        assert missing == list(range(60))  # unique ids: all misses
        cache.put_many(ids, [_fp(0)] * 60, np.ones((60, dim), np.float32))
        assert cache.nbytes <= bound
        assert cache.nbytes == _stored_bytes(cache)  # the running count never drifts
    # Full, not merely small: the bound is used up to less than one entry.
    assert bound - one < cache.nbytes <= bound
    assert len(cache) == bound // one
    stats = cache.stats()
    assert stats["bytes"] == cache.nbytes and stats["capacity_bytes"] == bound
    # The survivors are the most recent ones, the last request's last ids.
    assert cache.lru_order() == [f"99-{j}-".ljust(50_000, "x") for j in range(60 - len(cache), 60)]


def test_byte_accounting_covers_the_memory_the_cache_keeps() -> None:
    """The cache's byte count against the memory tracemalloc sees it hold (ids created here and
    referenced only by the cache): never below it, and not wildly above (a useful bound)."""
    for id_length, dim in ((8, 16), (300, 64), (20_000, 16)):
        cache = ItemEmbeddingCache(10**9, "v1", max_bytes=4_000_000)
        fp = _fp(0)
        vectors = np.random.default_rng(0).random((60, dim), dtype=np.float32)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for request in range(200):  # past the bound: the steady state, with evictions
                ids = [f"{request}-{j}-".ljust(id_length, "k") for j in range(60)]
                cache.put_many(ids, [bytes(fp) for _ in ids], vectors)
                del ids
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert cache.nbytes >= 4_000_000 - entry_bytes("k" * id_length, fp, vectors[0])
        assert held <= cache.nbytes <= 1.5 * held, (id_length, dim, held, cache.nbytes)


def test_byte_bound_evicts_least_recently_used_first() -> None:
    key_size = {k: _size(k) for k in ("a", "b", "c", "d")}
    # Room for exactly three one-letter entries.
    cache = ItemEmbeddingCache(100, "v1", max_bytes=3 * key_size["a"])
    for value, key in enumerate("abc", start=1):
        _put(cache, key, value)
    assert cache.lru_order() == ["a", "b", "c"] and cache.nbytes == 3 * key_size["a"]
    assert _hit(cache, "a")  # -> b, c, a
    _put(cache, "d", 4.0)  # over the byte bound: b goes
    assert cache.lru_order() == ["c", "a", "d"]
    # A long id takes the room of two short ones: the two least recent go (c, then a).
    long_id = "e" * (key_size["a"] - ENTRY_OVERHEAD_BYTES)
    assert 2 * key_size["a"] > _size(long_id) > key_size["a"]
    _put(cache, long_id, 5.0)
    assert cache.lru_order() == ["d", long_id]
    assert cache.nbytes == _stored_bytes(cache) <= cache.max_bytes
    out, missing = _get(cache, "d", long_id, "a")
    assert missing == [2]
    np.testing.assert_array_equal(out, [[4, -4], [5, -5], [0, 0]])


def test_an_entry_larger_than_the_whole_bound_is_not_cached_and_evicts_nothing() -> None:
    cache = ItemEmbeddingCache(100, "v1", max_bytes=2_000)
    _put(cache, "a", 1.0)
    _put(cache, "huge" * 1000, 2.0)
    assert cache.lru_order() == ["a"] and _hit(cache, "a")
    assert cache.nbytes == _stored_bytes(cache)


def test_replacing_an_entry_and_binding_keep_the_byte_count_exact() -> None:
    cache = ItemEmbeddingCache(100, "v1", max_bytes=10_000)
    _put(cache, "a", 1.0, tag=1)
    first = cache.nbytes
    _put(cache, "a", 2.0, tag=2)  # changed features: replaced, not counted twice
    assert len(cache) == 1 and cache.nbytes == first == _stored_bytes(cache)
    cache.put_many(["b", "c"], [_fp(0), _fp(0)], np.ones((2, DIM), np.float32))
    assert cache.nbytes == _stored_bytes(cache)
    cache.bind("v2")
    assert cache.nbytes == 0 and len(cache) == 0 and cache.stats()["bytes"] == 0.0


def test_item_and_byte_bounds_both_hold() -> None:
    size = _size("a")
    cache = ItemEmbeddingCache(2, "v1", max_bytes=10 * size)  # the item bound binds here
    cache.put_many(list("abcd"), [_fp(0)] * 4, np.zeros((4, DIM), np.float32))
    assert cache.lru_order() == ["c", "d"] and cache.nbytes == 2 * size
