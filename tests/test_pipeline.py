"""Generator-evaluator pipeline: generators, de-duplication, the evaluator's pick, configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.evaluation.generator_evaluator import (
    evaluate_pipeline,
    evaluate_pipeline_config,
    k_curve,
    split_counts,
)
from genrerank.models import build_model
from genrerank.pipeline import (
    AutoregressiveGenerator,
    DecodedListGenerator,
    MMRGenerator,
    NAR4RecGenerator,
    PerturbGenerator,
    Pipeline,
    UpstreamOrder,
    build_generator,
    dedupe_lists,
)
from genrerank.training.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "d"
    simulate_to_dir("kuaishou", 120, 5, out, progress=False)
    return out


@pytest.fixture(scope="module")
def models(data: Path) -> dict:
    spec = RerankDataset(data).spec
    torch.manual_seed(0)
    return {name: build_model(name, spec, {"dim": 16}).eval()
            for name in ("nar4rec", "autoregressive", "evaluator")}


def _batch(data: Path, size: int = 10):
    ds = RerankDataset(data, split="train")
    return collate([ds[i] for i in range(size)])


def _check_lists(lists: torch.Tensor, batch, m: int) -> None:
    for b in range(lists.shape[0]):
        real = int(batch.candidate_mask[b].sum())
        for row in lists[b]:
            items = row[row >= 0].tolist()
            if not items:
                continue
            assert len(items) == min(m, real) and len(set(items)) == len(items)
            assert all(0 <= i < real for i in items)


def test_every_generator_proposes_valid_lists(data: Path, models: dict) -> None:
    batch = _batch(data)
    lengths = torch.full((batch.batch_size,), 6)
    gens = [UpstreamOrder(), MMRGenerator(count=3), PerturbGenerator(count=5, seed=1),
            NAR4RecGenerator(models["nar4rec"], "sample", count=4, seed=0),
            AutoregressiveGenerator(models["autoregressive"], "beam", count=3)]
    for gen in gens:
        lists = gen.propose(batch, lengths, 6, gen.count)
        assert lists.shape[0] == batch.batch_size and lists.shape[2] == 6
        assert lists.shape[1] <= gen.count
        _check_lists(lists, batch, 6)
    first = gens[0].propose(batch, lengths, 6, 1)[:, 0]
    scores = batch.upstream_score.masked_fill(~batch.candidate_mask, -1e9)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    assert torch.equal(first, order[:, :6])


def test_a_decoded_generator_proposes_the_models_own_list(data: Path) -> None:
    """``decoded``: one list, exactly what the model's own decoder writes (here the structured
    model's beam search, which takes no ``k``), cut to each request's length."""
    spec = RerankDataset(data).spec
    torch.manual_seed(0)
    structured = build_model("structured", spec, {"dim": 16}).eval()
    batch = _batch(data)
    lengths = torch.tensor([6, 4, 6, 6, 5, 6, 6, 6, 3, 6])
    gen = DecodedListGenerator(structured, "beam", count=5, beam_width=3)
    assert gen.count == 1
    lists = gen.propose(batch, lengths, 6, 1)
    assert lists.shape == (batch.batch_size, 1, 6)
    own = structured.generate(batch, lengths, "beam", beam_width=3)
    for b in range(batch.batch_size):
        m = int(lengths[b])
        assert torch.equal(lists[b, 0, :m], own[b, :m]) and (lists[b, 0, m:] < 0).all()
    _check_lists(lists[lengths == 6], collate([RerankDataset(data, split="train")[i]
                                               for i in range(10) if lengths[i] == 6]), 6)


def test_perturbations_are_seeded_and_differ_from_the_upstream_order(data: Path) -> None:
    batch = _batch(data)
    lengths = torch.full((batch.batch_size,), 6)
    a = PerturbGenerator(count=6, seed=3).propose(batch, lengths, 6, 6)
    b = PerturbGenerator(count=6, seed=3).propose(batch, lengths, 6, 6)
    c = PerturbGenerator(count=6, seed=4).propose(batch, lengths, 6, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    upstream = UpstreamOrder().propose(batch, lengths, 6, 1)
    assert (a != upstream).any(-1).float().mean() > 0.5


def test_dedupe_keeps_first_occurrences_and_drops_empty_lists() -> None:
    lists = torch.tensor([[[1, 2], [2, 1], [1, 2], [-1, -1], [2, 1]],
                          [[0, 3], [0, 3], [0, 3], [3, 0], [-1, -1]]])
    keep = dedupe_lists(lists, chunk=1)
    assert keep.tolist() == [[True, True, False, False, False],
                             [True, False, False, True, False]]


def test_pipeline_serves_the_list_the_evaluator_scores_best(data: Path, models: dict) -> None:
    batch = _batch(data)
    gens = [UpstreamOrder(), MMRGenerator(count=2), PerturbGenerator(count=8, seed=0),
            NAR4RecGenerator(models["nar4rec"], "sample", count=8, seed=0)]
    pipe = Pipeline(gens, models["evaluator"])
    served = pipe.rerank(batch, 6)
    props = served.proposals
    assert props.lists.shape[1] == 1 + 2 + 8 + 8 == pipe.total_lists
    assert props.source[:3] == [0, 1, 1]
    manual = models["evaluator"].score_lists(batch, props.lists, props.valid)
    manual = manual.masked_fill(~props.valid, float("-inf"))
    best = manual.argmax(1)
    assert torch.equal(served.chosen, best)
    assert torch.equal(served.lists, props.lists[torch.arange(batch.batch_size), best])
    assert props.valid[torch.arange(batch.batch_size), served.chosen].all()
    _check_lists(served.lists.unsqueeze(1), batch, 6)
    capped = Pipeline(gens, models["evaluator"], max_lists=5)
    assert capped.propose(batch, 6).lists.shape[1] == 5


def test_split_counts_shares_k_round_robin_with_one_upstream_list() -> None:
    gens = [NAR4RecGenerator.__new__(NAR4RecGenerator), UpstreamOrder(), MMRGenerator()]
    assert split_counts(1, gens) == [1, 0, 0]
    assert split_counts(2, gens) == [1, 1, 0]
    assert split_counts(7, gens) == [3, 1, 3]
    assert split_counts(3, [UpstreamOrder()]) == [1]


def _save_run(model: torch.nn.Module, run: Path) -> None:
    """A finished run: its best checkpoint and run_config.json (what train writes last)."""
    save_checkpoint(run / "best", model, {"model_name": model.name,
                                          "model_config": model.config.__dict__})
    (run / "run_config.json").write_text(json.dumps({"model": {"name": model.name},
                                                     "decode": {"name": "greedy"}}))


def test_pipeline_from_config_and_cli_evaluation(data: Path, models: dict, tmp_path: Path) -> None:
    for name in ("nar4rec", "evaluator"):
        _save_run(models[name], tmp_path / name)
    config = {
        "evaluator": "evaluator",
        "generators": [{"type": "logging"}, {"type": "perturb", "count": 4},
                       {"type": "nar4rec", "run": "nar4rec", "decoder": "beam", "count": 3}],
    }
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(config))
    pipe = Pipeline.from_config(path)
    assert pipe.total_lists == 8
    out = tmp_path / "eval.json"
    result = evaluate_pipeline_config(path, data, out)
    assert json.loads(out.read_text())["online"]["expected_gain"] == pytest.approx(
        result["online"]["expected_gain"])
    online = result["online"]
    assert online["upper_bound_expected_gain"] >= online["oracle_pick_expected_gain"] - 1e-9
    assert online["oracle_pick_expected_gain"] >= online["expected_gain"] - 1e-9
    assert 0 <= result["offline"]["auc"] <= 1
    assert 1 <= result["distinct_lists_mean"] <= 8

    from click.testing import CliRunner

    from genrerank.cli import main

    cli_out = tmp_path / "cli.json"
    ran = CliRunner().invoke(main, ["evaluate", "--pipeline", str(path), "--data", str(data),
                                    "--out", str(cli_out)])
    assert ran.exit_code == 0, ran.output
    assert json.loads(cli_out.read_text())["online"] == pytest.approx(online)
    neither = CliRunner().invoke(main, ["evaluate", "--data", str(data)])
    assert neither.exit_code != 0 and "exactly one of --run and --pipeline" in neither.output


def test_bad_configs_are_named(data: Path, models: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown generator type 'nope'"):
        build_generator({"type": "nope"})
    with pytest.raises(ValueError, match="needs a 'run'"):
        build_generator({"type": "nar4rec"})
    with pytest.raises(ValueError, match="perturb"):
        build_generator({"type": "perturb", "swap": 2})
    with pytest.raises(ValueError, match=r"'decoded': unknown option\(s\) \['count'\]"):
        build_generator({"type": "decoded", "run": "runs/structured", "count": 3})
    with pytest.raises(ValueError, match="unknown key"):
        Pipeline.from_config({"generators": [{"type": "logging"}], "k": 3})
    with pytest.raises(ValueError, match="does not score lists"):
        Pipeline([UpstreamOrder()], models["nar4rec"])
    with pytest.raises(ValueError, match="needs a 'autoregressive' run"):
        AutoregressiveGenerator(models["nar4rec"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Pipeline.from_config(bad)


def test_k_curve_oracle_pick_never_falls_with_k(data: Path, models: dict) -> None:
    test = RerankDataset(data, split="test")
    families = {"perturb": [PerturbGenerator(seed=0)],
                "mix": [NAR4RecGenerator(models["nar4rec"], "sample", seed=0),
                        UpstreamOrder(), PerturbGenerator(seed=1)]}
    curve = k_curve(test, families, models["evaluator"], ks=(1, 2, 4, 8),
                    upper_bound_beam_width=4)
    for rows in curve["families"].values():
        best = [r["oracle_pick_expected_gain"] for r in rows]
        # Perturbations with more draws contain the smaller set's lists only in expectation;
        # the mix at K=1 is one list: the oracle pick equals the served list there.
        assert rows[0]["oracle_pick_expected_gain"] == pytest.approx(rows[0]["expected_gain"])
        assert best[-1] >= best[0] - 1e-9
        assert all(r["distinct_lists_mean"] <= r["k"] for r in rows)
    assert np.isfinite(curve["logging_expected_gain"])


def test_evaluate_pipeline_on_real_style_variable_lengths(data: Path, models: dict) -> None:
    """Lists follow each request's logged length (variable m in one batch)."""
    test = RerankDataset(data, split="test")
    pipe = Pipeline([UpstreamOrder(), PerturbGenerator(count=3)], models["evaluator"])
    result = evaluate_pipeline(pipe, test, batch_size=7, upper_bound_beam_width=4)
    assert result["requests"] == len(test)
    assert result["lists_proposed"] == 4


def test_the_example_config_in_the_readme_is_well_formed() -> None:
    from genrerank.pipeline import GENERATORS, ModelGenerator

    path = Path(__file__).resolve().parents[1] / "examples" / "pipeline.json"
    config = json.loads(path.read_text())
    assert set(config) <= {"evaluator", "generators", "max_lists"}
    for entry in config["generators"]:
        cls = GENERATORS[entry["type"]]
        if issubclass(cls, ModelGenerator):
            assert "run" in entry
        else:
            build_generator(entry)


def test_a_pipeline_refuses_an_unfinished_run(tmp_path) -> None:
    """A generator or evaluator run without run_config.json (train killed) is refused like
    evaluate and export refuse it, not loaded."""
    from genrerank.pipeline import ModelGenerator
    from genrerank.training.runs import IncompleteRunError

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    with pytest.raises(IncompleteRunError, match="run_config.json missing"):
        ModelGenerator.from_run(run)
    with pytest.raises(IncompleteRunError, match="run_config.json missing"):
        Pipeline.from_config({"generators": [{"type": "logging"}], "evaluator": str(run)})
