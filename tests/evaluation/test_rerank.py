"""``genrerank rerank``: every request's re-ranked list, decoded as ``evaluate`` decodes it,
written atomically to Parquet."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.simulator import simulate_to_dir
from genrerank.evaluation import rerank as rerank_module
from genrerank.evaluation.generator_evaluator import _served
from genrerank.evaluation.offline import predict
from genrerank.evaluation.rerank import (
    OUTPUT_SCHEMA,
    read_rerank_metadata,
    rerank_dataset,
    rerank_table,
)
from genrerank.experiment import load_run_for_decoding, train_run
from genrerank.pipeline import Pipeline
from genrerank.serving.export import model_version
from genrerank.training.runs import IncompleteRunError
from tests.conftest import tiny_spec
from tests.serving._runs import make_run

TINY = ("train.epochs=1", "train.progress=false", "train.batch_size=64", "model.dim=16",
        "model.heads=2")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("kuaishou", 200, 3, tmp_path_factory.mktemp("d") / "sim",
                           progress=False)


@pytest.fixture(scope="module")
def runs(sim: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained nar4rec run (decoder chosen on validation) and untrained autoregressive and
    evaluator runs (seeded: only their decoding path matters here)."""
    root = tmp_path_factory.mktemp("runs")
    train_run("nar4rec", sim, root / "nar4rec", overrides=TINY)
    spec = RerankDataset(sim, split="valid").spec
    return {
        "nar4rec": root / "nar4rec",
        "autoregressive": make_run(root / "ar", "autoregressive", spec,
                                   decode={"name": "beam", "beam_width": 3, "k": 1}),
        "evaluator": make_run(root / "ev", "evaluator", spec),
    }


def _assert_valid(table: pa.Table, dataset: RerankDataset, lengths: list[int]) -> None:
    """No repeats, indices in range, the expected lengths, ids matching the indices."""
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert table.column("request_id").to_pylist() == list(dataset.request_ids)
    items = dataset.table.column("item_id").to_pylist()
    for row, (idx, ids, scores) in enumerate(zip(table.column("candidate_index").to_pylist(),
                                                 table.column("item_id").to_pylist(),
                                                 table.column("score").to_pylist(),
                                                 strict=True)):
        n = len(items[row])
        assert len(idx) == lengths[row] and len(set(idx)) == len(idx)
        assert all(0 <= i < n for i in idx)
        assert ids == [items[row][i] for i in idx]
        assert len(scores) == len(idx) and all(math.isfinite(s) for s in scores)


@pytest.mark.parametrize(("model", "decoder"), [
    ("nar4rec", None), ("nar4rec", "greedy"), ("nar4rec", "sample"),
    ("autoregressive", None), ("autoregressive", "sample"),
])
def test_lists_are_valid_and_those_evaluate_decodes(sim: Path, runs: dict, model: str,
                                                    decoder: str | None) -> None:
    params = {"seed": 3, "k": 2} if decoder == "sample" else {}
    table = rerank_table(sim, run_dir=runs[model], decoder=decoder, decoder_params=params,
                         show_progress=False)
    dataset = RerankDataset(sim, split="test")
    m = [len(dataset._exposed[i]) for i in range(len(dataset))]
    _assert_valid(table, dataset, m)
    # The same lists as evaluate's prediction step with the same resolved decoder.
    net, _, cfg = load_run_for_decoding(runs[model], decoder, params)
    name = cfg.pop("name")
    expected = predict(net, dataset, name, cfg).lists
    got = table.column("candidate_index").to_pylist()
    assert got == [[int(i) for i in row if i >= 0] for row in expected]
    assert set(table.column("decoder").to_pylist()) == {name}
    assert set(table.column("model_version").to_pylist()) == {model_version(runs[model])}
    meta = read_rerank_metadata(table)
    assert meta["decoder"] == name and meta["decoder_params"] == json.loads(json.dumps(cfg))
    assert meta["run"] == str(runs[model]) and meta["data"] == str(sim)
    assert meta["list_length"] == "logged" and meta["requests"] == len(dataset)
    probs = np.concatenate([np.asarray(s) for s in table.column("score").to_pylist()])
    assert ((probs > 0) & (probs <= 1 + 1e-6)).all()


def test_autoregressive_scores_are_the_step_probabilities(sim: Path, runs: dict) -> None:
    """Beam search's list log-probability is the sum of the log step probabilities."""
    table = rerank_table(sim, run_dir=runs["autoregressive"], show_progress=False)
    net, _, cfg = load_run_for_decoding(runs["autoregressive"])
    dataset = RerankDataset(sim, split="test")
    batch = collate([dataset[i] for i in range(len(dataset))])
    found = net.generate(batch, batch.position_mask.sum(1), "beam", beam_width=3, k=1)
    log_prob = [sum(math.log(p) for p in s) for s in table.column("score").to_pylist()]
    assert np.allclose(log_prob, found.scores[:, 0].numpy(), atol=1e-4)


def test_matrix_scores_are_the_position_softmax(tiny_dataset: Path, tmp_path: Path) -> None:
    """Pointwise greedy: the softmax of its item scores, falling down the list; lists are
    min(list_length, n) long and ``all`` covers every split."""
    run = make_run(tmp_path / "pw", "pointwise", dataclasses.replace(tiny_spec(),
                                                                    max_list_length=3))
    table = rerank_table(tiny_dataset, run_dir=run, split="all", list_length=3,
                         show_progress=False)
    dataset = RerankDataset(tiny_dataset)
    assert table.column("split").to_pylist() == ["train", "valid", "test"]
    _assert_valid(table, dataset, [3, 2, 3])  # n = 3, 2, 4
    net, _, _ = load_run_for_decoding(run)
    with torch.inference_mode():
        probs = net(collate([dataset[i] for i in range(3)])).log_probs[:, :, 0].exp()
    for row, (idx, scores) in enumerate(zip(table.column("candidate_index").to_pylist(),
                                            table.column("score").to_pylist(), strict=True)):
        assert scores == pytest.approx(probs[row, idx].tolist(), abs=1e-6)
        assert scores == sorted(scores, reverse=True)
    assert read_rerank_metadata(table)["list_length"] == 3
    with pytest.raises(ValueError, match="unknown split"):
        rerank_table(tiny_dataset, run_dir=run, split="tset", show_progress=False)


