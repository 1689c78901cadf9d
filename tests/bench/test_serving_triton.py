"""The serving benchmark's Triton targets, judged on measurements (no server needed)."""

from __future__ import annotations

from typing import Any

from genrerank.bench.serving import triton_targets


def _step(rate: float, achieved: float, shed: int = 0, errors: int = 0) -> dict[str, Any]:
    return {"offered_rps": rate, "achieved_rps": achieved, "shed": shed, "error_count": errors,
            "late": 0, "latency": {"p99_ms": 20.0}}


def _result(steps: list[dict[str, Any]], same: int, stopped: dict | None = None
            ) -> dict[str, Any]:
    cfg = {"backend": "triton", "n": 60, "steps": steps,
           "parity": {"requests": 14, "identical_lists": same, "max_score_diff": 1e-8}}
    if stopped:
        cfg["stopped"] = stopped
    return {"configs": [{"backend": "onnx", "n": 60, "steps": []}, cfg]}


def test_triton_targets_follow_the_measurements() -> None:
    met = triton_targets(_result([_step(100, 100), _step(200, 198)], same=14))
    assert [t["status"] for t in met] == ["met", "met"]
    assert "14/14 identical lists" in met[0]["note"]
    slow = triton_targets(_result([_step(200, 150)], same=13))
    assert [t["status"] for t in slow] == ["not met", "not met"]  # 13/14 lists; 150 < 190
    shed = triton_targets(_result([_step(200, 200, shed=3)], same=14))
    assert shed[1]["status"] == "not met" and "503 3" in shed[1]["note"]
    stopped = triton_targets(_result([_step(100, 90, shed=5)], same=14,
                                     stopped={"after_rps": 100.0, "reason": "shedding load"}))
    assert stopped[1]["status"] == "not met" and "shedding load" in stopped[1]["note"]
