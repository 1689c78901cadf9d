"""Multi-token prediction heads of the autoregressive model: off means today's model exactly;
training and decoding compute the same head scores; self-speculative greedy returns the lists
of plain greedy (random and trained models, ragged batches), in the number of calls its
acceptance implies; the unverified mode writes valid lists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.evaluation.offline import decode_lists
from genrerank.losses import build_objective
from genrerank.models import build_model
from genrerank.models import mtp as mtp_module
from genrerank.models.autoregressive import Autoregressive
from genrerank.models.mtp import speculative_greedy
from tests.models._requests import PER_CANDIDATE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 48, 3, out, progress=False)
    return RerankDataset(out)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    """Long lists (m = 50, n = 500), for many verification calls per list."""
    out = tmp_path_factory.mktemp("sim") / "large"
    simulate_to_dir("large", 12, 5, out, progress=False, allow_missing_splits=True)
    return RerankDataset(out)


def _model(data: RerankDataset, heads: int = 3, *, scramble: bool = True,
           **cfg: object) -> Autoregressive:
    torch.manual_seed(0)
    model = build_model("autoregressive", data.spec, {"dim": 32, "n_heads": 4, "n_kv_heads": 2,
                                                      "mtp_heads": heads, **cfg})
    with torch.no_grad():
        if model.list_context is not None:  # zero at init: give it weight
            model.list_context.pair.normal_(0.0, 1.0)
            model.list_context.decay_logit.fill_(0.4)
        if scramble and model.mtp is not None:  # heads start as the identity: make them differ
            model.mtp.out_weight.normal_(0.0, 0.3)
    return model.eval()


def _requests(data: RerankDataset, size: int, seed: int, max_n: int | None = None,
              max_m: int | None = None) -> list[dict]:
    """Requests with random numbers of candidates and logged items (a prefix of the logged
    list, at most ``max_m``; the candidates: those items and random others, shuffled), so that
    batches are ragged in n and m and long lists fit among few candidates."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(size):
        item = data[i % len(data)]
        total = len(item["upstream_score"])
        shown = item["exposed"][:max_m]
        m = int(rng.integers(0, len(shown) + 1))
        n = int(rng.integers(max(m, 2), max(min(total, max_n or total), m, 2) + 1))
        others = np.setdiff1d(np.arange(total), shown[:m])
        idx = rng.permutation(np.concatenate([shown[:m],
                                              rng.choice(others, n - m, replace=False)]))
        out = dict(item)
        for key in PER_CANDIDATE:
            out[key] = item[key][idx]
        out["exposed"] = np.array([int(np.flatnonzero(idx == c)[0]) for c in shown[:m]],
                                  dtype=np.int64)
        out["labels"] = {s: v[:m] for s, v in item["labels"].items()}
        items.append(out)
    return items


def _ragged(data: RerankDataset, size: int, seed: int, max_n: int | None = None,
            max_m: int | None = None) -> Batch:
    return collate(_requests(data, size, seed, max_n, max_m))


def _greedy_and_mtp(model: Autoregressive, batch: Batch, verify: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, mtp_module.SpeculativeStats]:
    lengths = batch.position_mask.sum(1)
    plain = model.generate(batch, lengths, "greedy")
    lengths, width = model._lengths(batch, lengths)
    lists, stats = speculative_greedy(model, batch, lengths, width, verify)
    return plain, lists, stats


# ---------------------------------------------------------------------------- off = unchanged


