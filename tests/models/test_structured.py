"""Structured list model: signal logits and their gradients, padding that changes nothing, slot
probabilities against the module's formula by hand, beam search that returns valid lists and
(with a wide beam) the model's own best list, refused settings, and a short training run that
reloads to the same lists."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.schema import FeatureSpec
from genrerank.data.simulator import simulate_to_dir
from genrerank.losses import build_loss
from genrerank.models import build_model
from genrerank.models.structured import StructuredListModel, StructuredOutput
from tests.conftest import purchase_spec, tiny_spec
from tests.losses._helpers import make_batch
from tests.models._requests import shrink_request

SMALL = {"dim": 16, "hidden": 16}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("kuaishou", 64, 0, tmp_path_factory.mktemp("sim") / "d",
                           progress=False)


@pytest.fixture(scope="module")
def data(sim: Path) -> RerankDataset:
    return RerankDataset(sim)


def _model(spec: FeatureSpec, seed: int = 0, **cfg: object) -> StructuredListModel:
    torch.manual_seed(seed)
    return build_model("structured", spec, {**SMALL, **cfg}).eval()


def _ragged(data: RerankDataset, size: int, seed: int) -> Batch:
    """Requests cut to random numbers of candidates (at least 1) and exposed items; the first
    one keeps only 3 candidates (fewer than the default beam width)."""
    gen = torch.Generator().manual_seed(seed)
    items = [shrink_request(data[0], 3, exposed=3)]
    for i in range(1, size):
        item = data[i]
        n = int(torch.randint(1, len(item["upstream_score"]) + 1, (1,), generator=gen))
        keep = int((item["exposed"] < n).sum())
        m = int(torch.randint(1, keep + 1, (1,), generator=gen)) if keep else 0
        items.append(shrink_request(item, n, exposed=m))
    return collate(items)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


# -- forward ----------------------------------------------------------------------------------


def test_signal_logits_per_signal_and_signal_bce_trains_the_list_terms(
        data: RerankDataset) -> None:
    model = _model(data.spec)
    batch = collate([shrink_request(data[0], 20, exposed=4), data[1], data[2], data[3]])
    out = model(batch)
    assert isinstance(out, StructuredOutput)
    assert list(out.signal_logits) == ["click", "like", "long_view"]  # click first
    for logits in out.signal_logits.values():
        assert logits.shape == (4, 6) and torch.isfinite(logits).all()
    assert out.log_probs.shape == (4, 60, 6)
    # forward is slot_probabilities on the logged lists.
    with torch.no_grad():
        s, tokens, user = model.appeal(batch)
        logged = torch.where(batch.position_mask, batch.exposed, -1).unsqueeze(1)
        probs = model.slot_probabilities(batch, s, tokens, user, logged)
    real = batch.position_mask
    for sig, p in probs.items():
        torch.testing.assert_close(out.signal_logits[sig][real], _logit(p.squeeze(1))[real],
                                   atol=1e-4, rtol=1e-4)

    model.train()
    torch.manual_seed(1)
    loss = build_loss("signal_bce")(model(batch), batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("satiation", "satiation_decay", "position_bias", "user_terms.weight",
                 "user_terms.bias", "pair", "scroll_slope", "scroll_satisfaction",
                 "scroll_memory", "item_terms.weight", "signal_slope"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        assert torch.isfinite(grads[name]).all(), name
    assert grads["satiation"][0] != 0  # the logged lists repeat categories
    assert grads["position_bias"][:6].ne(0).all()
    # The table starts at zero, so its decay has no gradient yet; it has once the table moves.
    assert grads["pair_decay"] == 0


@pytest.mark.parametrize(("spec", "signals"), [
    (tiny_spec(), ["click", "like"]),
    (purchase_spec(), ["purchase"]),  # no click: the binary signal with a gain weight
])
def test_signals_follow_the_data_set(spec: FeatureSpec, signals: list[str]) -> None:
    spec = FeatureSpec(**{**spec.to_dict(), "max_list_length": 3})
    model = _model(spec)
    batch = make_batch([4, 2], [[0, 1, 2], [1]], {s: [[1.0, 0.0, 0.0], [1.0]] for s in signals})
    out = model(batch)
    assert list(out.signal_logits) == signals
    assert all(v.shape == (2, 3) and torch.isfinite(v).all() for v in out.signal_logits.values())
    no_click = FeatureSpec(**{**spec.to_dict(), "labels": ["dwell"],
                              "label_kinds": {"dwell": "nonnegative"}, "gain_weights": {}})
    with pytest.raises(ValueError, match="click signal"):
        build_model("structured", no_click, SMALL)


# -- padding ----------------------------------------------------------------------------------


def test_padded_candidates_and_positions_change_neither_logits_nor_lists(
        data: RerankDataset) -> None:
    model = _model(data.spec, pool=8)
    short = shrink_request(data[2], 15, exposed=4)
    alone = collate([short])
    batch = collate([short, data[3]])  # pads request 0 to n = 60, m = 6
    # Garbage in the padding: another category and creator, large features, a padded candidate
    # logged at the padded positions.
    cand = batch.candidate_mask
    noisy = dataclasses.replace(
        batch,
        category=torch.where(cand, batch.category, 5),
        creator=torch.where(cand, batch.creator, 7),
        item_dense=torch.where(cand.unsqueeze(-1), batch.item_dense, 99.0),
        upstream_score=torch.where(cand, batch.upstream_score, 50.0),
        exposed=torch.where(batch.position_mask, batch.exposed, 40),
    )
    want = model(alone).signal_logits
    for padded in (batch, noisy):
        got = model(padded).signal_logits
        assert list(got) == list(want)
        for sig in want:
            torch.testing.assert_close(got[sig][0, :4], want[sig][0], atol=1e-5, rtol=1e-5)
        for length in (4, 6):
            lists = model.generate(padded, length)
            assert torch.equal(lists[0], model.generate(alone, length)[0])
        per_request = model.generate(padded, torch.tensor([4, 6]))
        assert per_request.shape == (2, 6)
        assert torch.equal(per_request[0], torch.cat([model.generate(alone, 4)[0],
                                                      torch.full((2,), -1)]))


# -- slot probabilities by hand ---------------------------------------------------------------

G_CAT, G_CREATOR, RHO, DELTA = 0.7, 0.4, 0.25, 1.5
BIAS = [0.1, -0.2, 0.3, -0.4]
S = [0.5, 1.0, -0.3, 0.8, 2.0, -1.0]
CATEGORY = [1, 1, 2, 1, 0, 0]  # 0 = unknown: never the same as anything
CREATOR = [3, 0, 3, 0, 0, 0]
LISTS = [[0, 1, 3, 2], [4, 0, 1, -1], [2, 3, -1, -1], [4, 5, -1, -1]]


def _inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _inv_sigmoid(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _hand_model(**cfg: object) -> StructuredListModel:
    spec = FeatureSpec(**{**tiny_spec().to_dict(), "max_list_length": 4})
    model = _model(spec, dim=8, hidden=8, dropout=0.0, **cfg)
    assert model.signals == ["click", "like"]
    assert model.user_terms.weight.abs().max() == 0  # user terms start as their biases
    with torch.no_grad():
        model.satiation.copy_(torch.tensor([_inv_softplus(G_CAT), _inv_softplus(G_CREATOR)]))
        model.satiation_decay.fill_(_inv_sigmoid(RHO))
        model.user_terms.bias[0] = _inv_softplus(DELTA)
        model.position_bias.copy_(torch.tensor(BIAS))
    return model


def _hand_batch() -> Batch:
    batch = make_batch([6], [[0, 1, 2]])
    return dataclasses.replace(batch, category=torch.tensor([CATEGORY]),
                               creator=torch.tensor([CREATOR]))


def _slot_probs(model: StructuredListModel, lists: list[list[int]]) -> dict[str, torch.Tensor]:
    tokens, user = torch.zeros(1, 6, 8), torch.zeros(1, 8)
    with torch.no_grad():
        return model.slot_probabilities(_hand_batch(), torch.tensor([S]), tokens, user,
                                        torch.tensor([lists]))


def _hand_z(items: list[int], table: list[list[float]] | None = None,
            rho_pair: float = 0.0) -> list[float]:
    """z_j of the module docstring, with plain loops."""
    z = []
    for j, i in enumerate(items):
        value = S[i]
        for k in range(j):
            c_k, c_j = CATEGORY[items[k]], CATEGORY[i]
            a_k, a_j = CREATOR[items[k]], CREATOR[i]
            same = G_CAT * (c_k == c_j and c_k > 0) + G_CREATOR * (a_k == a_j and a_k > 0)
            value -= DELTA * RHO ** (j - k - 1) * same
            if table is not None and c_k > 0 and c_j > 0:  # unknown categories pair with nothing
                value += rho_pair ** (j - k - 1) * table[c_k][c_j]
        z.append(value)
    return z


def test_click_probabilities_without_scroll_by_hand() -> None:
    model = _hand_model(scroll=False)
    click = _slot_probs(model, LISTS)["click"][0]
    # A same-category item one slot above costs delta g_c, two slots above delta g_c rho.
    z = [S[0], S[1] - DELTA * G_CAT, S[3] - DELTA * G_CAT * (1 + RHO),
         S[2] - DELTA * G_CREATOR * RHO ** 2]  # the creator repeats three slots down
    assert _hand_z(LISTS[0]) == pytest.approx(z)
    for row, items in enumerate(LISTS):
        filled = [i for i in items if i >= 0]
        zs = _hand_z(filled)
        want = [_sigmoid(zs[j] + BIAS[j]) for j in range(len(filled))]
        want += [0.0] * (4 - len(filled))
        assert click[row].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6), items
    # Unknown categories (0) are never the same: item 5 after item 4 keeps its appeal.
    assert float(click[3, 1]) == pytest.approx(_sigmoid(S[5] + BIAS[1]), rel=1e-6)


def test_complementarity_table_and_second_signal_by_hand() -> None:
    model = _hand_model(scroll=False)
    raw = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10 - 0.7  # not symmetric
    w_like, item_like, user_like = 0.6, 0.2, -0.5
    with torch.no_grad():
        model.pair.copy_(raw)
        model.pair_decay.fill_(0.0)  # rho_k = 1/2
        model.item_terms.weight.zero_()
        model.item_terms.bias.fill_(item_like)
        model.signal_slope.fill_(w_like)
        model.user_terms.bias[2] = user_like
    probs = _slot_probs(model, LISTS)
    table = ((raw + raw.T) / 2).tolist()
    for row, items in enumerate(LISTS):
        filled = [i for i in items if i >= 0]
        zs = _hand_z(filled, table, rho_pair=0.5)
        click = [_sigmoid(zs[j] + BIAS[j]) for j in range(len(filled))]
        like = [c * _sigmoid(w_like * zj + item_like + user_like)
                for c, zj in zip(click, zs, strict=True)]
        pad = [0.0] * (4 - len(filled))
        assert probs["click"][0, row].tolist() == pytest.approx(click + pad, rel=1e-5), items
        assert probs["like"][0, row].tolist() == pytest.approx(like + pad, rel=1e-5), items
        gain = sum(click) + model.gain_weights["like"] * sum(like)
        assert float(model.expected_gain(probs)[0, row]) == pytest.approx(gain, rel=1e-5)
    assert model.gain_weights == {"click": 1.0, "like": 1.5}


def test_scroll_reach_by_hand() -> None:
    alpha, slope, satisfaction, memory = 1.2, 0.4, 0.7, 0.3
    model = _hand_model(scroll=True)
    with torch.no_grad():
        model.user_terms.bias[1] = alpha
        model.scroll_slope.fill_(slope)
        model.scroll_satisfaction.fill_(satisfaction)
        model.scroll_memory.fill_(_inv_sigmoid(memory))
    click = _slot_probs(model, LISTS)["click"][0]
    z = _hand_z(LISTS[0])
    reach_1 = _sigmoid(alpha - 0 + satisfaction * z[0])
    zbar_1 = (memory * z[0] + z[1]) / (memory + 1)
    reach_2 = reach_1 * _sigmoid(alpha - slope * 1 + satisfaction * zbar_1)
    assert float(click[0, 0]) == pytest.approx(_sigmoid(z[0] + BIAS[0]), rel=1e-6)
    assert float(click[0, 1]) == pytest.approx(reach_1 * _sigmoid(z[1] + BIAS[1]), rel=1e-5)
    assert float(click[0, 2]) == pytest.approx(reach_2 * _sigmoid(z[2] + BIAS[2]), rel=1e-5)
    # Empty slots are no part of the mean: list 2 reaches its slot 1 by its own z_0 alone.
    z2 = _hand_z(LISTS[2][:2])
    assert float(click[2, 1]) == pytest.approx(
        _sigmoid(alpha + satisfaction * z2[0]) * _sigmoid(z2[1] + BIAS[1]), rel=1e-5)
    assert click[2, 2:].abs().max() == 0


# -- generate ---------------------------------------------------------------------------------


def _assert_valid_lists(lists: torch.Tensor, batch: Batch, lengths: torch.Tensor) -> None:
    for b in range(batch.batch_size):
        real = int(batch.candidate_mask[b].sum())
        want = min(int(lengths[b]), real)
        row = lists[b].tolist()
        assert all(i >= 0 for i in row[:want]) and all(i == -1 for i in row[want:]), (b, row)
        items = row[:want]
        assert len(set(items)) == want, (b, row)  # distinct
        assert all(i < real for i in items), (b, real, row)  # real candidates only


@pytest.mark.parametrize(("decoder", "width"), [("greedy", None), ("beam", None), ("beam", 8)])
def test_lists_are_distinct_real_candidates_cut_at_each_length(
        data: RerankDataset, decoder: str, width: int | None) -> None:
    model = _model(data.spec)
    for seed in range(2):
        batch = _ragged(data, 8, seed)
        lengths = batch.position_mask.sum(1)
        lists = model.generate(batch, lengths, decoder, beam_width=width)
        assert lists.shape == batch.position_mask.shape  # result width = position_mask width
        _assert_valid_lists(lists, batch, lengths)
        # A fixed length, capped by each request's number of real candidates.
        lists = model.generate(batch, 6, decoder, beam_width=width)
        assert lists.shape == (8, 6)
        _assert_valid_lists(lists, batch, torch.full((8,), 6))
    assert model.generate(batch, None, decoder).shape == (8, 6)  # max_positions
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(collate([data[0]]), 7, decoder)


def test_greedy_is_beam_search_of_width_one(data: RerankDataset) -> None:
    model = _model(data.spec)
    batch = _ragged(data, 8, seed=3)
    lengths = batch.position_mask.sum(1)
    assert torch.equal(model.generate(batch, lengths, "greedy"),
                       model.generate(batch, lengths, "beam", beam_width=1))
    assert torch.equal(model.generate(batch, 6, "greedy"),
                       model.generate(batch, 6, "beam", beam_width=1))


@pytest.mark.parametrize("setting", ["init", "no_satiation", "random_pair"])
def test_a_wide_beam_finds_the_model_s_best_list(data: RerankDataset, setting: str) -> None:
    """n = 4, m = 3: a beam wider than all 24 ordered lists is exhaustive."""
    model = _model(data.spec, pool=0)
    with torch.no_grad():
        if setting == "no_satiation":  # near-additive gain: a repeated top item would win
            model.satiation.fill_(-20.0)
        if setting == "random_pair":
            model.pair.normal_(0.0, 1.0)
    perms = list(itertools.permutations(range(4), 3))
    for r in range(3):
        batch = collate([shrink_request(data[r], 4, exposed=3)])
        got = model.generate(batch, 3, "beam", beam_width=64)
        with torch.no_grad():
            s, tokens, user = model.appeal(batch)
            gains = model.expected_gain(model.slot_probabilities(
                batch, s, tokens, user, torch.tensor([perms + [got[0].tolist()]])))[0]
        assert tuple(got[0].tolist()) in perms, (setting, r, got)
        assert float(gains[-1]) == pytest.approx(float(gains[:-1].max()), abs=1e-5)


def test_a_pool_smaller_than_the_list_is_refused_or_widened(data: RerankDataset) -> None:
    """Never a silent empty list nor a repeated item: either an error naming the pool or
    valid lists of the full length."""
    batch = collate([data[0], shrink_request(data[1], 5)])
    for width in (1, 4):
        model = _model(data.spec, pool=2, beam_width=width)
        try:
            lists = model.generate(batch, 4)
        except ValueError as exc:
            assert "pool" in str(exc)
        else:
            _assert_valid_lists(lists, batch, torch.full((2,), 4))


# -- refused settings -------------------------------------------------------------------------


def test_unknown_decoders_options_and_constraints_are_refused(data: RerankDataset) -> None:
    from genrerank.constraints import ConstraintSet, Quota

    model = _model(data.spec)
    batch = collate([data[0], data[1]])
    with pytest.raises(ValueError, match=r"'hungarian'.*\['beam', 'greedy'\]"):
        model.generate(batch, 6, "hungarian")
    with pytest.raises(ValueError, match="unknown decoder option.*'k'"):
        model.generate(batch, 6, "beam", k=2)
    rules = ConstraintSet(quotas=(Quota("category", 1, max=0),))
    with pytest.raises(ValueError, match="constraints"):
        model.generate(batch, 6, "beam", constraints=[rules, rules])
    with pytest.raises(ValueError, match="beam_width"):
        model.generate(batch, 6, "beam", beam_width=-1)
    for bad in ({"beam_width": 0}, {"pool": -1}):
        with pytest.raises(ValueError, match="beam_width must be >= 1 and pool >= 0"):
            build_model("structured", data.spec, {**SMALL, **bad})


# -- training ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*no positive label")
def test_trains_with_the_packaged_config_and_reloads_to_the_same_lists(
        sim: Path, tmp_path: Path) -> None:
    from genrerank.experiment import ListScorer, resolve_config
    from genrerank.losses import build_objective, resolve_loss_config
    from genrerank.training import TrainConfig, Trainer, load_model, seed_everything

    cfg = resolve_config("structured", overrides=(
        "train.epochs=1", "train.progress=false", "train.batch_size=32", "model.dim=16",
        "model.hidden=16"))
    assert cfg["loss"] == [{"name": "signal_bce"}] and cfg["decode"]["name"] == "beam"
    train, valid = RerankDataset(sim, split="train"), RerankDataset(sim, split="valid")
    train_cfg = TrainConfig.from_dict(cfg["train"])
    seed_everything(train_cfg.seed)
    model = build_model("structured", train.spec,
                        {k: v for k, v in cfg["model"].items() if k != "name"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_cfg = resolve_loss_config(cfg["loss"], train.spec)
    trainer = Trainer(model, build_objective(loss_cfg), train, valid, train_cfg, tmp_path / "run",
                      ListScorer(valid, train).validate_fn(), loss_config=loss_cfg)
    best = trainer.fit()
    assert math.isfinite(best["loss"]) and best["step"] >= 2
    assert not torch.equal(model.satiation, before["satiation"])
    assert all(math.isfinite(v) for v in model.list_effects().values())

    loaded, meta = load_model(tmp_path / "run", "best")
    assert meta["model_name"] == "structured" and isinstance(loaded, StructuredListModel)
    model.eval()
    batch = collate([valid[i] for i in range(len(valid))])
    lengths = batch.position_mask.sum(1)
    assert torch.equal(loaded.generate(batch, lengths), model.generate(batch, lengths))
    assert torch.equal(loaded.generate(batch, 6, "greedy"), model.generate(batch, 6, "greedy"))


def test_a_finished_run_evaluates_and_its_export_is_refused_in_one_line(
        sim: Path, tmp_path: Path) -> None:
    from genrerank.experiment import evaluate_run, train_run
    from genrerank.serving.export import export_run

    run = tmp_path / "run"
    train_run("structured", sim, run, overrides=(
        "train.epochs=1", "train.progress=false", "train.batch_size=32", "model.dim=16",
        "model.hidden=16"))
    result = evaluate_run(run, sim, tmp_path / "eval.json")
    assert result["decoder"]["name"] == "beam"
    assert math.isfinite(result["online"]["expected_gain"])
    with pytest.raises(ValueError, match="'structured' has no ONNX export yet"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    from genrerank.serving.runtime import load_reranker

    with pytest.raises(ValueError, match="'structured' cannot be served yet"):
        load_reranker(run_dir=run)


def test_it_scores_given_lists_like_an_evaluator(data: RerankDataset) -> None:
    """score_lists / signal_probabilities (the evaluator's signatures): empty slots inside a
    list are dropped and the items below move up, probabilities come back at the input slots,
    a list without items scores -inf, and the pipeline and the reward source accept it."""
    from genrerank.pipeline import Pipeline, UpstreamOrder
    from genrerank.rewards.sources import EvaluatorSignals

    model = _model(data.spec)
    batch = collate([data[i] for i in range(3)])
    gapped = torch.tensor([[0, -1, 3, 2, -1, 5], [4, 1, -1, -1, 7, 8], [-1] * 6])
    compact = torch.tensor([[0, 3, 2, 5, -1, -1], [4, 1, 7, 8, -1, -1], [-1] * 6])
    lists = torch.stack([gapped, compact], 1)  # [B=3, K=2, m=6]
    with torch.no_grad():
        s, tokens, user = model.appeal(batch)
        want = model.slot_probabilities(batch, s, tokens, user, compact.unsqueeze(1).expand(
            3, 2, 6).clone())
    got = model.signal_probabilities(batch, lists)
    for sig, p in got.items():
        assert torch.allclose(p[:, 1], want[sig][:, 1])  # compact lists: as they are
        for b in range(2):  # gapped lists: the compact values at the filled input slots
            filled = gapped[b] >= 0
            assert torch.allclose(p[b, 0][filled], want[sig][b, 0][: int(filled.sum())])
            assert (p[b, 0][~filled] == 0).all()
    scores = model.score_lists(batch, lists)
    gain = model.expected_gain(want)
    assert torch.allclose(scores[:2], gain[:2])
    assert torch.isinf(scores[2]).all() and (scores[2] < 0).all()
    discounted = model.score_lists(batch, lists, discount=True)
    assert torch.allclose(discounted[:2, 0], discounted[:2, 1])
    assert (discounted[:2] < scores[:2]).all()
    Pipeline([UpstreamOrder()], evaluator=model)
    EvaluatorSignals(model)
