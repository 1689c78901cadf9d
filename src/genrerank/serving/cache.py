"""A bounded LRU cache of item embeddings, one model version at a time.

The item side of a model (categorical ids and static dense features -> a d-dimensional vector,
:meth:`RerankModel.item_embedding`) does not depend on the request, and the same popular items
come back in request after request, so serving computes it once per item and keeps it.

Keys are item ids. Each entry also keeps a fingerprint of the features it was computed from: a
client that sends an item with different features than last time gets a fresh vector (a miss),
never a stale one. The cache belongs to one model version; :meth:`ItemEmbeddingCache.bind` with
another version empties it, so a new model never reads the old model's vectors.

The cache is bounded twice, in items and in bytes, and evicts least recently used entries until
both bounds hold. The byte bound is what protects the process: ids are chosen by clients, so
an item count alone says nothing about memory (60 unique 50 KB ids per request grew a server
by 290 MB in 17 s). Bytes are counted as the memory the cache keeps alive: the key string, the
fingerprint, the vector and a fixed per-entry overhead for the containers (see
:data:`ENTRY_OVERHEAD_BYTES`).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "ENTRY_OVERHEAD_BYTES", "ItemEmbeddingCache"]

#: Default byte bound: 64 MiB holds ~90,000 entries of short ids and 64-dim vectors (~750 bytes
#: each), or ~180,000 of 16-dim ones.
DEFAULT_CACHE_BYTES = 64 * 2**20

#: Per-entry memory not visible to ``sys.getsizeof`` of the key, fingerprint and vector: the
#: ``(fingerprint, vector, size)`` tuple (64 bytes) and its size int (32), plus the OrderedDict's
#: hash-table slot and linked-list node, measured with tracemalloc on CPython 3.11 at 75-150
#: bytes per entry amortised (the high end just after a table resize); rounded up, so the count
#: errs on the safe side.
ENTRY_OVERHEAD_BYTES = 64 + 32 + 160


def entry_bytes(key: str, fingerprint: bytes, vector: np.ndarray) -> int:
    """Bytes one entry keeps alive (``vector`` must own its data: ``sys.getsizeof`` counts an
    owning array's data, not a view's)."""
    return (sys.getsizeof(key) + sys.getsizeof(fingerprint) + sys.getsizeof(vector)
            + ENTRY_OVERHEAD_BYTES)


class ItemEmbeddingCache:
    """``capacity`` items and ``max_bytes`` bytes at most (either 0 disables caching: every
    lookup misses, nothing is kept)."""

    def __init__(self, capacity: int, version: str = "",
                 max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if max_bytes < 0:
            raise ValueError(f"cache byte bound must be >= 0, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.version = version
        # id -> (fingerprint, vector, entry_bytes at insertion): the size is kept so eviction
        # subtracts exactly what was added, whatever happens to the key object meanwhile.
        self._entries: OrderedDict[str, tuple[bytes, np.ndarray, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes held now, as counted by :func:`entry_bytes`; never above ``max_bytes``."""
        return self._bytes

    def bind(self, version: str) -> None:
        """Serve ``version`` from now on; a different version than before empties the cache."""
        with self._lock:
            if version != self.version:
                self._entries.clear()
                self._bytes = 0
                self.version = version

    def __len__(self) -> int:
        return len(self._entries)

    def lru_order(self) -> list[str]:
        """The cached ids, least recently used first (the next to be evicted)."""
        with self._lock:
            return list(self._entries)

    @staticmethod
    def fingerprints(item_cat: np.ndarray, item_dense: np.ndarray) -> list[bytes]:
        """One byte string per row of the item features: equal features, equal fingerprint."""
        rows = np.concatenate([np.ascontiguousarray(item_cat, dtype=np.int64).view(np.uint8),
                               np.ascontiguousarray(item_dense, dtype=np.float32)
                               .view(np.uint8)], axis=1)
        return [row.tobytes() for row in rows]

    def get_many(self, ids: list[str], prints: list[bytes], dim: int
                 ) -> tuple[np.ndarray, list[int]]:
        """Vectors ``[n, dim]`` for ``ids`` (rows of misses are left zero) and the indices of
        the misses, which the caller computes and hands to :meth:`put_many`."""
        out = np.zeros((len(ids), dim), dtype=np.float32)
        missing: list[int] = []
        if not self.enabled:
            self.misses += len(ids)
            return out, list(range(len(ids)))
        with self._lock:
            entries = self._entries
            for i, (key, fp) in enumerate(zip(ids, prints, strict=True)):
                entry = entries.get(key)
                if entry is not None and entry[0] == fp:
                    entries.move_to_end(key)
                    out[i] = entry[1]
                else:
                    missing.append(i)
            self.hits += len(ids) - len(missing)
            self.misses += len(missing)
        return out, missing

    def put_many(self, ids: list[str], prints: list[bytes], vectors: np.ndarray) -> None:
        if not self.enabled:
            return
        with self._lock:
            entries = self._entries
            for key, fp, vec in zip(ids, prints, vectors, strict=True):
                vec = np.array(vec, dtype=np.float32)  # a copy that owns its data
                size = entry_bytes(key, fp, vec)
                old = entries.pop(key, None)
                if old is not None:
                    self._bytes -= old[2]
                if size > self.max_bytes:
                    # Kept, it would evict every other entry and then itself.
                    continue
                entries[key] = (fp, vec, size)
                self._bytes += size
            while len(entries) > self.capacity or self._bytes > self.max_bytes:
                self._bytes -= entries.popitem(last=False)[1][2]

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "hits": float(self.hits),
            "misses": float(self.misses),
            "size": float(len(self._entries)),
            "capacity": float(self.capacity),
            "bytes": float(self._bytes),
            "capacity_bytes": float(self.max_bytes),
            "hit_rate": self.hits / total if total else 0.0,
        }
