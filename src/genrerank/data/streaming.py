"""Stream a data set larger than memory, by Parquet row groups, for training.

:class:`StreamingRerankDataset` is a ``torch.utils.data.IterableDataset`` over a data set folder of
one ``requests.parquet`` or of shards ``requests/part-*.parquet`` (:mod:`genrerank.data.schema`).
It yields the same dicts as :class:`~genrerank.data.dataset.RerankDataset` (``collate`` batches
them; ``request_index`` is the row's index in the whole data set) and holds at most one decoded
row group plus the shuffle buffer at a time, whatever the data set's size.

One epoch, for ``N`` requests of the split and ``W`` ranks (``set_shard``):

1. the row groups holding requests of the split are put in a random order (seeded by
   ``(seed, epoch)``), and each one's rows of the split in a random order of their own: together
   a *virtual stream* of the N requests, the same on every rank and worker;
2. rank ``r`` takes positions ``[r * P, (r + 1) * P)`` of it, ``P = ceil(N / W)``; the last rank
   is short by up to ``W - 1`` and repeats the first items of its own part (as
   ``DistributedSampler`` pads), so that every rank yields exactly ``P`` items and DDP ranks run
   the same number of steps. Ranks read disjoint rows (a row group cut between two ranks is read
   by both, each keeping its own rows);
3. a rank's ``P`` positions are cut into contiguous parts, one per DataLoader worker
   (``get_worker_info``), ``floor(P / K)`` or ``ceil(P / K)`` each, so the rank still yields
   exactly ``P`` in all;
4. each worker passes its part through a shuffle buffer of ``shuffle_buffer`` items.

The order is a pure function of (seed, epoch, rank, world size, number of workers); different
epochs differ. ``shuffle=False`` keeps the data set's order (no buffer), for evaluation.
``set_start(s)`` skips the first ``s`` items of this rank's epoch (a mid-epoch resume) without
decoding row groups that hold only skipped items: exact with ``num_workers=0``; with ``K``
workers each worker skips ``s // K`` (+1 for the first ``s % K`` workers), which is exact when
``s`` is a multiple of ``K * batch_size`` (the DataLoader takes whole batches from the workers in
turn). Use ``persistent_workers=False`` (the default) so that ``set_epoch`` reaches the workers.

Rows are validated as their row group is decoded (every invariant of
:func:`~genrerank.data.schema.validate_table`, unless validation is off: ``--no-validate``),
naming the file and row group; the spec and column types of every file are checked when the
data set is opened. Request ids unique *across* files are checked by ``read_dataset`` and by the
writer, not here (that needs all ids at once).

Models fit feature statistics on flat arrays: :meth:`StreamingRerankDataset.statistics_sample`
gives an in-memory ``RerankDataset`` of the first ``max_requests`` requests of the split (the
data set's order), so standardisation and minimum counts are fitted on that sample, not on every
request.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from genrerank.data import schema
from genrerank.data.dataset import RerankDataset
from genrerank.data.schema import (
    SPLITS,
    DataValidationError,
    FeatureSpec,
    conform_types,
    read_dataset_spec,
    validate_table,
)

__all__ = ["StreamingRerankDataset", "shuffle_buffer_order"]


@dataclass(frozen=True)
class _Unit:
    """One row group holding requests of the split."""

    file: int  # index into the data set's files
    group: int  # row group within the file
    offset: int  # data set row of the row group's first row
    rows: int  # rows of the split in it


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` items emits a stream of ``n`` items:
    ``out[t]`` is the stream index of the t-th item out. Computed on indices alone, so the data
    is read once, in stream order, and ``out[t] <= t + size`` (at most ``size`` items wait)."""
    dtype = np.int32 if n < 2**31 else np.int64
    out = np.empty(n, dtype=dtype)
    if n == 0:
        return out
    size = max(1, min(size, n))
    buf = list(range(size))
    slots = rng.integers(0, size, n - size)
    # The classic buffer: each new item takes the slot of a random waiting item, which leaves.
    for t, (j, incoming) in enumerate(zip(slots.tolist(), range(size, n), strict=True)):
        out[t] = buf[j]
        buf[j] = incoming
    rest = np.asarray(buf, dtype=dtype)
    rng.shuffle(rest)
    out[n - size :] = rest
    return out


