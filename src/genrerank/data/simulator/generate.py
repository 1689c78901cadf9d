"""Generate logged re-ranking data sets from the simulator, in the genrerank format.

Requests are generated in chunks of ``config.chunk_size`` (vectorised over the chunk's requests and
candidates); chunk c uses ``SeedSequence([seed, c])``, so the output depends only on
(preset, overrides, seed, n_requests) - not on progress bars, threads or machine - and request i can
be regenerated alone (:meth:`Simulator.requests`, :meth:`Simulator.logged`).

What models may read (the table): candidates' observable features, the upstream score, the list the
logging policy showed and the sampled feedback on it. What they may not (hidden, never written):
appeal, quality, tastes, diversity appetite, scroll and like propensities, the match noise.

Observable features:

- user_cat: ``activity_level`` (KuaiRand activity levels), ``user_segment`` (the coarse taste
  segment, right with probability ``segment_observed_prob``);
- user_dense: log follow count, log account age, noisy histories of activity, diversity and scroll
  depth, and the category shares of 40 past views (``hist_cat_<c>``);
- item_cat: ``category``, ``creator`` (1-based index), ``duration_bucket``;
- item_dense: log duration (s), creator log fans, a noisy history CTR (noisier for cold-start);
- columns ``category``, ``creator``, ``is_cold_start``, ``is_long_tail``, ``upstream_score``.

The split is by simulated request time (:func:`genrerank.data.splits.assign_time_split`).
Request times are drawn uniformly over the preset's span, independently of the request index (not
monotone in it), so the split cannot be a function of the index. Large data sets are written in
shards (``shard_requests``) with memory bounded by a chunk and a row group: a first pass replays
only the time draws of every chunk (:meth:`Simulator.chunk_times`, under 0.5 % of the generation
time and 17 bytes per request) and cuts the time order exactly as ``assign_time_split`` does; the
second generates, validates and writes chunk by chunk. The requests, their splits and the spec
are the same as the unsharded path's for the same (preset, overrides, seed, n_requests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from genrerank.data.schema import (
    SPLITS,
    CategoricalFeature,
    FeatureSpec,
    ShardedDatasetWriter,
    arrow_schema,
    conform_types,
    list_column,
    nested_list_column,
    write_dataset,
)
from genrerank.data.simulator.oracle import REQUEST_ID_WIDTH, Simulator, request_ids
from genrerank.data.simulator.presets import ACTIVITY_LEVELS, get_preset
from genrerank.data.simulator.world import DURATION_BUCKET_EDGES, RequestState
from genrerank.data.splits import assign_time_split
from genrerank.utils.progress import progress as show_progress

ITEM_DENSE = ["log_duration", "creator_log_fans", "hist_ctr"]


def _offsets(lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


class _Ids:
    """Arrow string arrays of all item and user ids of a world, gathered by index (fast)."""

    def __init__(self, sim: Simulator) -> None:
        cfg = sim.config
        self.items = pa.array(np.char.add("v", np.arange(cfg.n_items).astype(str)))
        self.users = pa.array(np.char.add("u", np.arange(cfg.n_users).astype(str)))


def _chunk_columns(
    sim: Simulator,
    ids: _Ids,
    state: RequestState,
    lists: np.ndarray,
    feedback: dict[str, np.ndarray],
) -> dict[str, pa.Array]:
    world = sim.world
    B, n = state.appeal.shape
    m = lists.shape[1]
    len_n = np.full(B, n, dtype=np.int32)
    len_m = np.full(B, m, dtype=np.int32)
    i32, f32 = pa.int32(), pa.float32()
    flat_items = state.items.reshape(-1)
    item_cat = np.stack(
        [state.category, state.creator, world.duration_bucket(state.duration)], axis=-1
    ).reshape(-1, 3)
    user_cat = world.user_cat[state.user]
    user_dense = world.user_dense[state.user]
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(request_ids(state.index)),
        "time": pa.array(state.time, type=pa.int64()),
        "user_id": ids.users.take(pa.array(state.user)),
        "user_cat": list_column(user_cat.reshape(-1), np.full(B, user_cat.shape[1]), i32),
        "user_dense": list_column(user_dense.reshape(-1), np.full(B, user_dense.shape[1]), f32),
        "item_id": pa.ListArray.from_arrays(_offsets(len_n), ids.items.take(pa.array(flat_items))),
        "item_cat": nested_list_column(item_cat.astype(np.int32), len_n, i32),
        "item_dense": nested_list_column(
            world.item_dense(flat_items).astype(np.float32), len_n, f32
        ),
        "upstream_score": list_column(state.upstream.reshape(-1).astype(np.float32), len_n, f32),
        "category": list_column(state.category.reshape(-1).astype(np.int32), len_n, i32),
        "creator": list_column(state.creator.reshape(-1).astype(np.int32), len_n, i32),
        "is_cold_start": list_column(state.is_cold_start.reshape(-1), len_n, pa.bool_()),
        "is_long_tail": list_column(state.is_long_tail.reshape(-1), len_n, pa.bool_()),
        "exposed": list_column(lists.reshape(-1).astype(np.int32), len_m, i32),
    }
    for label in sim.config.labels:
        cols[f"label_{label}"] = list_column(
            feedback[label].reshape(-1).astype(np.float32), len_m, f32
        )
    return cols


def feature_spec(sim: Simulator, n_requests: int) -> FeatureSpec:
    """The feature spec of a data set generated by ``sim`` (provenance in ``extra``)."""
    cfg = sim.config
    world = sim.world
    return FeatureSpec(
        source=f"simulator:{sim.preset}",
        user_categorical=[
            CategoricalFeature("activity_level", len(ACTIVITY_LEVELS) + 1),
            CategoricalFeature("user_segment", cfg.n_segments + 1),
        ],
        user_dense=list(world.user_dense_names),
        item_categorical=[
            CategoricalFeature("category", cfg.n_categories + 1),
            CategoricalFeature("creator", world.n_creators + 1),
            CategoricalFeature("duration_bucket", len(DURATION_BUCKET_EDGES) + 2),
        ],
        item_dense=list(ITEM_DENSE),
        labels=list(cfg.labels),
        n_categories=cfg.n_categories + 1,
        n_creators=world.n_creators + 1,
        max_candidates=cfg.n_candidates,
        max_list_length=cfg.list_length,
        extra={
            "simulator": sim.provenance(n_requests),
            "gain_weights": cfg.gain_weights,
            "logging_policy": {
                "kind": "plackett_luce",
                "score": "upstream_score",
                "temperature": cfg.logging_temperature,
            },
            "category_tags": world.category_tags,
        },
    )


def _chunk_tables(
    sim: Simulator, n_requests: int, schema: pa.Schema, progress: bool, what: str
) -> Iterator[pa.Table]:
    """The requests of ``sim`` chunk by chunk (the last one cut at ``n_requests``), as tables
    of ``schema`` without the split and context columns."""
    size = sim.config.chunk_size
    n_chunks = -(-n_requests // size)
    ids = _Ids(sim)
    # The simulator has no request context features (conform_types adds the empty columns).
    no_split = pa.schema([f for f in schema
                          if f.name not in ("split", "context_cat", "context_dense")])
    for c in show_progress(range(n_chunks), what, "chunks", enabled=progress):
        state, lists, feedback = sim.simulate_chunk(c)
        keep = min(size, n_requests - c * size)
        if keep < size:
            state = state.take(slice(0, keep))
            lists = lists[:keep]
            feedback = {k: v[:keep] for k, v in feedback.items()}
        yield pa.table(_chunk_columns(sim, ids, state, lists, feedback), schema=no_split)


def time_split_codes(sim: Simulator, n_requests: int) -> np.ndarray:
    """``[n_requests]`` int8 index into :data:`~genrerank.data.schema.SPLITS` of each request:
    exactly :func:`~genrerank.data.splits.assign_time_split` of all requests, computed from the
    replayed time draws alone (:meth:`Simulator.chunk_times`) without generating any chunk."""
    if n_requests > 10**REQUEST_ID_WIDTH:
        # assign_time_split breaks time ties by request id; ids sort like their index only
        # while the zero-padded width holds.
        raise ValueError(f"at most {10**REQUEST_ID_WIDTH} simulated requests")
    size = sim.config.chunk_size
    n_chunks = -(-n_requests // size)
    times = np.concatenate([sim.chunk_times(c) for c in range(n_chunks)])[:n_requests]
    # A stable sort by time = lexsort by (time, request id): ids are zero-padded indices.
    order = np.argsort(times, kind="stable")
    del times
    fractions = sim.config.split_fractions
    n_train = int(round(fractions[0] * n_requests))
    n_valid = int(round(fractions[1] * n_requests))
    codes = np.empty(n_requests, dtype=np.int8)
    codes[order[:n_train]] = 0
    codes[order[n_train : n_train + n_valid]] = 1
    codes[order[n_train + n_valid :]] = 2
    return codes


def simulate_dataset(
    preset: str, n_requests: int, seed: int, progress: bool = False, **overrides: Any
) -> tuple[pa.Table, FeatureSpec]:
    """Simulate ``n_requests`` logged requests of a preset: (requests table, feature spec)."""
    if n_requests < 1:
        raise ValueError("n_requests must be >= 1")
    sim = Simulator(get_preset(preset, **overrides), seed, preset=preset, overrides=overrides)
    spec = feature_spec(sim, n_requests)
    schema = arrow_schema(spec)
    tables = list(_chunk_tables(sim, n_requests, schema, progress, f"simulate {preset}"))
    table = pa.concat_tables(tables)
    # The split is assigned over all chunks.
    times = table.column("time").to_numpy()
    rids = table.column("request_id").to_numpy(zero_copy_only=False)
    split = assign_time_split(times, rids, sim.config.split_fractions)
    table = table.add_column(schema.get_field_index("split"), schema.field("split"),
                             pa.array(split, type=pa.string()))
    return conform_types(table, spec, where=f"simulated {preset}"), spec


def simulate_sharded(
    preset: str,
    n_requests: int,
    seed: int,
    out_dir: str | Path,
    shard_requests: int,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing_splits: bool = False,
    row_group_requests: int = 8192,
    **overrides: Any,
) -> Path:
    """Simulate and write a data set folder in shards of ``shard_requests`` requests
    (``requests/part-*.parquet``), chunk by chunk: memory is bounded by one chunk, one row group
    and 17 bytes per request for the split (about 100 MB at 5 million requests), whatever
    ``n_requests``. Same requests, splits and spec as :func:`simulate_to_dir` without shards;
    written atomically (:class:`~genrerank.data.schema.ShardedDatasetWriter`), in row groups of
    ``row_group_requests`` (the unit a streaming reader decodes at once)."""
    if n_requests < 1:
        raise ValueError("n_requests must be >= 1")
    sim = Simulator(get_preset(preset, **overrides), seed, preset=preset, overrides=overrides)
    spec = feature_spec(sim, n_requests)
    schema = arrow_schema(spec)
    codes = time_split_codes(sim, n_requests)
    names = pa.array(list(SPLITS), type=pa.string())
    split_field = schema.field("split")
    position = schema.get_field_index("split")
    start = 0
    with ShardedDatasetWriter(out_dir, spec, shard_requests=shard_requests, overwrite=overwrite,
                              allow_missing_splits=allow_missing_splits,
                              row_group_requests=row_group_requests) as writer:
        for table in _chunk_tables(sim, n_requests, schema, progress,
                                   f"simulate {preset} (sharded)"):
            split = names.take(pa.array(codes[start : start + table.num_rows]))
            start += table.num_rows
            writer.write(table.add_column(position, split_field, split))
    return Path(out_dir)
def simulate_to_dir(
    preset: str,
    n_requests: int,
    seed: int,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing_splits: bool = False,
    shard_requests: int | None = None,
    **overrides: Any,
) -> Path:
    """Simulate and write a data set folder (atomically, validated); returns its path.
    ``allow_missing_splits``: a few requests only for timing may lack a valid split.
    ``shard_requests``: write shards of that many requests with bounded memory
    (:func:`simulate_sharded`) instead of one ``requests.parquet`` built in memory."""
    if shard_requests is not None:
        return simulate_sharded(preset, n_requests, seed, out_dir, shard_requests,
                                overwrite=overwrite, progress=progress,
                                allow_missing_splits=allow_missing_splits, **overrides)
    table, spec = simulate_dataset(preset, n_requests, seed, progress=progress, **overrides)
    return write_dataset(out_dir, table, spec, overwrite=overwrite,
                         allow_missing_splits=allow_missing_splits)
