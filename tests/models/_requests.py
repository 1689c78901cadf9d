"""Cutting a request of RerankDataset down, to build ragged (padded) batches in model tests."""

from __future__ import annotations

PER_CANDIDATE = ("item_cat", "item_dense", "item_hash", "upstream_score", "category", "creator",
                 "is_cold_start", "is_long_tail")


def shrink_request(item: dict, n: int, exposed: int = 3) -> dict:
    """The same request with only its first ``n`` candidates and at most ``exposed`` of its
    exposed items (those among the kept candidates, in display order)."""
    keep = dict(item)
    for key in PER_CANDIDATE:
        keep[key] = item[key][:n]
    shown = item["exposed"] < n
    keep["exposed"] = item["exposed"][shown][:exposed]
    keep["labels"] = {s: v[shown][:exposed] for s, v in item["labels"].items()}
    return keep