def test_no_heads_is_the_model_without_the_option(data: RerankDataset) -> None:
    torch.manual_seed(0)
    before = build_model("autoregressive", data.spec, {"dim": 32}).eval()
    torch.manual_seed(0)
    off = build_model("autoregressive", data.spec, {"dim": 32, "mtp_heads": 0}).eval()
    torch.manual_seed(0)
    on = build_model("autoregressive", data.spec, {"dim": 32, "mtp_heads": 2}).eval()
    assert off.mtp is None
    assert list(off.state_dict()) == list(before.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(),
                                                  before.state_dict().values(), strict=True))
    # The heads are built last: every weight of the trunk is initialised as without them.
    extra = [k for k in on.state_dict() if k.startswith("mtp.")]
    assert extra and [k for k in on.state_dict() if k not in extra] == list(before.state_dict())
    assert all(torch.equal(on.state_dict()[k], v) for k, v in before.state_dict().items())

    batch = _ragged(data, 12, seed=1)
    lengths = batch.position_mask.sum(1)
    with torch.inference_mode():
        a, b, c = before(batch), off(batch), on(batch)
    assert b.mtp_logits is None and a.mtp_logits is None
    for name in ("log_probs", "logits", "click_logits", "position_repr"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(getattr(a, name), getattr(c, name))  # the heads add, change nothing
    assert torch.equal(before.generate(batch, lengths, "greedy"),
                       off.generate(batch, lengths, "greedy"))
    with pytest.raises(ValueError, match="mtp_heads"):
        off.generate(batch, lengths, "greedy", mtp=True)
    with pytest.raises(ValueError, match="mtp_heads must be >= 0"):
        build_model("autoregressive", data.spec, {"dim": 32, "mtp_heads": -1})


# ---------------------------------------------------------------------------- training side


@pytest.mark.parametrize("list_context", [True, False])
def test_teacher_forced_head_scores_are_what_decoding_computes(
    data: RerankDataset, list_context: bool
) -> None:
    """mtp_logits[b, :, t, i - 1] = head i at the state of position t, given the logged item at
    t, with the list context of the logged items before t + i: recomputed here with the
    decoding-side pieces (heads, pointer, ListContext.step), masks included."""
    model = _model(data, heads=3, list_context=list_context)
    batch = _ragged(data, 10, seed=2)
    with torch.inference_mode():
        out = model(batch)
        x = model.encode(batch)
    got = out.mtp_logits
    b, n, m, k = got.shape
    assert (b, n, m, k) == (*out.log_probs.shape, 3)
    # The decoder states of the logged prefix, as generate() builds them.
    with torch.inference_mode():
        state = model._start_state(batch, use_cache=True)
        states, previous = [], None
        contexts = [state.context.clone()]
        for t in range(m):
            if previous is not None and model.list_context is not None:
                contexts.append(model.list_context.step(contexts[-1], batch.category, previous))
            token = (model.start.expand(b, -1) if previous is None
                     else model.item_in(x[torch.arange(b), previous]))
            h = (token + model.positions[t]).unsqueeze(1)
            for i, layer in enumerate(model.layers):
                h, kv = layer.step(h, None if t == 0 else state.cache[i], state.memory_kv[i],
                                   state.memory_mask)
                if t == 0:
                    state.cache.append(kv)
                else:
                    state.cache[i] = kv
            states.append(h[:, 0])
            previous = batch.exposed[:, t]
        while len(contexts) < m + k + 1:  # contexts past the list: never read unmasked
            contexts.append(contexts[-1])
    for t in range(m):
        shown = x[torch.arange(b), batch.exposed[:, t]]
        with torch.inference_mode():
            z = model.mtp(states[t], shown)
            scores = model._pointer_logits(z, model.pointer_key(x))  # [B, N, k]
        for i in range(1, k + 1):
            for r in range(b):
                length = int(batch.position_mask[r].sum())
                if t >= length:
                    continue
                want = scores[r, :, i - 1].clone()
                blocked = ~batch.candidate_mask[r]
                if t + i < length:
                    if model.list_context is not None:
                        want = want + contexts[t + i][r]
                    blocked = blocked.clone()
                    blocked[batch.exposed[r, : t + i]] = True
                want = want.masked_fill(blocked, float("-inf"))
                if t + i < length:
                    torch.testing.assert_close(got[r, :, t, i - 1], want, rtol=1e-4, atol=1e-4)
                else:  # target past the list: padding masked only, finite elsewhere
                    assert torch.equal(torch.isinf(got[r, :, t, i - 1]), blocked)


def test_trains_jointly_with_the_mtp_term(data: RerankDataset) -> None:
    model = _model(data, heads=2, scramble=False)
    model.train()
    objective = build_objective([{"name": "gain_bce"}, {"name": "mtp", "weight": 0.5}])
    batch = _ragged(data, 8, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    for _ in range(8):
        total, parts = objective(model(batch), batch)
        opt.zero_grad()
        total.backward()
        assert model.mtp is not None and model.mtp.out_weight.grad is not None
        assert model.mtp.out_weight.grad.abs().sum() > 0
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        first = float(parts["mtp"]) if first is None else first
        last = float(parts["mtp"])
    assert last < 0.8 * first


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("heads", "cfg"), [
    (1, {}), (3, {"n_kv_heads": 1}), (4, {"list_context": False}),
])
def test_speculative_greedy_returns_the_greedy_lists_random_models(
    data: RerankDataset, long_data: RerankDataset, heads: int, cfg: dict
) -> None:
    for dataset, max_n, max_m, seeds in ((data, None, None, 3), (long_data, 60, 30, 1)):
        model = _model(dataset, heads=heads, **cfg)
        for seed in range(seeds):
            items = _requests(dataset, 10, seed=100 * heads + seed, max_n=max_n, max_m=max_m)
            batch = collate(items)
            plain, lists, stats = _greedy_and_mtp(model, batch)
            assert torch.equal(lists, plain)
            assert 1 <= stats.steps <= plain.shape[1]
            length = batch.position_mask.sum(1).clamp(max=batch.candidate_mask.sum(1))
            assert torch.equal(stats.steps_per_row == 0, length == 0)
            assert (stats.steps_per_row <= length).all()
            # A request of the padded batch decodes the same alone.
            r = int(length.argmax())
            alone = collate([items[r]])
            got, _ = speculative_greedy(model, alone, length[r:r + 1],
                                        alone.position_mask.shape[1])
            assert torch.equal(got[0], plain[r, : got.shape[1]])
            assert plain[r, got.shape[1]:].eq(-1).all()


def test_speculative_greedy_returns_the_greedy_lists_trained_model(
    data: RerankDataset, long_data: RerankDataset
) -> None:
    for dataset, max_n, max_m in ((data, None, None), (long_data, 60, 30)):
        model = _model(dataset, heads=3, scramble=False)
        model.train()
        objective = build_objective([{"name": "gain_bce"}, {"name": "mtp"}])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(4):
            batch = _ragged(dataset, 8, seed=step, max_n=max_n, max_m=max_m)
            total, _ = objective(model(batch), batch)
            opt.zero_grad()
            total.backward()
            opt.step()
        model.eval()
        for seed in range(2):
            batch = _ragged(dataset, 10, seed=50 + seed, max_n=max_n, max_m=max_m)
            plain, lists, _ = _greedy_and_mtp(model, batch)
            assert torch.equal(lists, plain)
        # Through generate() and the evaluation path, with the decoder options of a config.
        assert torch.equal(decode_lists(model, batch, "greedy", {"mtp": True}), plain)


def test_steps_follow_acceptance(data: RerankDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proposals that are the greedy list: k + 1 items per call; proposals that never are: one
    item per call (each call still keeps the next-item head's own choice), same lists."""
    model = _model(data, heads=2, list_context=False)
    batch = collate([data[i] for i in range(6)])  # 60 candidates, m = 6
    width = batch.position_mask.shape[1]
    lengths = torch.full((6,), width)
    plain = model.generate(batch, width, "greedy")

    def replace(choose):  # noqa: ANN001, ANN202
        """A stand-in for the heads: proposal i at a row with `done` items is choose(r, done, i);
        the masks of the verification positions follow the proposals."""

        def propose(model, memory, keys, lc, blocked, h_last, last, context):  # noqa: ANN001
            done = blocked.sum(1) - (~batch.candidate_mask).sum(1)  # items chosen so far
            proposals = torch.tensor([[choose(r, int(done[r]), i) for i in range(2)]
                                      for r in range(blocked.shape[0])])
            masks = [blocked]
            for i in range(2):
                masks.append(masks[-1].scatter(1, proposals[:, i:i + 1], True))
            return proposals, torch.stack(masks, 2), None

        return propose

    def oracle(r: int, done: int, i: int) -> int:
        return int(plain[r, min(done + i, width - 1)])

    def worst(r: int, done: int, i: int) -> int:
        # An item greedy has not written by then and does not write next: never accepted.
        taken = set(plain[r, : done + i + 1].tolist())
        return next(c for c in range(60) if c not in taken)

    monkeypatch.setattr(mtp_module, "_propose", replace(oracle))
    lists, stats = speculative_greedy(model, batch, lengths, width)
    assert torch.equal(lists, plain)
    assert stats.steps == 1 + math.ceil((width - 1) / 3) and stats.acceptance == 1.0
    monkeypatch.setattr(mtp_module, "_propose", replace(worst))
    lists, stats = speculative_greedy(model, batch, lengths, width)
    assert torch.equal(lists, plain)
    assert stats.steps == width and stats.accepted == 0
    assert stats.proposed == 2 * 6 * (width - 1)


def test_unverified_mode_writes_valid_lists_in_fewer_calls(data: RerankDataset) -> None:
    model = _model(data, heads=2)
    for seed in range(3):
        batch = _ragged(data, 16, seed=20 + seed)
        plain, lists, stats = _greedy_and_mtp(model, batch, verify=False)
        length = batch.position_mask.sum(1).clamp(max=batch.candidate_mask.sum(1))
        for r in range(batch.batch_size):
            want, real = int(length[r]), int(batch.candidate_mask[r].sum())
            row = lists[r]
            items = row[:want].tolist()
            assert row[want:].eq(-1).all() and all(0 <= i < real for i in items)
            assert len(set(items)) == len(items)
            # The first call writes 1 item, every later call k + 1 = 3.
            assert stats.steps_per_row[r] == (0 if want == 0 else 1 + math.ceil((want - 1) / 3))
            if want:
                assert row[0] == plain[r, 0]  # the first item is always the next-item head's
    batch = collate([data[i] for i in range(4)])
    with pytest.raises(ValueError, match="greedy decoding with the KV cache"):
        model.generate(batch, 6, "beam", mtp=True)
    with pytest.raises(ValueError, match="greedy decoding with the KV cache"):
        model.generate(batch, 6, "greedy", use_cache=False, mtp=True)
    unverified = model.generate(batch, 6, "greedy", mtp=True, mtp_verify=False)
    assert torch.equal(unverified, speculative_greedy(model, batch, torch.full((4,), 6), 6,
                                                      verify=False)[0])
