"""Hierarchical generator: the skeleton stage ignores padding, the plan is the most likely one
that fits (numpy and torch agree), plans become feasible quotas, only high-utility lists teach
the skeleton, the model trains and evaluates end to end with its lists following the plan, and
its ONNX export serves the lists PyTorch writes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from genrerank.constraints.skeleton import plan_counts_np
from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.losses import build_loss
from genrerank.losses.base import list_utility, utility_threshold
from genrerank.losses.skeleton import logged_category_counts, skeleton_weights
from genrerank.models import build_model
from genrerank.models.hierarchical import Hierarchical, plan_counts, skeleton_constraints
from tests.models._requests import shrink_request

WEIGHTS = {"click": 1.0, "like": 1.5, "long_view": 0.8}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 64, 5, out, progress=False)
    return RerankDataset(out)


def _model(data: RerankDataset, **cfg: object) -> Hierarchical:
    torch.manual_seed(0)
    model = build_model("hierarchical", data.spec, {"dim": 16, **cfg})
    model.fit_statistics(data)
    return model.eval()


# -- skeleton stage -----------------------------------------------------------------------


def test_skeleton_shapes_and_classes_beyond_a_category_s_candidates(
        data: RerankDataset) -> None:
    model = _model(data)
    batch = collate([shrink_request(data[0], 12), data[1]])
    out = model(batch)
    c, k = data.spec.n_categories, model.max_positions
    assert out.count_logits.shape == (2, c, k + 1)
    assert out.density_logit.shape == (2,) and out.long_item.shape == (2, 60)
    have = torch.zeros(2, c, dtype=torch.long)
    for row in range(2):
        for cat in batch.category[row][batch.candidate_mask[row]].tolist():
            have[row, cat] += 1
    assert torch.equal(out.category_count, have)
    finite = torch.isfinite(out.count_logits)
    # Class j is possible exactly when the request has at least j candidates of the category.
    assert torch.equal(finite, torch.arange(k + 1) <= have.unsqueeze(-1))
    assert out.long_item[0, 12:].abs().max() == 0  # padded candidates are never long


def test_padded_candidates_and_positions_change_nothing(data: RerankDataset) -> None:
    model = _model(data)
    short = shrink_request(data[2], 15, exposed=4)
    alone = model(collate([short]))
    batch = collate([short, data[3]])  # pads request 0 to n = 60, m = 6
    # Garbage in the padding: another category, large features.
    noisy = dataclasses.replace(
        batch,
        category=torch.where(batch.candidate_mask, batch.category, 5),
        item_dense=torch.where(batch.candidate_mask.unsqueeze(-1), batch.item_dense, 99.0),
        exposed=torch.where(batch.position_mask, batch.exposed, 40),
    )
    for padded in (model(batch), model(noisy)):
        torch.testing.assert_close(padded.count_logits[0], alone.count_logits[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded.density_logit[0], alone.density_logit[0],
                                   atol=1e-5, rtol=1e-5)
    loss = build_loss("skeleton", tau=0.0, weights=WEIGHTS)
    torch.testing.assert_close(loss(model(noisy), noisy), loss(model(batch), batch))


def test_no_density_target_without_the_feature(data: RerankDataset) -> None:
    model = _model(data, density_feature="no_such_feature")
    out = model(collate([data[0]]))
    assert out.density_logit is None and out.long_item is None
    loss = build_loss("skeleton", tau=0.0, weights=WEIGHTS)(out, collate([data[0]]))
    assert math.isfinite(loss.item())


def test_density_threshold_is_the_training_median(data: RerankDataset) -> None:
    model = _model(data)
    column = data.spec.item_dense.index("log_duration")
    assert float(model.density_threshold) == pytest.approx(
        float(np.median(data._item_dense.values[:, column])))


def test_the_skeleton_loss_leaves_the_fill_alone_unless_asked(data: RerankDataset) -> None:
    batch = collate([data[i] for i in range(8)])
    loss = build_loss("skeleton", tau=0.0, weights=WEIGHTS)
    for shared in (False, True):
        model = _model(data, skeleton_grad=shared).train()
        loss(model(batch), batch).backward()
        encoder = [p.grad for p in model.fill.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in encoder) == shared
        assert model.count_head.weight.grad.abs().sum() > 0


# -- the plan --------------------------------------------------------------------------------


def _brute_force(lp: torch.Tensor, length: int) -> float:
    best = -math.inf
    for counts in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
        if sum(counts) == length:
            best = max(best, sum(float(lp[c, k]) for c, k in enumerate(counts)))
    return best


def test_plan_is_the_most_likely_allocation_of_the_list() -> None:
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        c, k = 4, 3
        lp = torch.log_softmax(torch.randn(1, c, k + 1, generator=gen) * 2, dim=-1)
        have = torch.randint(0, k + 1, (1, c), generator=gen)
        lp = lp.masked_fill(torch.arange(k + 1) > have.unsqueeze(-1), float("-inf"))
        length = min(int(torch.randint(1, k + 1, (1,), generator=gen)), int(have.sum()))
        counts = plan_counts(lp, torch.tensor([length]))
        assert int(counts.sum()) == length, trial
        assert (counts <= have).all(), trial
        got = float(lp[0].gather(1, counts[0].unsqueeze(1)).sum())
        assert got == pytest.approx(_brute_force(lp[0], length)), trial


def _torch_dp(log_probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The model's original torch dynamic programme, kept as the reference of the numpy one."""
    b, c, width = log_probs.shape
    k_max = width - 1
    lengths = lengths.to(dtype=torch.long).clamp(0, k_max)
    lp = log_probs.float()
    neg = torch.tensor(float("-inf"))
    s = torch.arange(k_max + 1)
    k = torch.arange(width)
    prev_idx = (s.unsqueeze(1) - k).clamp_min(0)
    valid = s.unsqueeze(1) >= k
    best = torch.full((b, k_max + 1), float("-inf"))
    best[:, 0] = 0.0
    choices = []
    for cat in range(c):
        total = torch.where(valid, best[:, prev_idx] + lp[:, cat].unsqueeze(1), neg)
        best, pick = total.max(dim=2)
        choices.append(pick)
    target = torch.where(torch.isfinite(best) & (s <= lengths.unsqueeze(1)), s, -1).max(1).values
    target = target.clamp_min(0)
    counts = torch.zeros(b, c, dtype=torch.long)
    rows = torch.arange(b)
    for cat in range(c - 1, -1, -1):
        pick = choices[cat][rows, target]
        counts[:, cat] = pick
        target = target - pick
    return counts


