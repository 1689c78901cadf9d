"""The near-line job: many lists per request, scored by the list reward, turned into pairs.

``genrerank nearline --generator RUN --evaluator RUN --data DIR --out PAIRS``. For each request
of the chosen splits (train and valid by default; test is never paired) it proposes K lists:

- ``samples`` distinct lists sampled from the generator (temperature ``temperature``),
- ``beams`` beam-search lists (stepwise models) or the generator's own decoded list,
- the upstream order and ``mmr`` MMR lists (diversity weights spread over (0, 1)),
- optionally each ``--teacher`` run's own decoded list (first, so a list a teacher and the
  generator both propose is labelled the teacher's): a stronger model's lists, typically the
  structured model's beam search, so that the pairs can reach lists the generator does not
  propose itself (DPO then distils the teacher into the generator),

scores each with the reward (:mod:`genrerank.rewards`) computed from the EVALUATOR's predictions
(the oracle is refused), keeps every term unweighted so the file can be re-weighted later, and
picks pairs with :func:`genrerank.data.pairs.select_pairs`. Lists have each request's logged
length. The output is written atomically; the job is seeded (same inputs, same file) and cheap
to rerun, so it has no resume.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import genrerank
from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.pairs import PairRule, pairs_table, select_pairs, write_pairs
from genrerank.pipeline import (
    DecodedListGenerator,
    MMRGenerator,
    ModelGenerator,
    Pipeline,
    UpstreamOrder,
)
from genrerank.rewards import (
    DEFAULT_REWARD,
    EvaluatorSignals,
    ListReward,
    combine,
    require_training_source,
)
from genrerank.utils.io import check_target
from genrerank.utils.progress import progress

#: Terms always stored per list (whatever the weights), so a sweep can re-weight the file.
STORED_TERMS = ("engagement", "diversity", "fairness")


def load_generator_and_evaluator(generator_run: str | Path, evaluator_run: str | Path
                                 ) -> tuple[torch.nn.Module, torch.nn.Module]:
    from genrerank.training import load_model
    from genrerank.training.runs import check_run

    generator, _ = load_model(check_run(generator_run), "best")
    evaluator, _ = load_model(check_run(evaluator_run), "best")
    if getattr(generator, "kind", "generator") != "generator":
        raise ValueError(f"{generator_run}: not a generator run (it writes no lists)")
    if not getattr(evaluator, "scores_lists", False):
        raise ValueError(f"{evaluator_run}: not a run that scores lists (train --model "
                         "evaluator, or --model structured)")
    return generator, evaluator


def proposal_pipeline(generator: torch.nn.Module, samples: int, beams: int, mmr: int,
                      temperature: float, seed: int,
                      teachers: Sequence[DecodedListGenerator] = ()) -> Pipeline:
    """The K-list proposal mix of the module docstring."""
    gens: list[Any] = list(teachers)
    if samples:
        gens.append(ModelGenerator(generator, "sample", count=samples, temperature=temperature,
                                   seed=seed))
    if beams:
        if getattr(generator, "stepwise", False):
            gens.append(ModelGenerator(generator, "beam", count=beams))
        else:
            gens.append(ModelGenerator(generator, "greedy", count=1))
    gens.append(UpstreamOrder())
    if mmr:
        gens.append(MMRGenerator(count=mmr))
    return Pipeline(gens, evaluator=None)


def run_nearline(
    generator_run: str | Path,
    evaluator_run: str | Path,
    data_dir: str | Path,
    out_file: str | Path,
    *,
    reward_config: Mapping[str, Any] | None = None,
    splits: Sequence[str] = ("train", "valid"),
    samples: int = 9,
    beams: int = 4,
    mmr: int = 2,
    temperature: float = 1.0,
    rule: PairRule | None = None,
    seed: int = 0,
    batch_size: int = 128,
    max_requests: int | None = None,
    teachers: Sequence[str | Path] = (),
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write the pairs file; returns a summary (requests, lists, pairs, reward gaps, time)."""
    started = time.perf_counter()
    out_file = Path(out_file)
    check_target(out_file, overwrite)  # refuse before the work, not after
    bad = [s for s in splits if s not in ("train", "valid")]
    if bad or not splits:
        raise ValueError(f"nearline: splits must be among train, valid (test is never paired), "
                         f"got {list(splits)}")
    rule = rule or PairRule()
    generator, evaluator = load_generator_and_evaluator(generator_run, evaluator_run)
    from genrerank.experiment import _check_compatible

    datasets = {s: RerankDataset(data_dir, split=s) for s in splits}
    spec = next(iter(datasets.values())).spec
    _check_compatible(generator.spec, spec)
    _check_compatible(evaluator.spec, spec)
    teacher_gens = [DecodedListGenerator.from_run(t) for t in teachers]
    for teacher in teacher_gens:  # a run that writes no lists is refused as it loads
        _check_compatible(teacher.model.spec, spec)
    reward = ListReward.from_config(reward_config or DEFAULT_REWARD, spec)
    source = EvaluatorSignals(evaluator)
    require_training_source(source, "nearline")
    stored = sorted(set(STORED_TERMS) | set(reward.weights))
    report = ListReward({t: 1.0 for t in stored},
                        {t: reward.terms[t].config() for t in reward.weights}, spec)
    pipe = proposal_pipeline(generator, samples, beams, mmr, temperature, seed, teacher_gens)
    labels = [_label(g) for g in pipe.generators]

    rows: list[dict[str, Any]] = []
    torch.manual_seed(seed)
    for split, dataset in datasets.items():
        n = len(dataset) if max_requests is None else min(len(dataset), max_requests)
        if n == 0:
            raise ValueError(f"{data_dir}: the {split!r} split is empty")
        subset = torch.utils.data.Subset(dataset, range(n))
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        for batch in progress(loader, f"nearline {split}", "batches", enabled=show_progress):
            lengths = batch.position_mask.sum(1)
            with torch.inference_mode():
                proposals = pipe.propose(batch, lengths)
                lists = proposals.lists.masked_fill(~proposals.valid.unsqueeze(-1), -1)
                scored = report(batch, lists, source)
            terms = {k: v.cpu().numpy() for k, v in scored.terms.items()}
            total = np.asarray(combine(terms, reward.weights))
            valid = proposals.valid.cpu().numpy()
            lists_np = lists.cpu().numpy()
            for b in range(batch.batch_size):
                keep = np.flatnonzero(valid[b])
                request_lists = [lists_np[b, k][lists_np[b, k] >= 0] for k in keep]
                request_reward = total[b, keep]
                rows.append({
                    "request_id": dataset.request_ids[_position(dataset, batch, b)],
                    "split": split,
                    "lists": request_lists,
                    "generators": [labels[proposals.source[k]] for k in keep],
                    "reward": request_reward,
                    "terms": {t: terms[t][b, keep] for t in stored},
                    "pairs": select_pairs(request_reward, request_lists, rule),
                })
    table = pairs_table(rows, stored)
    meta = {
        "reward": reward.to_config(),
        "reward_source": source.name,
        "generator_run": str(generator_run),
        "evaluator_run": str(evaluator_run),
        "data": str(data_dir),
        "splits": list(splits),
        "rule": {"delta": rule.delta, "max_pairs": rule.max_pairs, "min_diff": rule.min_diff},
        "proposals": {"samples": samples, "beams": beams, "mmr": mmr,
                      "temperature": temperature, "generators": labels,
                      "teachers": [str(t) for t in teachers]},
        "seed": seed,
        "genrerank_version": genrerank.__version__,
    }
    write_pairs(table, meta, out_file, overwrite=overwrite)
    return summarize(rows, time.perf_counter() - started, out_file, labels)