def test_pipeline_lists_are_what_evaluate_serves(sim: Path, runs: dict, tmp_path: Path) -> None:
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({
        "evaluator": str(runs["evaluator"]),
        "generators": [{"type": "logging"}, {"type": "perturb", "count": 3},
                       {"type": "nar4rec", "run": str(runs["nar4rec"]), "decoder": "beam",
                        "count": 2}]}))
    table = rerank_table(sim, pipeline=config, split="all", show_progress=False)
    dataset = RerankDataset(sim)
    m = [len(dataset._exposed[i]) for i in range(len(dataset))]
    _assert_valid(table, dataset, m)
    pipe = Pipeline.from_config(config)
    preds, _ = _served(pipe, dataset, 256)
    assert table.column("candidate_index").to_pylist() == [
        [int(i) for i in row if i >= 0] for row in preds.lists]
    # Per-item scores are the evaluator's gains: discounted, they sum to its list score.
    batch = collate([dataset[i] for i in range(8)])
    lists = torch.from_numpy(preds.lists[:8, : batch.position_mask.shape[1]]).long()
    list_scores = pipe.evaluator.score_lists(batch, lists.unsqueeze(1))[:, 0]
    for row, scores in enumerate(table.column("score").to_pylist()[:8]):
        discounted = sum(s / math.log2(j + 2) for j, s in enumerate(scores))
        assert discounted == pytest.approx(float(list_scores[row]), rel=1e-4)
    meta = read_rerank_metadata(table)
    version = table.column("model_version")[0].as_py()
    assert version.startswith("pipeline-") and meta["model_version"] == version
    assert meta["components"] == {"evaluator": model_version(runs["evaluator"]),
                                  "generators[2]": model_version(runs["nar4rec"])}
    assert set(table.column("decoder").to_pylist()) == {"pipeline"}
    with pytest.raises(ValueError, match="decoder applies to a run"):
        rerank_table(sim, pipeline=config, decoder="greedy", show_progress=False)


def test_unfinished_and_evaluator_runs_are_refused(sim: Path, runs: dict,
                                                   tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="list evaluator"):
        rerank_table(sim, run_dir=runs["evaluator"], show_progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(runs["autoregressive"], broken)
    (broken / "run_config.json").unlink()
    out = tmp_path / "lists.parquet"
    with pytest.raises(IncompleteRunError, match="incomplete"):
        rerank_dataset(sim, out, run_dir=broken, show_progress=False)
    assert not out.exists()


def test_the_file_is_written_atomically(tiny_dataset: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "runs" / "pw", "pointwise", tiny_spec())
    out = tmp_path / "out" / "lists.parquet"
    summary = rerank_dataset(tiny_dataset, out, run_dir=run, split="all", show_progress=False)
    assert summary.requests == 3 and summary.path == out
    before = out.read_bytes()
    assert pq.read_table(out).equals(
        rerank_table(tiny_dataset, run_dir=run, split="all", show_progress=False))
    # An existing file is refused before any work.
    monkeypatch.setattr(rerank_module, "rerank_table", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        rerank_dataset(tiny_dataset, out, run_dir=run)
    monkeypatch.undo()

    def half_then_fail(table: pa.Table, where: str, **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(rerank_module.pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        rerank_dataset(tiny_dataset, out, run_dir=run, overwrite=True, show_progress=False)
    assert out.read_bytes() == before  # the old file, untouched
    assert [p.name for p in out.parent.iterdir()] == ["lists.parquet"]  # no temp file left
    with pytest.raises(OSError, match="disk full"):
        rerank_dataset(tiny_dataset, out.parent / "new.parquet", run_dir=run,
                       show_progress=False)
    assert [p.name for p in out.parent.iterdir()] == ["lists.parquet"]


def test_cli(sim: Path, runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "lists.parquet"
    args = ["rerank", "--run", str(runs["nar4rec"]), "--data", str(sim), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--decoder", "greedy", "--split", "valid"])
    assert result.exit_code == 0, result.output
    assert "re-ranked 20 requests (logged list lengths, up to 6)" in result.output
    assert "rerank: 20/20 requests (100%)" in result.output  # the final progress line
    table = pq.read_table(out)
    assert set(table.column("split").to_pylist()) == {"valid"}
    assert read_rerank_metadata(out)["decoder"] == "greedy"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    shorter = CliRunner().invoke(main, [*args, "--overwrite", "--list-length", "4"])
    assert shorter.exit_code == 0, shorter.output
    assert "re-ranked 20 requests (list length 4)" in shorter.output
    assert {len(x) for x in pq.read_table(out).column("candidate_index").to_pylist()} == {4}
    longer = CliRunner().invoke(main, [*args, "--overwrite", "--list-length", "10"])
    assert longer.exit_code == 1 and "longer than the model's 6 positions" in longer.output
    both = CliRunner().invoke(main, [*args, "--pipeline", str(out)])
    assert both.exit_code == 2 and "exactly one of --run and --pipeline" in both.output
    bad = CliRunner().invoke(main, [*args, "--split", "everything"])
    assert bad.exit_code == 2