def test_numpy_and_torch_plans_agree_on_random_inputs() -> None:
    gen = torch.Generator().manual_seed(11)
    for trial in range(30):
        b, c, k = 8, int(torch.randint(1, 7, (1,), generator=gen)), 5
        lp = torch.log_softmax(torch.randn(b, c, k + 1, generator=gen) * 3, dim=-1)
        have = torch.randint(0, k + 1, (b, c), generator=gen)
        lp = lp.masked_fill(torch.arange(k + 1) > have.unsqueeze(-1), float("-inf"))
        # Lengths up to past what the candidates allow (the largest reachable total then).
        lengths = torch.randint(0, k + 3, (b,), generator=gen)
        ref = _torch_dp(lp, lengths)
        got = plan_counts_np(lp.numpy(), lengths.numpy())
        assert got.dtype == np.int64 and got.shape == (b, c)
        assert np.array_equal(got, ref.numpy()), trial
        assert torch.equal(plan_counts(lp, lengths), ref), trial
        assert (got.sum(1) == np.minimum(lengths.clamp(max=k).numpy(),
                                         have.sum(1).clamp(max=k).numpy())).all(), trial


def test_plan_counts_sum_to_each_request_s_length(data: RerankDataset) -> None:
    model = _model(data)
    batch = collate([shrink_request(data[0], 3, exposed=3), data[1], data[4]])
    counts, available = model.plan(batch, torch.tensor([6, 4, 0]))
    assert counts.sum(1).tolist() == [3, 4, 0]  # request 0 has only 3 candidates
    assert (counts <= available).all()


