"""Counts of the constraint property tests, printed at the end of the run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

#: (decoder, what) -> count, filled by the property tests: "cases" (random problems decoded),
#: "lists" (lists checked), "infeasible" (problems that raised InfeasibleConstraints, as they
#: must), "violations" and "failures" (both asserted to stay 0).
TALLY: Counter[tuple[str, str]] = Counter()


@pytest.fixture
def tally() -> Counter[tuple[str, str]]:
    return TALLY


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # These models are tiny: one intra-op thread avoids thread hand-offs on busy machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    names = sorted({name for name, _ in TALLY})
    kinds = ("cases", "lists", "infeasible", "violations", "failures")
    terminalreporter.section("constraint property tests")
    terminalreporter.write_line(f"{'decoder':<28}" + "".join(f"{k:>12}" for k in kinds))
    for name in names:
        terminalreporter.write_line(
            f"{name:<28}" + "".join(f"{TALLY[(name, k)]:>12}" for k in kinds))
    total = {k: sum(v for (_, kk), v in TALLY.items() if kk == k) for k in kinds}
    terminalreporter.write_line(f"{'total':<28}" + "".join(f"{total[k]:>12}" for k in kinds))