class StreamingRerankDataset(IterableDataset):
    """The requests of one split (or several, or all) of a data set folder, streamed by row
    groups with bounded memory, shuffled, and sharded across DDP ranks and DataLoader workers.
    See the module's documentation for the order and the padding."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str | Sequence[str] | None,
        *,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        shuffle: bool = True,
        validate: bool | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if shuffle_buffer < 1:
            raise ValueError("shuffle_buffer must be >= 1")
        self.data_dir = Path(data_dir)
        files, spec, from_json = read_dataset_spec(self.data_dir)
        self.files: list[Path] = files
        self.spec: FeatureSpec = spec
        if split is None:
            self.split: list[str] | None = None
        else:
            self.split = [split] if isinstance(split, str) else list(split)
            bad = [s for s in self.split if s not in SPLITS]
            if bad:
                raise ValueError(f"unknown split(s) {bad}; choose from {SPLITS}")
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle
        self.validate = schema._validate_on_read if validate is None else validate
        self._units = self._scan(from_json)
        self.num_requests: int = sum(u.rows for u in self._units)
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self.start = 0

    # ------------------------------------------------------------------ opening

    def _open(self, index: int) -> pq.ParquetFile:
        path = self.files[index]
        try:
            return pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataValidationError(
                f"{path}: not a readable Parquet file ({_one_line(exc)})") from exc

    def _scan(self, from_json: bool) -> list[_Unit]:
        """Check every file's column types and count the split's rows per row group, reading
        only the split column (and, for a hand-written spec, the list lengths it may lack)."""
        units: list[_Unit] = []
        offset = 0
        wanted = None if self.split is None else pa.array(self.split, type=pa.string())
        longest = {"item_id": 0, "exposed": 0}
        for k, path in enumerate(self.files):
            pf = self._open(k)
            conform_types(pf.schema_arrow.empty_table(), self.spec, where=str(path))
            for g in range(pf.metadata.num_row_groups):
                total = pf.metadata.row_group(g).num_rows
                columns = ["split", *longest] if from_json else ["split"]
                try:
                    part = pf.read_row_group(g, columns=columns)
                except (pa.ArrowException, OSError) as exc:
                    raise DataValidationError(
                        f"{path} (row group {g}): not readable ({_one_line(exc)})") from exc
                if wanted is None:
                    rows = total
                else:
                    rows = int(pc.sum(pc.is_in(part.column("split"), value_set=wanted)).as_py()
                               or 0)
                if from_json:
                    for name in longest:
                        lengths = pc.list_value_length(part.column(name).combine_chunks())
                        longest[name] = max(longest[name], int(pc.max(lengths).as_py() or 0))
                if rows:
                    units.append(_Unit(k, g, offset, rows))
                offset += total
        if from_json:  # as read_dataset does for a hand-written spec
            self.spec.max_candidates = max(self.spec.max_candidates, longest["item_id"])
            self.spec.max_list_length = max(self.spec.max_list_length, longest["exposed"])
        return units

    # ------------------------------------------------------------------ the epoch's plan

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order. A new epoch starts at its beginning (``set_start`` 0):
        call ``set_start`` after ``set_epoch``."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_shard(self, rank: int, world_size: int) -> None:
        """Yield rank ``rank``'s share of ``world_size`` (DDP): ``ceil(N / world_size)`` items."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` items of this rank's epoch (a mid-epoch resume)."""
        if start < 0:
            raise ValueError("start must be >= 0")
        self.start = start

    @property
    def per_rank(self) -> int:
        """Items every rank yields per epoch: ``ceil(num_requests / world_size)``."""
        return math.ceil(self.num_requests / self.world_size)

    def __len__(self) -> int:
        return self.per_rank

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, *key]))

    def _unit_order(self) -> np.ndarray:
        n = len(self._units)
        return self._rng(0).permutation(n) if self.shuffle else np.arange(n)

    def _rank_ranges(self, p0: int, p1: int) -> list[tuple[int, int]]:
        """Virtual-stream ranges of this rank's positions ``[p0, p1)``, padding included."""
        n, per_rank = self.num_requests, self.per_rank
        lo = self.rank * per_rank
        real = max(0, min(lo + per_rank, n) - lo)
        ranges: list[tuple[int, int]] = []
        if p0 < min(p1, real):
            ranges.append((lo + p0, lo + min(p1, real)))
        # Padding: repeat this rank's own first items (the whole stream's, if it has none).
        base, length = (lo, real) if real else (0, n)
        p = max(p0, real)
        while p < p1:
            q = (p - real) % length
            take = min(p1 - p, length - q)
            ranges.append((base + q, base + q + take))
            p += take
        return ranges

    def _worker_part(self, worker: int, workers: int) -> tuple[int, int]:
        """This worker's positions ``[p0, p1)`` among its rank's ``per_rank``."""
        per_rank = self.per_rank
        base, extra = divmod(per_rank, workers)
        p0 = worker * base + min(worker, extra)
        return p0, p0 + base + (worker < extra)

    # ------------------------------------------------------------------ reading

    def _decode(self, unit: _Unit) -> tuple[RerankDataset, np.ndarray]:
        """A row group as a RerankDataset of its rows of the split, and the order of its rows
        in this epoch's stream."""
        path = self.files[unit.file]
        where = f"{path} (row group {unit.group})"
        try:
            table = pq.ParquetFile(path).read_row_group(unit.group)
        except (pa.ArrowException, OSError) as exc:
            raise DataValidationError(f"{where}: not readable ({_one_line(exc)})") from exc
        table = conform_types(table, self.spec, where=where)
        if self.validate:
            validate_table(table, self.spec, where=where)
        data = RerankDataset((table, self.spec), split=self.split)
        if len(data) != unit.rows:  # the file changed since it was opened
            raise DataValidationError(
                f"{where}: {len(data)} requests of the split, {unit.rows} when the data set was "
                "opened; was it rewritten meanwhile?")
        key = unit.file * 1_000_003 + unit.group  # a stable id of the row group
        order = self._rng(1, key).permutation(unit.rows) if self.shuffle \
            else np.arange(unit.rows)
        return data, order

    def _items(
        self, ranges: list[tuple[int, int]], needed: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(local index, item) for the needed positions of the virtual ``ranges``, in order."""
        units = self._unit_order()
        sizes = np.fromiter((self._units[u].rows for u in units), dtype=np.int64,
                            count=len(units))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        cached: tuple[int, RerankDataset, np.ndarray] | None = None
        local = 0
        for v0, v1 in ranges:
            v = v0
            while v < v1:
                pos = int(np.searchsorted(starts, v, side="right")) - 1
                a = v - int(starts[pos])
                b = min(int(sizes[pos]), a + (v1 - v))
                span = b - a
                if needed[local : local + span].any():  # else nothing to decode: skipped
                    unit = self._units[int(units[pos])]
                    if cached is None or cached[0] != pos:
                        cached = (pos, *self._decode(unit))
                    _, data, order = cached
                    for j in range(a, b):
                        if needed[local + j - a]:
                            i = int(order[j])
                            yield local + j - a, _own_copy(data[i], unit.offset + int(data.rows[i]))
                local += span
                v += span

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        p0, p1 = self._worker_part(worker, workers)
        n = p1 - p0
        if n <= 0:
            return
        # This worker's share of the rank's skipped items (see the module's documentation).
        skip = min(n, self.start // workers + (worker < self.start % workers))
        if self.shuffle:
            rng = self._rng(2, self.rank, self.world_size, worker, workers)
            out = shuffle_buffer_order(n, self.shuffle_buffer, rng)
        else:
            out = np.arange(n)
        needed = np.ones(n, dtype=bool)
        needed[out[:skip]] = False
        waiting: dict[int, dict[str, Any]] = {}
        reader = self._items(self._rank_ranges(p0, p1), needed)
        for t in range(skip, n):
            want = int(out[t])
            while want not in waiting:
                index, item = next(reader)
                waiting[index] = item
            yield waiting.pop(want)

    # ------------------------------------------------------------------ statistics

    def statistics_sample(self, max_requests: int = 200_000) -> RerankDataset:
        """An in-memory RerankDataset of the first ``max_requests`` requests of the split (in
        the data set's order; all of them if fewer), for models' ``fit_statistics``
        (standardisation, minimum counts), which need flat arrays: the statistics are then fitted
        on this sample, not on every request. ``request_index`` keeps data set rows."""
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        tables: list[pa.Table] = []
        rows: list[np.ndarray] = []
        count = 0
        for unit in self._units:  # file and row group order = the data set's order
            data, _ = self._decode(unit)
            take = min(len(data), max_requests - count)
            tables.append(data.table.slice(0, take))
            rows.append(unit.offset + data.rows[:take])
            count += take
            if count >= max_requests:
                break
        if not tables:
            raise ValueError(f"{self.data_dir}: no requests in split(s) {self.split}")
        sample = RerankDataset((pa.concat_tables(tables), self.spec))
        sample.rows = np.concatenate(rows)
        return sample


def _own_copy(item: dict[str, Any], request_index: int) -> dict[str, Any]:
    """A request's arrays copied out of its row group, so that items waiting in the shuffle
    buffer do not keep whole decoded row groups alive (memory would grow with the buffer's
    spread over row groups), with its data set row as ``request_index``."""
    out: dict[str, Any] = {}
    for name, value in item.items():
        if isinstance(value, np.ndarray):
            out[name] = value.copy()
        elif isinstance(value, dict):
            out[name] = {k: v.copy() for k, v in value.items()}
        else:
            out[name] = value
    out["request_index"] = request_index
    return out


def _one_line(exc: BaseException) -> str:
    """Arrow's messages span lines; errors here are one line naming the file."""
    return " ".join(str(exc).split())
