"""Autoregressive pointer generator: the KV cache changes nothing, teacher forcing and step-by-step
decoding agree, lists are valid under any padding, and grouped-query attention is what it says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.decoding import DecodedLists
from genrerank.losses.base import exposed_log_probs
from genrerank.models import build_model
from genrerank.models.autoregressive import Autoregressive
from genrerank.modules.attention import GroupedQueryAttention
from tests.models._requests import PER_CANDIDATE, shrink_request


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 48, 3, out, progress=False)
    return RerankDataset(out)


def _model(data: RerankDataset, **cfg: int) -> Autoregressive:
    torch.manual_seed(0)
    model = build_model("autoregressive", data.spec, {"dim": 32, "n_heads": 4, "n_kv_heads": 2,
                                                      **cfg})
    if model.list_context is not None:  # zero at init: give it weight so every test covers it
        with torch.no_grad():
            model.list_context.pair.normal_(0.0, 1.0)
            model.list_context.decay_logit.fill_(0.4)
    return model.eval()


def _ragged(data: RerankDataset, size: int, seed: int) -> Batch:
    """Requests cut to random numbers of candidates and exposed items: a padded batch."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(size):
        item = data[i]
        n = int(torch.randint(3, len(item["upstream_score"]) + 1, (1,), generator=gen))
        keep = item["exposed"] < n
        m = int(torch.randint(1, int(keep.sum()) + 1, (1,), generator=gen)) if keep.any() else 0
        items.append(shrink_request(item, n, exposed=m))
    return collate(items)


DECODERS = [("greedy", {}), ("beam", {"beam_width": 5, "k": 3}), ("sample", {"k": 4, "seed": 7})]


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("decoder", "params"), DECODERS)
def test_cached_decoding_returns_exactly_the_lists_of_full_recomputation(
    data: RerankDataset, n_kv_heads: int, decoder: str, params: dict
) -> None:
    model = _model(data, n_kv_heads=n_kv_heads)
    for batch, length in ((collate([data[i] for i in range(12)]), 6),
                          (_ragged(data, 12, seed=n_kv_heads), None)):
        lengths = batch.position_mask.sum(1) if length is None else length
        cached = model.generate(batch, lengths, decoder, use_cache=True, **params)
        full = model.generate(batch, lengths, decoder, use_cache=False, **params)
        if isinstance(cached, DecodedLists):
            assert torch.equal(cached.lists, full.lists)
            torch.testing.assert_close(cached.scores, full.scores, rtol=0, atol=1e-4)
        else:
            assert torch.equal(cached, full)


def test_step_log_probs_of_cache_and_recomputation_agree(data: RerankDataset) -> None:
    model = _model(data)
    batch = _ragged(data, 10, seed=1)
    with torch.inference_mode():
        states = [model._start_state(batch, use_cache) for use_cache in (True, False)]
        previous = None
        for _ in range(4):
            a, b = (model._step(s, previous) for s in states)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            previous = a.argmax(1)
            for s in states:
                s.chosen[torch.arange(batch.batch_size), previous] = True


def _with_lists(batch: Batch, lists: torch.Tensor) -> Batch:
    """``batch`` whose logged lists are ``lists`` ([B, m], -1 = empty slot)."""
    filled = lists >= 0
    return dataclasses.replace(
        batch, exposed=lists.clamp(min=0), position_mask=filled,
        labels={s: torch.zeros(lists.shape) for s in batch.labels},
    )


def test_teacher_forcing_scores_generated_lists_as_decoding_did(data: RerankDataset) -> None:
    """forward() and generate() are one model: a generated list, fed back as the logged list,
    gets the log-probability the decoder computed for it."""
    model = _model(data)
    batch = collate([data[i] for i in range(8)])
    found = model.generate(batch, 6, "beam", beam_width=4, k=4)
    for j in range(found.lists.shape[1]):
        forced = _with_lists(batch, found.lists[:, j])
        with torch.inference_mode():
            total = exposed_log_probs(model(forced).log_probs, forced).sum(1)
        torch.testing.assert_close(total, found.scores[:, j], rtol=0, atol=1e-4)


def test_greedy_list_is_the_best_one_step_choice_under_teacher_forcing(
    data: RerankDataset,
) -> None:
    model = _model(data)
    batch = collate([data[i] for i in range(8)])
    lists = model.generate(batch, 6, "greedy")
    with torch.inference_mode():
        log_probs = model(_with_lists(batch, lists)).log_probs  # [B, N, 6]
    assert torch.equal(log_probs.argmax(1), lists)