def test_plan_method_expected_or_map(data: RerankDataset) -> None:
    batch = collate([data[i] for i in range(6)])
    lengths = torch.full((6,), 6)
    for method in ("expected", "map"):
        model = _model(data, plan=method)
        counts, _ = model.plan(batch, lengths)
        logits = model.count_logits(model.fill.encode(batch), batch.category,
                                    batch.candidate_mask)[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        if method == "map":
            assert torch.equal(counts, plan_counts(log_probs, lengths))
        else:  # each count within one item of the expected count rescaled to the length
            expected = (log_probs.exp() * torch.arange(logits.shape[-1])).sum(-1)
            target = expected * 6 / expected.sum(1, keepdim=True)
            assert ((counts - target).abs() < 1 + 1e-6).all()
        assert counts.sum(1).tolist() == [6] * 6
    with pytest.raises(ValueError, match="plan must be one of"):
        _model(data, plan="mode")


# -- plan -> constraints -----------------------------------------------------------------------


def test_skeleton_constraints_by_hand() -> None:
    from genrerank.constraints import Quota

    exact = skeleton_constraints([0, 2, 1, 0, 3], slack=0, available=[4, 2, 1, 0, 5])
    assert exact.quotas == (Quota("category", 1, min=2, max=2), Quota("category", 2, min=1, max=1),
                            Quota("category", 4, min=3, max=3))
    loose = skeleton_constraints([0, 2, 1, 0, 3], slack=1, available=[4, 2, 1, 0, 5])
    assert loose.quotas == (
        Quota("category", 0, min=0, max=1),  # unplanned: at most the slack
        Quota("category", 1, min=1, max=3), Quota("category", 2, min=0, max=2),
        # category 3 has no candidate: no quota
        Quota("category", 4, min=2, max=4))
    # A plan asking more than the candidates allow keeps its minimum feasible.
    clipped = skeleton_constraints([3, 1], slack=0, available=[2, 5])
    assert clipped.quotas == (Quota("category", 0, min=2, max=3),
                              Quota("category", 1, min=1, max=1))
    with pytest.raises(ValueError, match="slack"):
        skeleton_constraints([1], slack=-1)


def test_skeleton_constraints_are_feasible_for_any_plan() -> None:
    from genrerank.constraints import compile_constraints

    rng = np.random.default_rng(0)
    for _ in range(100):
        available = rng.integers(0, 4, size=5)
        if available.sum() == 0:
            continue
        category = np.repeat(np.arange(5), available)  # the request's candidates
        length = int(rng.integers(1, min(available.sum(), 6) + 1))
        lp = torch.log_softmax(torch.as_tensor(rng.normal(size=(1, 5, 7)), dtype=torch.float32),
                               dim=-1)
        lp = lp.masked_fill(torch.arange(7) > torch.as_tensor(available).unsqueeze(-1),
                            float("-inf"))
        counts = plan_counts(lp, torch.tensor([length]))[0].numpy()
        for slack in (0, 1, 2):
            cs = skeleton_constraints(counts, slack, available)
            assert sum(q.min for q in cs.quotas) <= length
            assert all(q.min <= available[q.value] for q in cs.quotas)
            rc = compile_constraints(cs, category=category, list_length=length)
            rc.check_feasible()  # raises InfeasibleConstraints otherwise


# -- which lists teach the skeleton -------------------------------------------------------------


def _hand_batch() -> Batch:
    """Three requests of 4 candidates (categories 0, 1, 1, 2), lists of 2 and one of 1."""
    b, n = 3, 4
    return Batch(
        request_index=torch.arange(b), user_cat=torch.zeros(b, 0, dtype=torch.long),
        user_dense=torch.zeros(b, 0), context_cat=torch.zeros(b, 0, dtype=torch.long),
        context_dense=torch.zeros(b, 0), item_cat=torch.zeros(b, n, 0, dtype=torch.long),
        item_dense=torch.zeros(b, n, 0), upstream_score=torch.zeros(b, n),
        category=torch.tensor([[0, 1, 1, 2]] * b), creator=torch.zeros(b, n, dtype=torch.long),
        is_cold_start=torch.zeros(b, n, dtype=torch.bool),
        is_long_tail=torch.zeros(b, n, dtype=torch.bool),
        candidate_mask=torch.ones(b, n, dtype=torch.bool),
        exposed=torch.tensor([[1, 2], [0, 3], [3, 0]]),
        position_mask=torch.tensor([[True, True], [True, True], [True, False]]),
        labels={"click": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
                "like": torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])},
    )


