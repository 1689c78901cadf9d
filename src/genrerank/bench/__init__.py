"""Benchmarks that ship with the library (``genrerank bench ...``).

- :mod:`genrerank.bench.quality`: list quality of every model on simulated and real logs, with
  the paper's ablations and decoding strategies (``genrerank bench quality [--quick]``).
"""

from genrerank.bench.quality import QualitySettings, output_paths, run_quality_benchmark

__all__ = ["QualitySettings", "output_paths", "run_quality_benchmark"]