@pytest.mark.parametrize(("decoder", "params"), DECODERS)
def test_lists_are_distinct_real_and_cut_at_their_length(
    data: RerankDataset, decoder: str, params: dict
) -> None:
    model = _model(data)
    for seed in range(3):
        batch = _ragged(data, 16, seed=10 + seed)
        lengths = batch.position_mask.sum(1)
        out = model.generate(batch, lengths, decoder, **params)
        if isinstance(out, DecodedLists):
            lists, valid = out.lists, out.valid
        else:
            lists = out.unsqueeze(1)
            valid = torch.ones(lists.shape[:2], dtype=torch.bool)
        for b in range(batch.batch_size):
            real = int(batch.candidate_mask[b].sum())
            want = min(int(lengths[b]), real)
            keys = set()
            for k in range(lists.shape[1]):
                row = lists[b, k]
                if not valid[b, k]:
                    assert (row == -1).all()
                    continue
                items = row[row >= 0].tolist()
                assert row[:want].ge(0).all() and row[want:].eq(-1).all()
                assert len(set(items)) == len(items) and all(i < real for i in items)
                keys.add(tuple(items))
            assert len(keys) == int(valid[b].sum())  # multi-list decoders: K distinct lists
            assert valid[b, 0]


def test_a_request_decodes_the_same_alone_and_padded_in_a_batch(data: RerankDataset) -> None:
    model = _model(data)
    batch = _ragged(data, 6, seed=4)
    lengths = batch.position_mask.sum(1)
    together = model.generate(batch, lengths, "beam", beam_width=3)
    for b in range(batch.batch_size):
        single = collate([_single(data, batch, b)])
        got = model.generate(single, lengths[b:b + 1], "beam", beam_width=3)
        width = single.position_mask.shape[1]
        assert torch.equal(got.lists[0], together.lists[b, :, :width])
        assert together.lists[b, :, width:].eq(-1).all()
        torch.testing.assert_close(got.scores[0], together.scores[b], rtol=0, atol=1e-4)


def _single(data: RerankDataset, batch: Batch, b: int) -> dict:
    """Request b of a padded batch as an un-padded dataset item."""
    n = int(batch.candidate_mask[b].sum())
    m = int(batch.position_mask[b].sum())
    item = dict(data[b])
    for key in PER_CANDIDATE:
        item[key] = item[key][:n]
    item["exposed"] = batch.exposed[b, :m].numpy()
    item["labels"] = {s: v[b, :m].numpy() for s, v in batch.labels.items()}
    return item


def test_matrix_decoders_and_bad_settings_are_refused(data: RerankDataset) -> None:
    model = _model(data)
    batch = collate([data[i] for i in range(2)])
    with pytest.raises(ValueError, match="hungarian"):
        model.generate(batch, 6, "hungarian")
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(batch, 7, "greedy")
    with pytest.raises(ValueError, match="k <= beam_width"):
        model.generate(batch, 6, "beam", beam_width=2, k=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_model("autoregressive", data.spec, {"dim": 32, "n_heads": 4, "n_kv_heads": 3})


def test_grouped_query_attention_shares_each_kv_head_across_its_query_group() -> None:
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=16, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(3, 5, 16)
    k, v = attn.project_kv(x)
    assert k.shape == v.shape == (3, 2, 5, 4)  # the cache holds 2 heads, not 4
    q = attn.query(x).view(3, 5, 4, 4).transpose(1, 2)
    heads = []
    for h in range(4):
        g = h // 2  # query heads 0, 1 -> kv head 0; 2, 3 -> kv head 1
        weights = torch.softmax(q[:, h] @ k[:, g].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[:, g])
    expected = attn.out(torch.stack(heads, 1).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn.attend(x, (k, v)), expected, rtol=1e-5, atol=1e-5)


def test_trains_with_the_nar4rec_losses(data: RerankDataset, tmp_path: Path) -> None:
    from genrerank.losses import build_objective

    model = _model(data)
    model.train()
    objective = build_objective([{"name": "unlikelihood", "tau": 0.5},
                                 {"name": "contrastive", "weight": 0.1},
                                 {"name": "click_bce"}])
    batch = collate([data[i] for i in range(16)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        total, _ = objective(model(batch), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
