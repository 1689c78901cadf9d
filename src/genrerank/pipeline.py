"""Generator-evaluator (G-E) re-ranking: several generators propose K lists, an evaluator scores
them, the best is served.

From Python::

    from genrerank.pipeline import Pipeline
    pipe = Pipeline.from_config("pipeline.json")      # or a dict
    served = pipe.rerank(batch, list_length=6)        # served.lists [B, 6]

A configuration names the evaluator run and the generators, in priority order::

    {
      "evaluator": "runs/evaluator",
      "max_lists": 64,
      "generators": [
        {"type": "logging"},
        {"type": "mmr", "diversities": [0.2, 0.5]},
        {"type": "perturb", "count": 8, "swaps": 2, "seed": 0},
        {"type": "nar4rec", "run": "runs/nar4rec", "decoder": "sample", "count": 16},
        {"type": "autoregressive", "run": "runs/autoregressive", "decoder": "beam", "count": 8}
      ]
    }

Run paths are relative to the configuration file. Generators are asked for their ``count`` lists
in order; ``max_lists`` (optional) caps the total K. Duplicate lists are removed (the first
occurrence is kept) before the evaluator scores what is left, so K is the number of proposals and
at most K distinct lists are scored. Every list is a ``[m]`` row of candidate indices with ``-1``
past the request's length; padded candidates are never proposed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrerank.data.dataset import Batch
from genrerank.decoding import DecodedLists, mask_beyond_length
from genrerank.models.base import RerankModel
from genrerank.models.heuristics import mmr, upstream_order

__all__ = [
    "GENERATORS",
    "ListGenerator",
    "Pipeline",
    "Proposals",
    "Reranked",
    "build_generator",
    "dedupe_lists",
    "register_generator",
]


def list_lengths(batch: Batch, list_length: int | torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-request lengths ``[B]`` (capped by the real candidates) and the output width."""
    real = batch.candidate_mask.sum(1)
    if isinstance(list_length, torch.Tensor) and list_length.dim() == 1:
        lengths = list_length.to(torch.long)
        width = int(lengths.max()) if lengths.numel() else 0
    else:
        width = int(list_length)
        if width < 1:
            raise ValueError(f"list length must be >= 1, got {width}")
        lengths = torch.full_like(real, width)
    return torch.minimum(lengths, real), width


class ListGenerator:
    """Proposes ``count`` lists per request: ``propose(batch, lengths, width, count)`` returns
    ``[B, count', m]`` (count' <= count; -1 = empty slot, an all -1 row = no list)."""

    #: Registry name, set by :func:`register_generator`.
    type: str = ""

    def __init__(self, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"generator {self.type!r}: count must be >= 1, got {count}")
        self.count = count

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.type


GENERATORS: dict[str, Callable[..., ListGenerator]] = {}


def register_generator(name: str) -> Callable[[type[ListGenerator]], type[ListGenerator]]:
    def add(cls: type[ListGenerator]) -> type[ListGenerator]:
        if name in GENERATORS:
            raise ValueError(f"generator {name!r} registered twice")
        cls.type = name
        GENERATORS[name] = cls
        return cls

    return add