def _label(gen: Any) -> str:
    if isinstance(gen, DecodedListGenerator):
        return gen.label
    if isinstance(gen, ModelGenerator):
        return f"{gen.model.name} ({gen.decoder})"
    return "upstream" if isinstance(gen, UpstreamOrder) else gen.label


def _position(dataset: RerankDataset, batch: Any, b: int) -> int:
    """Position in ``dataset`` of row ``b`` of a batch (``request_index`` is the table row)."""
    return int(np.searchsorted(dataset.rows, int(batch.request_index[b])))


def summarize(rows: Sequence[Mapping[str, Any]], seconds: float, out_file: Path,
              labels: Sequence[str] = ()) -> dict[str, Any]:
    pairs = [len(r["pairs"]) for r in rows]
    gaps = [r["reward"][w] - r["reward"][lo] for r in rows for w, lo in r["pairs"]]
    # Which proposer wrote the winners: tells whether the pairs teach anything new.
    winners = [r["generators"][r["pairs"][0][0]] for r in rows if len(r["pairs"])]
    return {
        "winner_share": {g: winners.count(g) / len(winners) for g in labels if winners},
        "out": str(out_file),
        "requests": len(rows),
        "lists_per_request": float(np.mean([len(r["lists"]) for r in rows])) if rows else 0.0,
        "pairs": int(sum(pairs)),
        "requests_with_pairs": float(np.mean([p > 0 for p in pairs])) if rows else 0.0,
        "mean_reward_gap": float(np.mean(gaps)) if gaps else float("nan"),
        "seconds": round(seconds, 1),
    }