def test_logged_counts_and_the_high_utility_selection_by_hand() -> None:
    batch = _hand_batch()
    assert logged_category_counts(batch, 3).tolist() == [[0, 2, 0], [1, 0, 1], [0, 0, 1]]
    # R = (click + 1.5 like) / log2(position + 2): 2.5, 1 / log2(3) = 0.63, 0 (padded slot).
    r = list_utility(batch, {"click": 1.0, "like": 1.5})
    torch.testing.assert_close(r, torch.tensor([2.5, 1 / math.log2(3), 0.0]))
    w = skeleton_weights(batch, "threshold", 0.6, {"click": 1.0, "like": 1.5})
    assert w.tolist() == [1.0, 1.0, 0.0]
    w = skeleton_weights(batch, "threshold", 1.0, {"click": 1.0, "like": 1.5})
    assert w.tolist() == [1.0, 0.0, 0.0]
    w = skeleton_weights(batch, "gain", None, {"click": 1.0, "like": 1.5})
    torch.testing.assert_close(w, r)
    with pytest.raises(ValueError, match="tau is not set"):
        skeleton_weights(batch, "threshold", None, {"click": 1.0})


def test_only_lists_above_tau_teach_the_skeleton(data: RerankDataset) -> None:
    model = _model(data)
    batch = collate([data[i] for i in range(16)])
    r = list_utility(batch, WEIGHTS)
    # The trainer's tau (the median, above the minimum) leaves out exactly the lists with R = 0.
    assert 0 < utility_threshold(r) <= float(r[r > 0].min())
    tau = float(r[r > 0].median())  # higher, so that some lists with feedback fall below
    good = r >= tau
    assert good.any() and ((r > 0) & ~good).any()
    loss = build_loss("skeleton", tau=tau, weights=WEIGHTS)
    base = loss(model(batch), batch)
    # Another logged list for the low-utility requests (their labels stay): no change.
    shifted = (batch.exposed + 7) % 60
    low = dataclasses.replace(batch, exposed=torch.where(good.unsqueeze(1), batch.exposed,
                                                         shifted))
    torch.testing.assert_close(loss(model(low), low), base)
    high = dataclasses.replace(batch, exposed=torch.where(good.unsqueeze(1), shifted,
                                                          batch.exposed))
    assert not torch.isclose(loss(model(high), high), base)
    # Weighting by gain: every list with R > 0 counts, the others not at all.
    by_gain = build_loss("skeleton", weighting="gain", weights=WEIGHTS)
    assert not torch.isclose(by_gain(model(low), low), by_gain(model(batch), batch))
    silent = dataclasses.replace(batch, exposed=torch.where((r > 0).unsqueeze(1),
                                                            batch.exposed, shifted))
    torch.testing.assert_close(by_gain(model(silent), silent), by_gain(model(batch), batch))


# -- decoding and the whole run ------------------------------------------------------------------


def _list_counts(lists: torch.Tensor, batch: Batch, n_categories: int) -> torch.Tensor:
    cats = batch.category.gather(1, lists.clamp_min(0)).clamp(0, n_categories - 1)
    counts = torch.zeros(lists.shape[0], n_categories, dtype=torch.long)
    return counts.scatter_add_(1, cats, (lists >= 0).long())


def test_lists_follow_the_plan_exactly_or_within_the_slack(data: RerankDataset) -> None:
    model = _model(data)
    batch = collate([shrink_request(data[0], 9, exposed=5), *[data[i] for i in range(1, 8)]])
    lengths = batch.position_mask.sum(1)
    counts, _ = model.plan(batch, lengths)
    c = data.spec.n_categories
    exact = model.generate(batch, lengths, "greedy", slack=0)
    assert torch.equal(_list_counts(exact, batch, c), counts)
    beam = model.generate(batch, lengths, "beam", slack=0, beam_width=3, k=1).lists[:, 0]
    assert torch.equal(_list_counts(beam, batch, c), counts)
    loose = _list_counts(model.generate(batch, lengths, "greedy", slack=1), batch, c)
    assert ((loose - counts).abs() <= 1).all()
    free = model.generate(batch, lengths, "greedy", slack=-1)
    assert torch.equal(free, model.fill.generate(batch, lengths, "greedy"))
    for lists in (exact, beam, free):  # valid lists: real, distinct, at each length
        for row in range(len(lists)):
            items = lists[row][lists[row] >= 0].tolist()
            assert len(items) == int(lengths[row]) == len(set(items))
            assert all(batch.candidate_mask[row, i] for i in items)


