"""Re-rank every request of a data set and write the lists: ``genrerank rerank``.

From Python::

    from genrerank.evaluation.rerank import rerank_dataset
    summary = rerank_dataset("/tmp/sim", "lists.parquet", run_dir="runs/nar4rec")
    summary = rerank_dataset("/tmp/sim", "ge.parquet", pipeline="pipeline.json", split="all")

The lists are decoded exactly as ``evaluate`` decodes them (a run:
:func:`~genrerank.evaluation.offline.decode_lists` with the run's decoder, or the one given;
a pipeline: :meth:`~genrerank.pipeline.Pipeline.rerank`, the evaluator's pick), in batches of the
same size, so a seeded sampling decoder or a perturbing generator gives the same lists too. By
default each list has its request's logged length m (as ``evaluate``); ``list_length`` asks for
min(list_length, n) items instead.

One row per request, in the data set's order; columns (:data:`OUTPUT_SCHEMA`):

``request_id``, ``user_id``, ``split`` (string)
    copied from the data set;
``item_id`` (list<string>)
    the re-ranked list, best first;
``candidate_index`` (list<int32>)
    the same items as indices into the request's candidates;
``score`` (list<float32>)
    one per listed item, what the serving API returns for it
    (:mod:`genrerank.serving.runtime`): for a run, the model's probability of that item at
    its position: matrix models (nar4rec, pointwise, prm, logging) its entry of the position's
    softmax over candidates, ``exp(log_probs[item, slot])`` (before any decoder penalty, e.g.
    satiation's; for pointwise, prm and logging the softmax of their item scores, the same for
    every slot), the autoregressive model the step's pointer probability
    ``p(item | items above)``; for a pipeline, the evaluator's expected gain of the item at its
    position given the items above (``sum_s w_s sigmoid(logit_s)``, undiscounted);
``model_version`` (string)
    the run's :func:`~genrerank.serving.export.model_version` (what export and serving report),
    or a pipeline's :func:`pipeline_version`;
``decoder`` (string)
    the decoder's name (``"pipeline"`` for a pipeline).

The Parquet key-value metadata holds, under :data:`METADATA_KEY`, a JSON object: run or
pipeline path, data path, split, decoder and its parameters, list length, model version (and a
pipeline's component versions), the score's definition, requests, the constraints the lists
were decoded under (``constraints``, the run's ``decode.constraints`` unless given; with the
number of lists that break them, ``constraint_violations``, 0) and the genrerank version.

The file is written to a temporary name next to it and renamed when complete: a failure leaves
no file, or the old one untouched; an existing file is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

import genrerank
from genrerank.constraints import ConstraintSet, RequestConstraints, constraints_from_config
from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.utils.io import check_target as _check_target
from genrerank.utils.io import write_table_atomic
from genrerank.utils.progress import progress

__all__ = [
    "METADATA_KEY",
    "OUTPUT_SCHEMA",
    "RerankSummary",
    "pipeline_version",
    "read_rerank_metadata",
    "rerank_dataset",
    "rerank_table",
]

#: Key of the JSON object in the output's Parquet key-value metadata.
METADATA_KEY = b"genrerank.rerank"

OUTPUT_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("user_id", pa.string()),
    ("split", pa.string()),
    ("item_id", pa.list_(pa.string())),
    ("candidate_index", pa.list_(pa.int32())),
    ("score", pa.list_(pa.float32())),
    ("model_version", pa.string()),
    ("decoder", pa.string()),
])

RUN_SCORE = ("probability of the item at its position under the model: matrix models "
             "exp(log_probs[item, slot]) (before decoder penalties), autoregressive "
             "p(item | items above)")
PIPELINE_SCORE = ("the evaluator's expected gain of the item at its position given the items "
                  "above: sum_s w_s sigmoid(logit_s), undiscounted")

#: What ``evaluate`` decodes in (:func:`~genrerank.evaluation.offline.predict`): seeded decoders
#: and generators draw per batch, so the same size gives the same lists.
BATCH_SIZE = 256


@dataclasses.dataclass
class RerankSummary:
    """What :func:`rerank_dataset` did: the file, how many requests, the list length (``None``:
    each request's logged length), the longest list written, the seconds it took."""

    path: Path
    requests: int
    list_length: int | None
    max_length: int
    seconds: float
    model_version: str
    decoder: str

    def line(self) -> str:
        length = (f"list length {self.list_length}" if self.list_length is not None
                  else f"logged list lengths, up to {self.max_length}")
        return (f"re-ranked {self.requests} requests ({length}) with {self.model_version} "
                f"({self.decoder}) in {self.seconds:.1f} s: {self.path}")


# --------------------------------------------------------------------------- sources


class _RunSource:
    """A trained generator run, decoded as ``evaluate`` decodes it."""

    def __init__(self, run_dir: Path, decoder: str | None,
                 decoder_params: dict[str, Any] | None) -> None:
        from genrerank.experiment import load_run_for_decoding
        from genrerank.serving.export import model_version

        self.model, meta, decode_cfg = load_run_for_decoding(run_dir, decoder, decoder_params)
        if getattr(self.model, "kind", "generator") != "generator":
            raise ValueError(f"run {run_dir} is a list evaluator ({meta.get('model_name')!r}): "
                             "it scores lists and writes none; rerank with a generator run, or "
                             "--pipeline to let it choose among generated lists")
        self.decoder = str(decode_cfg.pop("name"))
        self.default_constraints = constraints_from_config(decode_cfg)
        decode_cfg.pop("constraints", None)
        self.params = decode_cfg
        self.version = model_version(run_dir)
        self.models = [self.model]
        self.max_length = self.model.input_limits()[1]

    @torch.inference_mode()
    def lists_and_scores(self, batch: Batch, constraints: list[RequestConstraints | None]
                         | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from genrerank.evaluation.offline import decode_lists

        model = self.model
        if getattr(model, "stepwise", False):
            lists = decode_lists(model, batch, self.decoder, self.params,
                                 constraints=constraints)
            # The step probabilities: one teacher-forced pass over the written lists.
            forced = dataclasses.replace(batch, exposed=lists.clamp_min(0),
                                         position_mask=lists >= 0, labels={})
            log_probs = model(forced).log_probs
        else:
            out = model(batch)
            lists = decode_lists(model, batch, self.decoder, self.params, out,
                                 constraints=constraints)
            log_probs = out.log_probs
        return lists, _at_slots(log_probs, lists).exp()


class _PipelineSource:
    """A generator-evaluator pipeline: the evaluator's pick, as ``evaluate --pipeline``."""

    def __init__(self, config: Path) -> None:
        from genrerank.pipeline import Pipeline

        self.pipe = Pipeline.from_config(config)
        if self.pipe.evaluator is None:
            raise ValueError(f"{config}: the pipeline needs an 'evaluator' run to choose lists")
        self.version, self.components = pipeline_version(config)
        self.decoder = "pipeline"
        self.params = {"generators": [g.label for g in self.pipe.generators],
                       "lists_proposed": self.pipe.total_lists}
        self.models = [self.pipe.evaluator, *[g.model for g in self.pipe.generators
                                              if hasattr(g, "model")]]
        self.max_length = None

    @torch.inference_mode()
    def lists_and_scores(self, batch: Batch, constraints: None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        evaluator = self.pipe.evaluator
        lists = self.pipe.rerank(batch, batch.position_mask.sum(1)).lists
        logits = evaluator(batch, lists=lists).signal_logits  # type: ignore[misc]
        stacked = torch.stack([logits[s] for s in evaluator.signals], -1)  # type: ignore[union-attr]
        return lists, evaluator.expected_signals(stacked)  # type: ignore[union-attr]


def _at_slots(matrix: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """``matrix[b, lists[b, j], j]`` ``[B, M]`` (anything at empty slots)."""
    width = lists.shape[1]
    index = lists.clamp_min(0).unsqueeze(1)  # [B, 1, M]
    return matrix[:, :, :width].gather(1, index).squeeze(1)


def pipeline_version(config: str | Path) -> tuple[str, dict[str, str]]:
    """``("pipeline-<12 hex digits>", component versions)``: a hash of the configuration with
    each run path replaced by that run's model version, so it changes when any weights or any
    setting change, not when the folders move."""
    from genrerank.serving.export import model_version

    path = Path(config)
    cfg = json.loads(path.read_text())  # Pipeline.from_config has already refused bad JSON

    def version(run: str) -> str:
        run_path = Path(run)
        return model_version(run_path if run_path.is_absolute() else path.parent / run_path)

    components: dict[str, str] = {}
    canonical = dict(cfg)
    if cfg.get("evaluator"):
        components["evaluator"] = canonical["evaluator"] = version(cfg["evaluator"])
    generators = []
    for i, gen in enumerate(cfg.get("generators") or []):
        gen = dict(gen)
        if "run" in gen:
            components[f"generators[{i}]"] = gen["run"] = version(gen["run"])
        generators.append(gen)
    canonical["generators"] = generators
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:12]
    return f"pipeline-{digest}", components


# --------------------------------------------------------------------------- the lists


def _at_length(batch: Batch, list_length: int) -> Batch:
    """The batch asking for min(list_length, n) items per request: its position mask says how
    many, which every decoder and the pipeline read. The placeholder ``exposed`` (distinct real
    candidates) is never decoded from, and without labels no model does teacher-forced work."""
    real = batch.candidate_mask.sum(1)
    # Never wider than the batch's candidates: matrix decoders take one item per column.
    width = max(1, min(list_length, int(real.max())))
    slots = torch.arange(width)
    mask = slots.unsqueeze(0) < real.clamp(max=width).unsqueeze(1)
    exposed = torch.where(mask, slots.expand(batch.batch_size, width), 0)
    return dataclasses.replace(batch, exposed=exposed, position_mask=mask, labels={})


def rerank_table(
    data_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    pipeline: str | Path | None = None,
    split: str = "test",
    decoder: str | None = None,
    decoder_params: dict[str, Any] | None = None,
    list_length: int | None = None,
    batch_size: int = BATCH_SIZE,
    show_progress: bool = True,
    constraints: ConstraintSet | None = None,
) -> pa.Table:
    """The re-ranked lists of ``split`` (``"all"``: every request) as a table of
    :data:`OUTPUT_SCHEMA` with its metadata; nothing is written. See :func:`rerank_dataset`."""
    from genrerank.evaluation.offline import count_violations, dataset_constraints
    from genrerank.experiment import _check_compatible

    if (run_dir is None) == (pipeline is None):
        raise ValueError("give exactly one of a run and a pipeline")
    if pipeline is not None and (decoder is not None or decoder_params):
        raise ValueError("a decoder applies to a run; a pipeline config names its own")
    if pipeline is not None and constraints is not None:
        raise ValueError("constraints apply to a run; a pipeline chooses among its generators' "
                         "lists and decodes under none")
    if list_length is not None and list_length < 1:
        raise ValueError(f"list length must be >= 1, got {list_length}")
    source: _RunSource | _PipelineSource = (
        _RunSource(Path(run_dir), decoder, decoder_params) if run_dir is not None
        else _PipelineSource(Path(pipeline)))  # type: ignore[arg-type]
    if list_length is not None and source.max_length is not None \
            and list_length > source.max_length:
        raise ValueError(f"list length {list_length} is longer than the model's "
                         f"{source.max_length} positions")
    dataset = RerankDataset(data_dir, split=None if split == "all" else split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split!r} split is empty")
    for model in source.models:
        _check_compatible(model.spec, dataset.spec)
    for model in source.models:
        model.eval()

    if constraints is None and isinstance(source, _RunSource):
        constraints = source.default_constraints
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    rows, lists_parts, score_parts = [], [], []
    violations = 0
    with progress(len(dataset), "rerank", "requests", enabled=show_progress) as bar:
        for batch in loader:
            if list_length is not None:
                batch = _at_length(batch, list_length)
            rcs = None if constraints is None else dataset_constraints(constraints, dataset,
                                                                       batch)
            lists, scores = source.lists_and_scores(batch, rcs)
            if rcs is not None:
                violations += count_violations(rcs, lists)
            lists, scores = lists.cpu().numpy(), scores.float().cpu().numpy()
            for b in range(lists.shape[0]):
                keep = lists[b] >= 0
                lists_parts.append(lists[b][keep])
                score_parts.append(scores[b][keep])
            rows.append(batch.request_index.numpy())
            bar.update(batch.batch_size)

    table = _output_table(dataset, np.concatenate(rows), lists_parts, score_parts,
                          source.version, source.decoder)
    meta: dict[str, Any] = {
        "run": None if run_dir is None else str(run_dir),
        "pipeline": None if pipeline is None else str(pipeline),
        "data": str(data_dir),
        "split": split,
        "decoder": source.decoder,
        "decoder_params": _json_safe(source.params),
        "list_length": list_length if list_length is not None else "logged",
        "model_version": source.version,
        "score": RUN_SCORE if run_dir is not None else PIPELINE_SCORE,
        "constraints": None if constraints is None else constraints.to_dict(),
        "constraint_violations": None if constraints is None else violations,
        "requests": len(dataset),
        "genrerank_version": genrerank.__version__,
    }
    if isinstance(source, _PipelineSource):
        meta["components"] = source.components
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def _output_table(dataset: RerankDataset, request_rows: np.ndarray,
                  lists: list[np.ndarray], scores: list[np.ndarray], version: str,
                  decoder: str) -> pa.Table:
    # request_index is the row in the whole file; the dataset's table holds the split's rows.
    local = np.searchsorted(dataset.rows, request_rows)
    if not np.array_equal(dataset.rows[local], request_rows):
        raise RuntimeError("rerank: a decoded request is not in the data set")  # cannot happen
    table = dataset.table.take(pa.array(local))
    lengths = np.array([len(x) for x in lists], dtype=np.int32)
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    items = table.column("item_id").combine_chunks()
    cand_start = items.offsets.to_numpy().astype(np.int64)[:-1] - int(items.offsets[0].as_py())
    picked = items.flatten().take(pa.array(np.repeat(cand_start, lengths) + flat))
    offsets_arr = pa.array(offsets)
    n = table.num_rows
    return pa.table({
        "request_id": table.column("request_id").cast(pa.string()),
        "user_id": table.column("user_id").cast(pa.string()),
        "split": table.column("split").cast(pa.string()),
        "item_id": pa.ListArray.from_arrays(offsets_arr, picked.cast(pa.string())),
        "candidate_index": pa.ListArray.from_arrays(offsets_arr,
                                                    pa.array(flat.astype(np.int32))),
        "score": pa.ListArray.from_arrays(
            offsets_arr, pa.array(np.concatenate(scores).astype(np.float32)
                                  if scores else np.zeros(0, np.float32))),
        "model_version": pa.array([version] * n, type=pa.string()),
        "decoder": pa.array([decoder] * n, type=pa.string()),
    }, schema=OUTPUT_SCHEMA)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- writing


def rerank_dataset(
    data_dir: str | Path,
    out_file: str | Path,
    *,
    run_dir: str | Path | None = None,
    pipeline: str | Path | None = None,
    split: str = "test",
    decoder: str | None = None,
    decoder_params: dict[str, Any] | None = None,
    list_length: int | None = None,
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
    show_progress: bool = True,
    constraints: ConstraintSet | None = None,
) -> RerankSummary:
    """Re-rank every request of ``split`` of ``data_dir`` (``"all"``: every request) with a
    finished run (its selected decoder, or ``decoder`` with ``decoder_params``) or a pipeline
    config, and write the lists to the Parquet file ``out_file`` (see the module docstring).
    Unfinished or failed runs are refused, as by ``evaluate``; so is an existing ``out_file``
    unless ``overwrite`` (checked before any work)."""
    start = time.perf_counter()
    out_file = Path(out_file)
    _check_target(out_file, overwrite)
    table = rerank_table(data_dir, run_dir=run_dir, pipeline=pipeline, split=split,
                         decoder=decoder, decoder_params=decoder_params,
                         list_length=list_length, batch_size=batch_size,
                         show_progress=show_progress, constraints=constraints)
    write_table_atomic(table, out_file, overwrite=overwrite)
    meta = read_rerank_metadata(table)
    lengths = pc.list_value_length(table.column("candidate_index"))
    return RerankSummary(
        path=out_file,
        requests=table.num_rows,
        list_length=list_length,
        max_length=int(pc.max(lengths).as_py() or 0),
        seconds=time.perf_counter() - start,
        model_version=meta["model_version"],
        decoder=meta["decoder"],
    )


def read_rerank_metadata(source: str | Path | pa.Table) -> dict[str, Any]:
    """The metadata object of a ``rerank`` output (a file or its table)."""
    schema = source.schema if isinstance(source, pa.Table) else pq.read_schema(source)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{source if not isinstance(source, pa.Table) else 'table'}: not a "
                         "genrerank rerank output (no metadata)")
    return json.loads(raw)
