"""Progress reports that read well on a terminal and in a log file.

One entry point, :func:`progress`, used by training, the simulator and ``rerank``:

- stderr is a terminal: a tqdm bar, redrawn in place;
- stderr is not a terminal (a log file, a pipe, a batch job): plain lines, at most one every
  :data:`DEFAULT_INTERVAL_S` seconds (environment variable ``GENRERANK_PROGRESS_INTERVAL``)
  and a final one when the work ends, each with the rate and the time left, e.g.
  ``train epoch 3/15: 1200/4000 steps (30%), 85.3 steps/s, elapsed 14 s, remaining 33 s``;
- ``enabled=False``: nothing at all.

A bar wraps an iterable (``for batch in progress(loader, "rerank", "batches")``) or counts
what it is told (``with progress(total, "rerank", "requests") as bar: bar.update(k)``).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "Progress", "format_seconds", "progress"]

T = TypeVar("T")

#: Seconds between two plain progress lines, unless ``GENRERANK_PROGRESS_INTERVAL`` says.
DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "GENRERANK_PROGRESS_INTERVAL"


def _interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        # A typo in an environment variable must not stop a training run.
        warnings.warn(f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; using "
                      f"{DEFAULT_INTERVAL_S:g}", stacklevel=3)
        return DEFAULT_INTERVAL_S
    return value


def format_seconds(seconds: float) -> str:
    """``14 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _format_rate(rate: float, unit: str) -> str:
    if rate >= 100:
        return f"{rate:.0f} {unit}/s"
    if rate >= 1:
        return f"{rate:.1f} {unit}/s"
    return f"{rate:.3g} {unit}/s"


class Progress(Generic[T]):
    """A progress report; see :func:`progress`. ``update``, ``set_postfix`` and ``close`` work
    the same whatever the output (and do nothing when disabled)."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        total: int | None,
        desc: str,
        unit: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        leave: bool = True,
        stream: IO[str] | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.enabled = enabled
        self._initial = initial
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._postfix: dict[str, Any] = {}
        self._closed = False
        self._bar: Any = None
        self.interval = _interval_from_env() if interval is None else float(interval)
        if tty is None:
            isatty = getattr(self._stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        if enabled and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}",
                             leave=leave, file=self._stream)
        self._start = self._last = clock()

    # -- counting

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this progress report counts a total; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if not self.enabled or self._closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total and self.n >= self.total:
            return  # the final line follows; no "remaining 0 s" line before it
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self.line(now))

    def set_postfix(self, **values: Any) -> None:
        """Extra ``key value`` pairs shown after the counts (e.g. the running loss)."""
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Finish: the bar is closed; in plain mode a final line (without a time left) is
        written, so a log always ends with the totals and the time taken."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            return
        self._write(self.line(self._clock(), final=True))

    # -- reporting

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The plain progress line at ``now`` (the clock's time)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        done = self.n - self._initial  # the rate counts this run's work, not a resumed start
        rate = done / elapsed if elapsed > 0 else math.nan
        if self.total:
            counts = f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            counts = f"{self.n} {self.unit}"
        parts = [counts]
        if math.isfinite(rate):
            parts.append(_format_rate(rate, self.unit))
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if not final and self.total:
            left = max(self.total - self.n, 0)
            parts.append(f"remaining {format_seconds(left / rate) if rate > 0 else '?'}")
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        return f"{self.desc}: {', '.join(parts)}"

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    # -- context manager

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress(
    iterable_or_total: Iterable[T] | int | None,
    desc: str,
    unit: str = "items",
    enabled: bool = True,
    *,
    total: int | None = None,
    initial: int = 0,
    leave: bool = True,
    stream: IO[str] | None = None,
    interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Progress[T]:
    """A progress report over an iterable (iterate it) or a count (``int``; call
    ``update``). ``unit`` is plural (``"steps"``); ``total`` defaults to ``len(iterable)``
    where it has one; ``initial`` is where a resumed count starts. Output goes to ``stream``
    (stderr): a tqdm bar on a terminal, else plain lines at most every ``interval`` seconds
    (default: ``$GENRERANK_PROGRESS_INTERVAL`` or 30) and a final one; ``leave=False`` removes
    a terminal bar when done. ``enabled=False`` writes nothing."""
    if iterable_or_total is None or isinstance(iterable_or_total, int):
        iterable, count = None, iterable_or_total
    else:
        iterable, count = iterable_or_total, None
        if total is None:
            try:
                count = len(iterable_or_total)  # type: ignore[arg-type]
            except TypeError:
                count = None
    return Progress(iterable, total if total is not None else count, desc, unit,
                    enabled=enabled, initial=initial, leave=leave, stream=stream,
                    interval=interval, clock=clock)
