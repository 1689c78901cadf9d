"""Property tests: the autoregressive model's greedy, beam and sampling under constraints.

A tiny untrained model (seeded) on a small simulated data set; each case is a batch of
requests cut to random candidate counts (padding) with random creators and flags and a random
constraint set per request. Lists must satisfy their constraints, infeasible batches must
raise, and decoding without constraints is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from genrerank.constraints import (
    ConstraintSet,
    InfeasibleConstraints,
    Quota,
    constraints_for_batch,
)
from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.decoding import DecodedLists
from genrerank.models import build_model
from genrerank.models.autoregressive import Autoregressive
from tests.constraints._random import CASES, Request, random_set
from tests.constraints.test_decoders import check_output
from tests.models._requests import shrink_request

DECODERS = {"ar_greedy": ("greedy", {}), "ar_beam": ("beam", {"beam_width": 3, "k": 2}),
            "ar_sample": ("sample", {"k": 3, "seed": 3, "top_k": 5})}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out: Path = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 24, 5, out, progress=False)
    return RerankDataset(out)


@pytest.fixture(scope="module")
def model(data: RerankDataset) -> Autoregressive:
    torch.manual_seed(0)
    m = build_model("autoregressive", data.spec, {"dim": 16, "n_heads": 2, "n_kv_heads": 1,
                                                  "encoder_layers": 1, "decoder_layers": 1})
    with torch.no_grad():  # zero at init: give the list context weight
        m.list_context.pair.normal_(0.0, 1.0)
    return m.eval()


def _batch(data: RerankDataset, rng: np.random.Generator) -> tuple[Batch, list[list[str]]]:
    """2-3 requests cut to random sizes (padding), with random creators and flags."""
    rows = rng.choice(len(data), int(rng.integers(2, 4)), replace=False)
    items = []
    for i in rows.tolist():
        item = data[i]
        n = int(rng.integers(2, min(30, len(item["upstream_score"])) + 1))
        items.append(shrink_request(item, n, exposed=int(rng.integers(1, 7))))
    batch = collate(items)
    b, n = batch.candidate_mask.shape
    batch = dataclasses.replace(
        batch, creator=torch.from_numpy(rng.integers(0, max(2, n // 2), (b, n))),
        is_cold_start=torch.from_numpy(rng.random((b, n)) < 0.3),
        is_long_tail=torch.from_numpy(rng.random((b, n)) < 0.3))
    ids = [[f"v{j}" for j in range(n)] for _ in range(b)]
    return batch, ids


def _sets(batch: Batch, ids: list[list[str]], lengths: torch.Tensor,
          rng: np.random.Generator) -> list[ConstraintSet | None]:
    sets: list[ConstraintSet | None] = []
    for r in range(batch.batch_size):
        req = Request(batch.category[r].numpy(), batch.creator[r].numpy(),
                      batch.is_cold_start[r].numpy(), batch.is_long_tail[r].numpy(),
                      batch.candidate_mask[r].numpy(), ids[r], int(lengths[r]))
        cs = random_set(rng, req)
        for _ in range(10):  # mostly feasible sets, so most batches decode
            if req.compile(cs).feasible() or rng.random() < 0.15:
                break
            cs = random_set(rng, req)
        sets.append(None if rng.random() < 0.1 else cs)
    return sets


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_generated_list_satisfies_every_constraint(
        name: str, data: RerankDataset, model: Autoregressive, tally: Counter) -> None:
    decoder, params = DECODERS[name]
    rng = np.random.default_rng(list(DECODERS).index(name))
    for _ in range(max(4, CASES // 2)):
        batch, ids = _batch(data, rng)
        lengths = batch.position_mask.sum(1)
        rcs = constraints_for_batch(_sets(batch, ids, lengths, rng), batch, lengths,
                                    item_ids=ids)
        p = {"mask": batch.candidate_mask, "lengths": lengths, "rcs": rcs}
        if not all(rc is None or rc.feasible() for rc in rcs):
            with pytest.raises(InfeasibleConstraints):
                model.generate(batch, lengths, decoder, constraints=rcs, **params)
            tally[(name, "infeasible")] += 1
            continue
        for use_cache in (True, False):
            try:
                out = model.generate(batch, lengths, decoder, constraints=rcs,
                                     use_cache=use_cache, **params)
            except Exception:
                tally[(name, "failures")] += 1
                raise
            tally[(name, "cases")] += 1
            check_output(name, p, out, tally)
            if isinstance(out, DecodedLists):  # scores stay the model's log-probabilities
                assert torch.isfinite(out.scores[:, 0]).all()


@pytest.mark.parametrize("name", list(DECODERS))
def test_unconstrained_generation_is_unchanged(name: str, data: RerankDataset,
                                               model: Autoregressive) -> None:
    decoder, params = DECODERS[name]
    rng = np.random.default_rng(50)
    batch, ids = _batch(data, rng)
    lengths = batch.position_mask.sum(1)
    plain = model.generate(batch, lengths, decoder, **params)
    empty = constraints_for_batch(ConstraintSet(quotas=(Quota("cold_start"),)), batch, lengths)
    assert empty == [None] * batch.batch_size
    for constraints in (None, empty):
        got = model.generate(batch, lengths, decoder, constraints=constraints, **params)
        if isinstance(plain, DecodedLists):
            assert torch.equal(plain.lists, got.lists) and torch.equal(plain.scores, got.scores)
        else:
            assert torch.equal(plain, got)


def test_ids_are_matched_by_hash_without_item_ids(data: RerankDataset,
                                                  model: Autoregressive) -> None:
    """A data set's batch carries item hashes: required / forbidden ids work without ids."""
    batch = collate([data[i] for i in range(3)])
    lengths = batch.position_mask.sum(1)
    names = [data.table.column("item_id")[i].as_py() for i in range(3)]
    cs = [ConstraintSet(required=(names[r][-1],), forbidden=(names[r][0],)) for r in range(3)]
    lists = model.generate(batch, lengths, "greedy",
                           constraints=constraints_for_batch(cs, batch, lengths))
    for r in range(3):
        row = [i for i in lists[r].tolist() if i >= 0]
        assert len(names[r]) - 1 in row and 0 not in row