def test_the_caller_s_constraints_hold_and_the_plan_bends_to_them(
        data: RerankDataset) -> None:
    from genrerank.constraints import ConstraintSet, Quota, constraints_for_batch

    model = _model(data)
    batch = collate([data[i] for i in range(8)])
    lengths = batch.position_mask.sum(1)
    counts, _ = model.plan(batch, lengths)
    banned = int(counts[0].argmax())  # request 0's most planned category: a conflict there
    rules = constraints_for_batch(ConstraintSet(quotas=(Quota("category", banned, max=0),)),
                                  batch, lengths)
    lists = model.generate(batch, lengths, "greedy", slack=0, constraints=rules)
    got = _list_counts(lists, batch, data.spec.n_categories)
    for row in range(len(lists)):
        assert rules[row].violations(lists[row].tolist()) == []
        if counts[row, banned] == 0:  # no conflict: exactly the plan
            assert torch.equal(got[row], counts[row])
    # Request 0: the rule wins for the banned category, the plan holds for the others (slack
    # 0: exactly their planned counts) and the rest of the list is free.
    assert got[0, banned] == 0
    planned = (counts[0] > 0) & (torch.arange(len(counts[0])) != banned)
    assert torch.equal(got[0][planned], counts[0][planned])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(simulated data, a trained run, its ONNX export)``; the export passed its parity
    check (export_run raises otherwise)."""
    from genrerank.experiment import train_run
    from genrerank.serving.export import export_run

    root = tmp_path_factory.mktemp("hier_run")
    sim = simulate_to_dir("kuaishou", 200, 2, root / "sim", progress=False)
    run = root / "run"
    train_run("hierarchical", sim, run, overrides=(
        "train.epochs=1", "train.progress=false", "train.batch_size=64", "model.dim=16",
        "model.n_heads=2", "model.n_kv_heads=1"))
    export_run(run, root / "onnx")
    return sim, run, root / "onnx"


def test_train_then_evaluate(trained: tuple[Path, Path, Path]) -> None:
    from genrerank.experiment import evaluate_run

    sim, run, _ = trained
    config = json.loads((run / "run_config.json").read_text())
    assert config["model"]["name"] == "hierarchical"
    assert [t["name"] for t in config["loss"]] == ["gain_bce", "click_bce", "skeleton"]
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    tau = meta["loss_calibration"]["skeleton"]["tau"]  # set from the training split
    assert tau > 0
    report = evaluate_run(run, sim)
    online = report["online"]
    assert report["model"] == "hierarchical" and report["requests"] == 20
    for key in ("expected_gain", "headroom_captured", "category_entropy"):
        assert math.isfinite(online[key]), key
    assert online["upper_bound_expected_gain"] >= online["expected_gain"] - 1e-9


def _onnx_inputs(onnx: object, batch: Batch) -> dict[str, np.ndarray]:
    """The ONNX Runtime feeds of ``batch``, its item vectors from the exported item tower."""
    flat = [t.flatten(0, 1).numpy() for t in (batch.item_cat, batch.item_dense, batch.item_hash)]
    b, n = batch.candidate_mask.shape
    static = onnx.item_embedding(*flat).reshape(b, n, -1)
    return onnx.request_feeds(batch.user_cat.numpy(), batch.user_dense.numpy(), static,
                              batch.upstream_score.numpy(), batch.candidate_mask.numpy(),
                              batch.category.numpy(), context_cat=batch.context_cat.numpy(),
                              context_dense=batch.context_dense.numpy())


def test_onnx_export_writes_the_lists_pytorch_writes_under_the_plan(
        trained: tuple[Path, Path, Path]) -> None:
    from genrerank.constraints import ConstraintSet, Quota, constraints_for_batch
    from genrerank.serving.export import load_manifest
    from genrerank.serving.onnx_model import OnnxModel
    from genrerank.training.checkpoint import load_model

    sim, run, onnx_dir = trained
    manifest = load_manifest(onnx_dir)
    assert manifest["model_name"] == "hierarchical" and manifest["stepwise"]
    assert set(manifest["graphs"]) == {"item_tower", "encoder", "step", "skeleton"}
    assert manifest["parity"]["passed"] and "count_log_probs" in manifest["parity"][
        "max_abs_diff"]
    model, _ = load_model(run, "best")
    model.eval()
    assert manifest["skeleton"] == {"n_categories": model.n_categories,
                                    "slack": model.config.slack,
                                    "plan": model.config.plan,
                                    "max_count": model.max_positions}
    onnx = OnnxModel(onnx_dir)
    ds = RerankDataset(sim, "test")
    m = 6
    batch = collate([shrink_request(ds[0], 4), *[ds[i] for i in range(1, 10)]])
    feeds = _onnx_inputs(onnx, batch)
    lengths = torch.minimum(batch.candidate_mask.sum(1), torch.tensor(m))
    c = model.n_categories
    counts, available = model.plan(batch, lengths)
    got_counts, got_available = onnx.plan(onnx._run("encoder", feeds)[0], feeds, lengths.numpy())
    assert np.array_equal(got_counts, counts.numpy())
    assert np.array_equal(got_available, available.numpy())
    assert (counts > 0).sum(1).max() > 1  # a real plan: several categories in one list
    # Request constraints, one of them against request 1's most planned category.
    banned = int(counts[1].argmax())
    rules = ConstraintSet(quotas=(Quota("category", banned, max=0),))
    checked = 0
    for slack in (0, 1):
        for cs in (None, rules):
            rcs = None if cs is None else constraints_for_batch(cs, batch, m)
            ref = model.generate(batch, m, "greedy", slack=slack, constraints=rcs)
            got, _ = onnx.greedy(feeds, m, constraints=rcs, slack=slack)
            assert np.array_equal(got, ref.numpy()), (slack, cs)
            ref_beam = model.generate(batch, m, "beam", slack=slack, constraints=rcs,
                                      beam_width=3, k=1).lists[:, 0]
            got_beam, _ = onnx.beam(feeds, m, 3, constraints=rcs, slack=slack)
            assert np.array_equal(got_beam, ref_beam.numpy()), (slack, cs)
            for lists in (ref, ref_beam):
                have = _list_counts(lists, batch, c)
                for row in range(len(lists)):
                    items = lists[row][lists[row] >= 0].tolist()
                    assert len(items) == int(lengths[row]) == len(set(items))
                    if rcs is not None:
                        assert rcs[row].violations(lists[row].tolist()) == []
                    if rcs is None or counts[row, banned] == 0:
                        # No conflict with the rules: the planned quotas hold.
                        assert ((have[row] - counts[row]).abs() <= slack).all(), (row, slack)
                    checked += 1
    assert checked == 2 * 2 * 2 * len(batch.candidate_mask)


def test_the_onnx_service_serves_the_lists_of_the_pytorch_service(
        trained: tuple[Path, Path, Path]) -> None:
    """Through the runtime (``OnnxBackend.write_list``): the same items for the same requests,
    with and without request constraints, by greedy and beam decoding."""
    from genrerank.serving.runtime import load_reranker
    from genrerank.serving.schema import RequestValidator, payload_from_dataset

    sim, run, onnx_dir = trained
    ds = RerankDataset(sim, "test")
    torch_rr = load_reranker(run_dir=run, cache_size=0)
    onnx_rr = load_reranker(onnx_dir=onnx_dir, cache_size=0)
    assert onnx_rr.backend.onnx.skeleton is not None
    validator = RequestValidator.for_service(onnx_rr)
    for decode in ({"name": "greedy"}, {"name": "beam", "beam_width": 3}):
        params = {k: v for k, v in decode.items() if k != "name"}
        for service in (torch_rr, onnx_rr):
            service.backend.decoder, service.backend.decoder_params = decode["name"], params
        for i in range(4):
            payload = payload_from_dataset(ds, i)
            plain = validator.validate_python(payload)
            got, ref = onnx_rr.rerank(plain), torch_rr.rerank(plain)
            assert got.item_ids == ref.item_ids, (decode, i)
            np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
            # Ban the category of the first served item: the rule holds on both backends.
            cats = dict(zip(payload["candidates"]["ids"], payload["candidates"]["category"],
                            strict=True))
            banned = cats[ref.item_ids[0]]
            ruled = validator.validate_python({**payload, "constraints": {
                "quotas": [{"attribute": "category", "value": banned, "max": 0}]}})
            got, ref = onnx_rr.rerank(ruled), torch_rr.rerank(ruled)
            assert got.item_ids == ref.item_ids, (decode, i, "constrained")
            assert all(cats[item] != banned for item in got.item_ids)