def _numpy_inputs(batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (batch.upstream_score.float().numpy(), batch.category.numpy(),
            batch.candidate_mask.numpy())


@register_generator("logging")
class UpstreamOrder(ListGenerator):
    """The upstream order (what the logging model serves): one list whatever ``count`` is."""

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        scores, _, mask = _numpy_inputs(batch)
        lists = torch.from_numpy(upstream_order(scores, mask, width))
        return mask_beyond_length(lists, lengths).unsqueeze(1)


@register_generator("mmr")
class MMRGenerator(ListGenerator):
    """Maximal marginal relevance over categories, one list per diversity weight lambda.

    ``diversities`` fixes the weights; otherwise ``count`` weights spread evenly over (0, 1).
    """

    def __init__(self, count: int = 1, diversities: Sequence[float] | None = None) -> None:
        super().__init__(len(diversities) if diversities else count)
        self.diversities = list(diversities) if diversities else None

    def weights(self, count: int) -> list[float]:
        if self.diversities:
            return self.diversities[:count]
        return [(i + 1) / (count + 1) for i in range(count)]

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        scores, categories, mask = _numpy_inputs(batch)
        lists = [torch.from_numpy(mmr(scores, categories, mask, width, diversity=w))
                 for w in self.weights(count)]
        return mask_beyond_length(torch.stack(lists, 1), lengths)


@register_generator("perturb")
class PerturbGenerator(ListGenerator):
    """Random swaps of the upstream order: each list makes ``swaps`` transpositions between a
    shown slot and any of the top ``width + extra`` upstream candidates, so items just below the
    cut can enter. Seeded: the same batch gives the same lists."""

    def __init__(self, count: int = 8, swaps: int = 2, extra: int = 4, seed: int = 0) -> None:
        super().__init__(count)
        if swaps < 1 or extra < 0:
            raise ValueError(f"perturb: need swaps >= 1 and extra >= 0, got {swaps}, {extra}")
        self.swaps, self.extra, self.seed = swaps, extra, seed

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        scores, _, mask = _numpy_inputs(batch)
        b = scores.shape[0]
        pool = min(width + self.extra, scores.shape[1])
        order = upstream_order(scores, mask, pool)  # [B, pool], -1 past the real candidates
        depth = np.maximum(np.minimum((order >= 0).sum(1), pool), 1)  # usable pool per request
        rng = np.random.default_rng(self.seed)
        lists = np.repeat(order[:, None, :], count, axis=1)  # [B, count, pool]
        rows = np.arange(b)[:, None]
        cols = np.arange(count)[None, :]
        shown = np.maximum(np.minimum(lengths.numpy(), depth), 1)[:, None]
        for _ in range(self.swaps):
            i = (rng.random((b, count)) * shown).astype(np.int64)  # a shown slot
            j = (rng.random((b, count)) * depth[:, None]).astype(np.int64)  # any pool slot
            a, c = lists[rows, cols, i], lists[rows, cols, j]
            lists[rows, cols, i], lists[rows, cols, j] = c, a
        out = torch.from_numpy(np.ascontiguousarray(lists[:, :, :width]))
        if out.shape[2] < width:
            pad = torch.full((b, count, width - out.shape[2]), -1, dtype=torch.long)
            out = torch.cat([out, pad], dim=2)
        return mask_beyond_length(out, lengths)

    @property
    def label(self) -> str:
        return f"perturb (swaps {self.swaps})"


class ModelGenerator(ListGenerator):
    """A trained generator's lists: ``sample`` (distinct samples, most likely first), ``beam``
    (the best beams) or any single-list decoder (one list)."""

    model_name: str = ""

    def __init__(self, model: RerankModel, decoder: str = "sample", count: int = 8,
                 **params: Any) -> None:
        super().__init__(count)
        if self.model_name and model.name != self.model_name:
            raise ValueError(f"generator {self.type!r} needs a {self.model_name!r} run, got a "
                             f"{model.name!r} model")
        if model.kind != "generator":
            raise ValueError(f"generator {self.type!r}: model {model.name!r} does not write lists")
        self.model = model.eval()
        self.decoder = decoder
        self.params = params

    @classmethod
    def from_run(cls, run: str | Path, **kwargs: Any) -> ModelGenerator:
        from genrerank.training import load_model
        from genrerank.training.runs import check_run

        model, _ = load_model(check_run(run), "best")
        return cls(model, **kwargs)

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        params = dict(self.params)
        if self.decoder == "sample":
            params["k"] = count
        elif self.decoder == "beam":
            params["k"] = count
            params["beam_width"] = max(count, int(params.get("beam_width", count)))
        with torch.inference_mode():
            found = self.model.generate(batch, lengths, self.decoder, **params)
        if isinstance(found, DecodedLists):
            lists = found.lists.masked_fill(~found.valid.unsqueeze(-1), -1)
        else:
            lists = found.unsqueeze(1)
        return lists[:, :, :width]

    @property
    def label(self) -> str:
        return f"{self.type} ({self.decoder})"


@register_generator("nar4rec")
class NAR4RecGenerator(ModelGenerator):
    model_name = "nar4rec"


@register_generator("autoregressive")
class AutoregressiveGenerator(ModelGenerator):
    model_name = "autoregressive"


@register_generator("decoded")
class DecodedListGenerator(ModelGenerator):
    """One list per request: a trained run's own decoded list, with the decoder and options its
    run config names (``from_run``), e.g. the structured model's beam search under its own gain.
    Unlike ``decoder="beam"`` no ``k`` or width is imposed, so models that decode one list
    (the structured model) can propose."""

    def __init__(self, model: RerankModel, decoder: str = "greedy", count: int = 1,
                 **params: Any) -> None:
        super().__init__(model, decoder, 1, **params)

    @classmethod
    def from_run(cls, run: str | Path, decoder: str | None = None,
                 params: dict[str, Any] | None = None, **unknown: Any) -> ModelGenerator:
        """The run's own decoder (or ``decoder``), its options updated with ``params``."""
        from genrerank.experiment import load_run_for_decoding

        if unknown:
            raise ValueError(f"generator 'decoded': unknown option(s) {sorted(unknown)}; it "
                             "takes 'run', and optionally 'decoder' and 'params'")
        model, _, decode = load_run_for_decoding(run, decoder, params)
        return cls(model, decode.pop("name"), **decode)

    def propose(self, batch: Batch, lengths: torch.Tensor, width: int,
                count: int) -> torch.Tensor:
        with torch.inference_mode():
            found = self.model.generate(batch, lengths, self.decoder, **self.params)
        if isinstance(found, DecodedLists):
            lists = found.lists.masked_fill(~found.valid.unsqueeze(-1), -1)[:, :1]
        else:
            lists = found.unsqueeze(1)
        lists = lists[:, :, :width].clone()
        if lists.shape[2] < width:
            lists = torch.nn.functional.pad(lists, (0, width - lists.shape[2]), value=-1)
        return mask_beyond_length(lists, lengths)

    @property
    def label(self) -> str:
        return f"{self.model.name} ({self.decoder}, own list)"


@register_generator("model")
class AnyModelGenerator(ModelGenerator):
    """Any trained generator run (pointwise, prm, ...)."""


def build_generator(config: Mapping[str, Any], base_dir: Path | None = None) -> ListGenerator:
    """A generator from its configuration entry (``type`` plus options; ``run`` for models)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in GENERATORS:
        raise ValueError(f"pipeline: unknown generator type {kind!r}; known: {sorted(GENERATORS)}")
    cls = GENERATORS[kind]
    if issubclass(cls, ModelGenerator):  # type: ignore[arg-type]
        if "run" not in cfg:
            raise ValueError(f"pipeline: generator {kind!r} needs a 'run' folder")
        run = Path(cfg.pop("run"))
        if base_dir is not None and not run.is_absolute():
            run = base_dir / run
        return cls.from_run(run, **cfg)  # type: ignore[attr-defined]
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise ValueError(f"pipeline: generator {kind!r}: {exc}") from None


def dedupe_lists(lists: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``[B, K]`` mask of the lists to keep: not empty, and not equal to an earlier list of the
    same request."""
    b, k, _ = lists.shape
    keep = torch.zeros(b, k, dtype=torch.bool)
    earlier = torch.ones(k, k, dtype=torch.bool).tril(-1)  # [i, j]: j < i
    for start in range(0, b, chunk):
        part = lists[start:start + chunk]
        same = (part.unsqueeze(2) == part.unsqueeze(1)).all(-1)  # [b, K, K]
        repeated = (same & earlier).any(-1)
        keep[start:start + chunk] = ~repeated & (part >= 0).any(-1)
    return keep


@dataclass
class Proposals:
    """All proposed lists of a batch: ``lists [B, K, m]``, ``valid [B, K]`` (distinct, non-empty),
    ``source [K]`` index of the generator that proposed each column."""

    lists: torch.Tensor
    valid: torch.Tensor
    source: list[int]


@dataclass
class Reranked:
    """What the pipeline serves: ``lists [B, m]`` (the evaluator's best), their ``scores [B]``,
    ``chosen [B]`` (column in the proposals) and the scored ``proposals``."""

    lists: torch.Tensor
    scores: torch.Tensor
    chosen: torch.Tensor
    proposals: Proposals
    proposal_scores: torch.Tensor  # [B, K], -inf for removed lists


class Pipeline:
    def __init__(self, generators: Sequence[ListGenerator], evaluator: RerankModel | None,
                 max_lists: int | None = None) -> None:
        if not generators:
            raise ValueError("pipeline: needs at least one generator")
        if evaluator is not None and not getattr(evaluator, "scores_lists", False):
            raise ValueError(f"pipeline: {evaluator.name!r} does not score lists (use the "
                             "list evaluator or the structured model)")
        if max_lists is not None and max_lists < 1:
            raise ValueError(f"pipeline: max_lists must be >= 1, got {max_lists}")
        self.generators = list(generators)
        self.evaluator = evaluator.eval() if evaluator is not None else None
        self.max_lists = max_lists

    @classmethod
    def from_config(cls, config: str | Path | Mapping[str, Any]) -> Pipeline:
        base_dir = None
        if not isinstance(config, Mapping):
            path = Path(config)
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            base_dir = path.parent
        unknown = sorted(set(config) - {"evaluator", "generators", "max_lists"})
        if unknown:
            raise ValueError(f"pipeline config: unknown key(s) {unknown}")
        if not config.get("generators"):
            raise ValueError("pipeline config: 'generators' must list at least one generator")
        generators = [build_generator(g, base_dir) for g in config["generators"]]
        evaluator = None
        if config.get("evaluator"):
            from genrerank.training import load_model
            from genrerank.training.runs import check_run

            run = Path(config["evaluator"])
            if base_dir is not None and not run.is_absolute():
                run = base_dir / run
            evaluator, _ = load_model(check_run(run), "best")
        return cls(generators, evaluator, config.get("max_lists"))

    @property
    def total_lists(self) -> int:
        total = sum(g.count for g in self.generators)
        return min(total, self.max_lists) if self.max_lists else total

    @torch.inference_mode()
    def propose(self, batch: Batch, list_length: int | torch.Tensor,
                max_lists: int | None = None) -> Proposals:
        """Every generator's lists, in generator order, capped at ``max_lists`` (default: the
        configured cap)."""
        if max_lists is not None and max_lists < 1:
            raise ValueError(f"pipeline: max_lists must be >= 1, got {max_lists}")
        lengths, width = list_lengths(batch, list_length)
        budget = self.total_lists if max_lists is None else min(self.total_lists, max_lists)
        parts, source = [], []
        for g, gen in enumerate(self.generators):
            count = min(gen.count, budget - len(source))
            if count <= 0:
                break
            lists = gen.propose(batch, lengths, width, count)
            parts.append(lists)
            source += [g] * lists.shape[1]
        lists = torch.cat(parts, dim=1)
        return Proposals(lists, dedupe_lists(lists), source)

    @torch.inference_mode()
    def rerank(self, batch: Batch, list_length: int | torch.Tensor,
               max_lists: int | None = None) -> Reranked:
        """Propose (at most ``max_lists``), score with the evaluator, serve the best list of
        each request."""
        if self.evaluator is None:
            raise ValueError("pipeline: no evaluator configured to choose among the lists")
        proposals = self.propose(batch, list_length, max_lists)
        scores = self.evaluator.score_lists(batch, proposals.lists, proposals.valid)
        scores = scores.masked_fill(~proposals.valid, float("-inf"))
        best, chosen = scores.max(1)
        lists = proposals.lists[torch.arange(batch.batch_size), chosen]
        return Reranked(lists, best, chosen, proposals, scores)
