"""``genrerank bench import``: importing users' logs, and the README walk-through, timed.

1. **Import**: the synthetic impressions log of :mod:`genrerank.data.importer.example`
   (``rows / 10`` requests of 10 shown items, ISO time stamps, text categories, tags, two
   request-context columns, two derived features), written as one CSV, then imported by
   ``genrerank data import`` in a child process: wall time and the child's peak RSS
   (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the child is this process's only waited-for child
   at that point). Targets: 1 million rows in under 60 s with peak RSS under 2 GiB.
2. **Walk-through**: the README's "Your own logs" block run literally
   (:mod:`genrerank.bench.walkthrough`), the wall time of every command. Target: under 10
   minutes from the CSV to a served re-ranker.

Outputs ``import.{json,md}`` in the output folder. Nothing else should run meanwhile: on these
2-core machines any other job changes the timings (the JSON records the load average).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from genrerank.bench.walkthrough import run_walkthrough
from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

TARGET_IMPORT_S = 60.0
TARGET_IMPORT_RSS_GIB = 2.0
TARGET_WALKTHROUGH_S = 600.0


def _child_peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024  # KiB on Linux


def bench_import(rows: int, work: Path) -> dict[str, Any]:
    """Write the example CSV with ``rows`` rows and import it in a child process."""
    from genrerank.data.importer.example import EXAMPLE_MAPPING, write_example_csv

    n_requests = max(1, rows // 10)
    csv, mapping = work / "impressions.csv", work / "mapping.toml"
    t0 = time.perf_counter()
    write_example_csv(csv, n_requests, seed=0)
    write_s = time.perf_counter() - t0
    mapping.write_text(EXAMPLE_MAPPING)
    cmd = [sys.executable, "-m", "genrerank", "data", "import", "--input", str(csv),
           "--mapping", str(mapping), "--out", str(work / "data")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"import failed: {proc.stdout}{proc.stderr}")
    rss = _child_peak_rss_bytes()
    return {
        "rows": n_requests * 10, "requests": n_requests,
        "csv_bytes": csv.stat().st_size, "csv_write_seconds": round(write_s, 2),
        "import_seconds": round(seconds, 2), "peak_rss_bytes": rss,
        "peak_rss_gib": round(rss / 2**30, 3),
        "rows_per_second": round(n_requests * 10 / seconds),
        "output": proc.stdout.strip().splitlines(),
        "meets_targets": bool(seconds < TARGET_IMPORT_S and rss < TARGET_IMPORT_RSS_GIB * 2**30),
    }


def bench_walkthrough(work: Path) -> dict[str, Any]:
    result = run_walkthrough(work)
    if result.returncode != 0:
        raise RuntimeError(f"the README walk-through failed:\n{result.output[-3000:]}")
    total = sum(s.seconds for s in result.steps)
    return {
        "steps": [{"command": s.command, "seconds": s.seconds} for s in result.steps],
        "total_seconds": round(total, 1),
        "meets_target": bool(total < TARGET_WALKTHROUGH_S),
    }


def render_markdown(result: dict[str, Any]) -> str:
    imp = result.get("import")
    lines = ["# Import benchmark", "",
             f"{result['machine']}; load average at start {result['load_average']}.", ""]
    if imp:
        lines += ["## Import (`genrerank data import`, child process)", "", markdown_table(
            [{"rows": imp["rows"], "requests": imp["requests"],
              "CSV MB": round(imp["csv_bytes"] / 1e6, 1), "import s": imp["import_seconds"],
              "rows/s": imp["rows_per_second"], "peak RSS GiB": imp["peak_rss_gib"],
              "targets met": imp["meets_targets"]}], digits=2),
            "", f"Targets: under {TARGET_IMPORT_S:.0f} s and under {TARGET_IMPORT_RSS_GIB} GiB "
                f"peak RSS for 1 million rows.", ""]
    walk = result.get("walkthrough")
    if walk:
        lines += ["## README walk-through (\"Your own logs\"), each command", "",
                  markdown_table([{"command": f"`{s['command']}`", "seconds": s["seconds"]}
                                  for s in walk["steps"]], digits=2),
                  "", f"Total {walk['total_seconds']} s (target under {TARGET_WALKTHROUGH_S:.0f}"
                      f" s); met: {walk['meets_target']}.", ""]
    return "\n".join(lines)


def run_import_benchmark(rows: int, out_dir: Path, walkthrough: bool = True,
                         import_rows: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="genrerank-import-") as tmp:
        if import_rows:
            result["import"] = bench_import(rows, Path(tmp) / "import")
            print(render_markdown({**result, "walkthrough": None}), flush=True)
        if walkthrough:
            result["walkthrough"] = bench_walkthrough(Path(tmp) / "walk")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "import.json", result)
    atomic_write_text(out_dir / "import.md", render_markdown(result))
    print(render_markdown(result))
    return result
