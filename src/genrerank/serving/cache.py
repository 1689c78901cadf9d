"""A bounded LRU cache of item embeddings, one model version at a time.

The item side of a model (categorical ids and static dense features -> a d-dimensional vector,
:meth:`RerankModel.item_embedding`) does not depend on the request, and the same popular items
come back in request after request, so serving computes it once per item and keeps it.

Keys are item ids. Each entry also keeps a fingerprint of the features it was computed from: a
client that sends an item with different features than last time gets a fresh vector (a miss),
never a stale one. The cache belongs to one model version; :meth:`ItemEmbeddingCache.bind` with
another version empties it, so a new model never reads the old model's vectors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

__all__ = ["ItemEmbeddingCache"]


class ItemEmbeddingCache:
    """``capacity`` items at most (0 disables caching: every lookup misses, nothing is kept)."""

    def __init__(self, capacity: int, version: str = "") -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.version = version
        self._entries: OrderedDict[str, tuple[bytes, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def bind(self, version: str) -> None:
        """Serve ``version`` from now on; a different version than before empties the cache."""
        with self._lock:
            if version != self.version:
                self._entries.clear()
                self.version = version

    def __len__(self) -> int:
        return len(self._entries)

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
        if self.capacity == 0:
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
        if self.capacity == 0:
            return
        with self._lock:
            entries = self._entries
            for key, fp, vec in zip(ids, prints, vectors, strict=True):
                entries[key] = (fp, np.array(vec, dtype=np.float32))
                entries.move_to_end(key)
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "hits": float(self.hits),
            "misses": float(self.misses),
            "size": float(len(self._entries)),
            "capacity": float(self.capacity),
            "hit_rate": self.hits / total if total else 0.0,
        }
