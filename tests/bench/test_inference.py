"""The in-process serving benchmark's report logic (the timed parts run in `bench serving`)."""

from __future__ import annotations

from typing import Any

from genrerank.bench.inference import (
    SESSION_VARIANTS,
    _Cursor,
    inference_markdown,
    inference_targets,
)


def _stats(p50: float) -> dict[str, float]:
    return {"p50_ms": p50, "p99_ms": 2 * p50, "mean_ms": p50}


def _result(onnx_ms: float) -> dict[str, Any]:
    variants = {"torch": _stats(2.0), "onnx": _stats(onnx_ms), "onnx_int8": _stats(0.8),
                "torch+decode": _stats(2.5), "onnx+decode": _stats(onnx_ms + 0.5)}
    cell = {"preset": "kuaishou", "n": 60, "m": 6, "model": "nar4rec", "runs": 10,
            "other_processes_cores": 0.0, "variants": variants,
            "onnx_over_torch_p50": onnx_ms / 2.0, "int8_over_torch_p50": 0.4}
    cache = {"no_cache": {**_stats(1.2), "hit_rate": 0.0},
             "warm_cache": {**_stats(1.0), "hit_rate": 1.0}, "speedup_p50": 1.2}
    result = {
        "machine": {"threads": 1, "torch": "2.13.0", "onnxruntime": "1.x"},
        "cells": [cell],
        "session_options": {"kuaishou": {"variants": {k: _stats(1.0) for k in SESSION_VARIANTS}}},
        "cache": {"kuaishou": {"onnx": cache}},
        "int8_quality": {"train_epochs": 1, "train_requests": 100, "test_requests": 10,
                         "decoder": {"name": "greedy"}, "expected_gain_float32": 1.0,
                         "expected_gain_int8": 0.99, "gain_change": -0.01,
                         "gain_change_se": 0.005, "identical_lists": 0.9,
                         "max_abs_log_prob_diff": 0.02},
    }
    result["targets"] = inference_targets(result)
    return result


def test_target_is_judged_on_the_nar4rec_n60_ratio() -> None:
    assert inference_targets(_result(0.9))[0]["met"] is True  # 0.45x
    missed = inference_targets(_result(1.2))[0]  # 0.60x
    assert missed["met"] is False and missed["measured"].startswith("0.60x")


def test_markdown_has_every_section_and_the_figures() -> None:
    text = inference_markdown(_result(0.9))
    for heading in ("Model time", "session options", "Item-embedding cache", "int8", "Targets"):
        assert heading in text
    assert "| 60 | nar4rec | 2.000 (4.00) | 0.900 (1.80) | 0.800 (1.60) | 0.45x |" in text
    assert "| 60 | onnx | 1.200 | 1.000 | 1.000 | 1.20x |" in text
    assert "-0.0100 (0.0050)" in text and "90.0%" in text
    assert "**met**, 0.45x" in text


def test_cursor_moves_every_timed_call_to_the_next_request() -> None:
    seen: list[tuple[str, int]] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def rerank(self, request: int) -> None:
            seen.append((self.name, request))

    cursor = _Cursor([10, 11, 12])
    a, b = cursor.call(Fake("a")), cursor.call(Fake("b"))
    for _ in range(4):
        a()
        b()
        cursor.advance()
    # Both rerankers saw the same request in each round, and the pool wraps around.
    assert seen == [("a", 10), ("b", 10), ("a", 11), ("b", 11), ("a", 12), ("b", 12),
                    ("a", 10), ("b", 10)]
