"""Same lists from two services: the Triton-backed one against in-process ONNX Runtime.

The request set is the export's parity set (:data:`genrerank.serving.parity.PARITY_SIZES`,
drawn by :func:`~genrerank.serving.export.synthetic_requests` with the parity check's seed), cut
into one :class:`~genrerank.serving.types.RerankInput` per request, for several list lengths.
Used by the Triton tests and the serving benchmark.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genrerank.data.schema import FeatureSpec
from genrerank.serving.export import synthetic_requests
from genrerank.serving.parity import PARITY_SIZES
from genrerank.serving.types import RerankInput, RerankService

__all__ = ["compare_services", "parity_inputs"]


def parity_inputs(spec: FeatureSpec, strategy: str, lengths: tuple[int, ...] = (1, 3, 6),
                  sizes: list[int] | None = None, seed: int = 1) -> list[RerankInput]:
    """The parity set's requests as service inputs, one per (size, list length m <= n)."""
    sizes = sizes or PARITY_SIZES
    out = []
    for m in lengths:
        req = {k: v.numpy() for k, v in synthetic_requests(spec, sizes, m, seed=seed).items()}
        for b, n in enumerate(sizes):
            if m > n:
                continue
            out.append(RerankInput(
                item_ids=[f"p{seed}-{b}-{i}" for i in range(n)],
                user_cat=req["user_cat"][b], user_dense=req["user_dense"][b],
                item_cat=req["item_cat"][b, :n], item_dense=req["item_dense"][b, :n],
                upstream_score=req["upstream_score"][b, :n], category=req["category"][b, :n],
                creator=np.zeros(n, np.int64), m=m, strategy=strategy,
                request_id=f"parity-{b}-m{m}",
                context_cat=req["context_cat"][b], context_dense=req["context_dense"][b]))
    return out


def compare_services(a: RerankService, b: RerankService, inputs: list[RerankInput],
                     atol: float = 1e-5) -> dict[str, Any]:
    """``identical_lists`` (count), ``requests``, ``max_score_diff`` and the first mismatches
    of serving ``inputs`` with ``a`` and with ``b``."""
    same, worst, mismatches = 0, 0.0, []
    for inp in inputs:
        ra, rb = a.rerank(inp), b.rerank(inp)
        if ra.item_ids == rb.item_ids:
            same += 1
            worst = max(worst, float(np.max(np.abs(np.subtract(ra.scores, rb.scores)))))
        elif len(mismatches) < 3:
            mismatches.append({"request_id": inp.request_id, "a": ra.item_ids,
                               "b": rb.item_ids})
    return {"requests": len(inputs), "identical_lists": same, "max_score_diff": worst,
            "scores_within_tolerance": worst <= atol, "mismatches": mismatches}
