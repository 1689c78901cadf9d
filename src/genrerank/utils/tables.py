"""Markdown tables: the one format we print to terminals and write beside JSON results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """Render dict rows as a Markdown table (columns default to the first row's keys)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, ""), digits) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) for c in columns]
    body = [
        "| "
        + " | ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(r, widths, numeric, strict=True)
        )
        + " |"
        for r in cells
    ]
    return "\n".join([line, rule, *body])
