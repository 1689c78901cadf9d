"""ONNX export: parity with PyTorch, int8 graphs, the export folder's failure modes, the CLI.

Exports are slow (5-15 s per model on a shared 2-core machine), so each model is exported once
per test session into a folder under pytest's base temp (:func:`shared_export`), which
test_runtime.py and test_e2e.py reuse; running any of these modules alone still works, it then
exports what it needs itself. Tests that write export folders use their own paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genrerank.cli import main
from genrerank.data.dataset import RerankDataset, collate
from genrerank.decoding import DecodedLists, decode
from genrerank.models.base import RerankModel
from genrerank.serving import export, parity
from genrerank.serving.export import (
    MANIFEST_FILE,
    ExportError,
    ManifestError,
    export_run,
    load_manifest,
    model_version,
)
from genrerank.serving.onnx_model import OnnxModel
from genrerank.training.checkpoint import load_model
from genrerank.training.runs import IncompleteRunError
from tests.serving._runs import make_run

MODELS = ("nar4rec", "pointwise", "prm", "evaluator", "autoregressive")
#: Models exported with int8 graphs too (quantizing costs time; two matrix models suffice).
QUANTIZED = ("nar4rec", "pointwise")
TOLERANCE = 1e-4

# --------------------------------------------------------------------------- shared exports
# Imported by test_runtime.py and test_e2e.py. Everything is cached on disk under pytest's base
# temp folder, keyed by name; a cached export is reused only if it was made from the same weights.


def _shared_root(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "serving-shared"


def simulated(factory: pytest.TempPathFactory) -> Path:
    """A small simulated kuaishou data set (n = 60 candidates, m = 6 per request)."""
    from genrerank.data.simulator import simulate_to_dir

    out = _shared_root(factory) / "sim"
    if not out.is_dir():
        simulate_to_dir("kuaishou", 120, seed=3, out_dir=out, progress=False)
    return out


def shared_run(factory: pytest.TempPathFactory, name: str) -> Path:
    """A seeded untrained run of ``name`` on :func:`simulated`'s feature spec."""
    run = _shared_root(factory) / "runs" / name
    if not (run / "run_config.json").is_file():
        make_run(run, name, RerankDataset(simulated(factory), "test").spec)
    return run


def shared_export(factory: pytest.TempPathFactory, name: str) -> tuple[Path, dict[str, Any]]:
    """The export folder of :func:`shared_run` (int8 graphs too for QUANTIZED) and its
    manifest as read back from disk."""
    run = shared_run(factory, name)
    out = _shared_root(factory) / "onnx" / name
    if (out / MANIFEST_FILE).is_file() and load_manifest(out)["model_version"] == model_version(
        run
    ):
        return out, load_manifest(out)
    export_run(run, out, quantize=name in QUANTIZED)
    return out, load_manifest(out)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Exported:
    name: str
    run: Path
    onnx_dir: Path
    manifest: dict[str, Any]
    model: RerankModel


@pytest.fixture(scope="module", params=MODELS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    name = request.param
    onnx_dir, manifest = shared_export(tmp_path_factory, name)
    model, _ = load_model(shared_run(tmp_path_factory, name), "best")
    return Exported(name, shared_run(tmp_path_factory, name), onnx_dir, manifest, model.eval())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> RerankDataset:
    return RerankDataset(simulated(tmp_path_factory), "test")


def _cut(item: dict[str, Any], n: int) -> dict[str, Any]:
    """A real request cut to its first ``n`` candidates (>= its list length): ragged batches."""
    out = dict(item)
    for key in (
        "item_cat",
        "item_dense",
        "upstream_score",
        "category",
        "creator",
        "is_cold_start",
        "is_long_tail",
    ):
        out[key] = item[key][:n]
    out["exposed"] = np.arange(len(item["exposed"]))  # positions must point at kept candidates
    return out


def _real_batch(ds: RerankDataset):  # -> Batch
    """All test requests of the simulated set, some cut so the batch is padded."""
    sizes = [60, 41, 17, 8, 60, 33, 6, 60, 59, 12, 60, 25]
    return collate([_cut(ds[i], sizes[i % len(sizes)]) for i in range(len(ds))])


def _lists(out: torch.Tensor | DecodedLists) -> np.ndarray:
    return (out.lists[:, 0] if isinstance(out, DecodedLists) else out).numpy()


def _decode(
    manifest: dict[str, Any],
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    m: int,
    item_repr: torch.Tensor,
) -> np.ndarray:
    """The run's decoder as serving applies it (contrastive also reads item_repr)."""
    params = dict(manifest["decode"])
    name = params.pop("name")
    if name == "contrastive":
        params["item_repr"] = item_repr
    return _lists(decode(name, log_probs, mask, m, **params))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference over finite entries; the non-finite pattern must match exactly."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    assert np.array_equal(fa, fb), "-inf / NaN in different places"
    return float(np.abs(a[fa] - b[fb]).max())


def _assert_valid_lists(lists: np.ndarray, sizes: np.ndarray, m: int) -> None:
    """Each row: min(m, n) distinct indices of real candidates, then -1 padding."""
    assert lists.shape == (len(sizes), m)
    for row, n in zip(lists, sizes, strict=True):
        k = min(m, int(n))
        assert ((row[:k] >= 0) & (row[:k] < n)).all(), row
        assert len(set(row[:k].tolist())) == k, row
        assert (row[k:] == -1).all(), row


def _temp_leftovers(parent: Path) -> list[str]:
    """Hidden working folders export_run writes next to its target (``.<name>.*``)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- parity


def test_manifest_records_a_passing_parity_check(exported: Exported) -> None:
    manifest = exported.manifest
    report = manifest["parity"]
    assert report["passed"], report["failures"]
    assert report["lists_identical"] is True
    assert report["int8"] is False
    assert isinstance(report["worst"], float) and report["worst"] <= TOLERANCE
    assert all(isinstance(v, float) and v <= TOLERANCE for v in report["max_abs_diff"].values())
    # Every output of the model's graph family was compared, not just the item tower.
    expected = {
        "nar4rec": "log_probs",
        "pointwise": "log_probs",
        "prm": "log_probs",
        "evaluator": "scores",
        "autoregressive": "step_log_probs",
    }[exported.name]
    assert {"item_static", expected} <= set(report["max_abs_diff"])
    # The manifest describes this run and the graphs that are on disk.
    assert manifest["model_version"] == model_version(exported.run)
    assert manifest["model_version"].startswith(f"{exported.name}-")
    assert manifest["kind"] == ("evaluator" if exported.name == "evaluator" else "generator")
    assert manifest["stepwise"] is (exported.name == "autoregressive")
    files = {g["file"] for g in manifest["graphs"].values()}
    assert files == (
        {"item_tower.onnx", "encoder.onnx", "step.onnx"}
        if exported.name == "autoregressive"
        else {"item_tower.onnx", "model.onnx"}
    )
    assert all((exported.onnx_dir / f).is_file() for f in files)
    assert ("int8_graphs" in manifest) is (exported.name in QUANTIZED)
    # prm's learned input-rank table caps the candidates; the others take any n.
    assert manifest["max_candidates"] == (60 if exported.name == "prm" else None)
    assert _temp_leftovers(exported.onnx_dir.parent) == []


def test_parity_holds_for_batch_and_sizes_unlike_the_trace(exported: Exported) -> None:
    # The graphs were traced on 3 requests of 7/5/3 candidates; parity ran on 5 of 60..4. A third
    # set (other B, n, seed; n = 3 is shorter than the list length 6) must pass as well.
    report = parity.check_parity(
        exported.model, exported.onnx_dir, exported.manifest, sizes=[37, 12, 3], seed=7
    )
    assert report["sizes"] == [37, 12, 3]
    assert report["list_length"] == 6
    assert report["passed"], report["failures"]
    assert report["lists_identical"] is True
    assert report["worst"] <= TOLERANCE


def test_matrix_graph_matches_pytorch_on_real_requests(
    tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    # Real simulated requests (not the synthetic parity set), through PyTorch's own raw-feature
    # forward pass: what training and offline evaluation compute.
    onnx_dir, manifest = shared_export(tmp_path_factory, "nar4rec")
    model, _ = load_model(shared_run(tmp_path_factory, "nar4rec"), "best")
    model.eval()
    batch = _real_batch(dataset)
    mask = batch.candidate_mask
    m = batch.position_mask.shape[1]
    onnx = OnnxModel(onnx_dir)
    rows = onnx.item_embedding(batch.item_cat[mask].numpy(), batch.item_dense[mask].numpy(),
                              batch.item_hash[mask].numpy())
    static = np.zeros((*mask.shape, rows.shape[1]), dtype=np.float32)
    static[mask.numpy()] = rows
    feeds = onnx.request_feeds(
        batch.user_cat.numpy(),
        batch.user_dense.numpy(),
        static,
        batch.upstream_score.numpy(),
        mask.numpy(),
        batch.category.numpy(),
    )
    log_probs, click_logits, item_repr = onnx.matrix(feeds, m)
    with torch.inference_mode():
        ref = model(batch)
    assert log_probs.shape == tuple(ref.log_probs.shape) == (len(dataset), 60, m)
    assert _max_diff(log_probs, ref.log_probs.numpy()) <= TOLERANCE
    assert _max_diff(item_repr[mask.numpy()], ref.item_repr[mask].numpy()) <= TOLERANCE
    real = mask.numpy()[..., None].repeat(m, -1)
    assert _max_diff(click_logits[real], ref.click_logits.numpy()[real]) <= TOLERANCE
    # Padded candidates get no probability (-inf in both: _max_diff compares the pattern).
    assert np.isneginf(log_probs[~mask.numpy()]).all()
    assert np.isfinite(log_probs[mask.numpy()]).all()
    got = _decode(manifest, torch.from_numpy(log_probs), mask, m, torch.from_numpy(item_repr))
    want = _decode(manifest, ref.log_probs, mask, m, ref.item_repr)
    assert manifest["decode"]["name"] == "contrastive"
    np.testing.assert_array_equal(got, want)
    _assert_valid_lists(got, mask.sum(1).numpy(), m)


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("name", QUANTIZED)
def test_int8_graphs_serve_valid_lists_and_report_their_error(
    name: str, tmp_path_factory: pytest.TempPathFactory, dataset: RerankDataset
) -> None:
    onnx_dir, manifest = shared_export(tmp_path_factory, name)
    model, _ = load_model(shared_run(tmp_path_factory, name), "best")
    assert set(manifest["int8_graphs"]) == set(manifest["graphs"])
    assert all(
        f.endswith(".int8.onnx") and (onnx_dir / f).is_file()
        for f in manifest["int8_graphs"].values()
    )
    int8 = OnnxModel(onnx_dir, int8=True)
    assert int8.version == manifest["model_version"] + "-int8"  # its own item-cache key

    batch = _real_batch(dataset)
    mask = batch.candidate_mask
    m = batch.position_mask.shape[1]
    rows = int8.item_embedding(batch.item_cat[mask].numpy(), batch.item_dense[mask].numpy(),
                              batch.item_hash[mask].numpy())
    static = np.zeros((*mask.shape, rows.shape[1]), dtype=np.float32)
    static[mask.numpy()] = rows
    feeds = int8.request_feeds(
        batch.user_cat.numpy(),
        batch.user_dense.numpy(),
        static,
        batch.upstream_score.numpy(),
        mask.numpy(),
    )
    log_probs, _, item_repr = int8.matrix(feeds, m)
    lists = _decode(manifest, torch.from_numpy(log_probs), mask, m, torch.from_numpy(item_repr))
    _assert_valid_lists(lists, mask.sum(1).numpy(), m)

    report = parity.check_parity(model, onnx_dir, manifest, int8=True)
    assert report["int8"] is True
    diffs = report["max_abs_diff"]
    assert {"item_static", "log_probs"} <= set(diffs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in diffs.values()), diffs
    # Quantized weights really were used: the item tower's output moved off the float graph's.
    assert diffs["item_static"] > 0.0
    assert report["worst"] == max(diffs.values())


def test_a_quantized_export_records_the_int8_differences(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _, manifest = shared_export(tmp_path_factory, "nar4rec")
    assert "int8_graphs" in manifest and manifest["parity"]["int8"] is False
    report = manifest["parity_int8"]
    assert report["int8"] is True and "max_abs_diff" in report
    # Recorded, not required: the quantized graphs really differ from the float ones.
    assert 0 < report["max_abs_diff"]["log_probs"] < 1.0


def test_int8_needs_a_quantized_export(tmp_path_factory: pytest.TempPathFactory) -> None:
    onnx_dir, _ = shared_export(tmp_path_factory, "prm")
    with pytest.raises(ValueError, match="--quantize"):
        OnnxModel(onnx_dir, int8=True)


# --------------------------------------------------------------------------- failure modes


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The graphs do not matter here, only the folder handling: a stand-in writer saves the
    # seconds of a real export (it still leaves a file in the working folder to clean up).
    def fake_graphs(model: RerankModel, out: Path, example: Any) -> dict[str, Any]:
        (out / "model.onnx").write_bytes(b"not a graph")
        return {"model": {"file": "model.onnx", "inputs": [], "outputs": []}}

    monkeypatch.setattr(export, "_export_graphs", fake_graphs)
    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    notes = out / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(FileExistsError, match="not an ONNX export folder; refusing to replace"):
        export_run(shared_run(tmp_path_factory, "pointwise"), out, check=False)
    assert notes.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _temp_leftovers(out.parent) == []


def test_export_to_a_file_is_refused_before_any_work(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_graphs(*_: Any) -> dict[str, Any]:
        raise AssertionError("the folder check must come before the export")

    monkeypatch.setattr(export, "_export_graphs", no_graphs)
    out = tmp_path / "model.onnx"
    out.write_text("a file")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        export_run(shared_run(tmp_path_factory, "pointwise"), out)
    assert out.read_text() == "a file"


def test_export_without_overwrite_refuses_an_existing_folder(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_run(shared_run(tmp_path_factory, "pointwise"), out, overwrite=False)
    assert list(out.iterdir()) == []


def test_failed_parity_raises_and_keeps_the_previous_export(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous, _ = shared_export(tmp_path_factory, "pointwise")
    out = tmp_path / "parent" / "onnx"
    shutil.copytree(previous, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A negative tolerance: every measured difference (even 0) fails, through the real check.
    monkeypatch.setattr(parity, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match=r"failed its parity check: \['item_static: 0'"):
        export_run(shared_run(tmp_path_factory, "pointwise"), out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after[MANIFEST_FILE] == before[MANIFEST_FILE]
    assert after == before  # every graph file too, and nothing added
    assert sorted(p.name for p in out.parent.iterdir()) == ["onnx"]  # no temp folder left


def test_load_manifest_names_the_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json; export a run first"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": "genrerank.onnx", ')
    with pytest.raises(ExportError, match=re.escape(str(tmp_path / MANIFEST_FILE))) as info:
        load_manifest(tmp_path)
    assert "not valid JSON" in str(info.value)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportError, match=r"not a genrerank\.onnx manifest"):
        load_manifest(tmp_path)
    # A ValueError too: `genrerank serve --onnx` reports it in one line, not a traceback.
    with pytest.raises(ValueError, match="not a genrerank.onnx"):
        OnnxModel(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "genrerank.onnx",
                                                      "format_version": 99}))
    with pytest.raises(ManifestError, match="manifest version 99; this genrerank reads version 2"):
        load_manifest(tmp_path)


def test_model_version_follows_the_weights(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec = RerankDataset(simulated(tmp_path_factory), "test").spec
    v0 = model_version(make_run(tmp_path / "a", "pointwise", spec, seed=0))
    assert re.fullmatch(r"pointwise-[0-9a-f]{12}", v0)
    # Same weights in another folder: same version (a content hash, not a path).
    assert model_version(make_run(tmp_path / "b", "pointwise", spec, seed=0)) == v0
    # New weights in the same folder: a new version, so caches keyed by it are invalidated.
    assert model_version(make_run(tmp_path / "a", "pointwise", spec, seed=1)) != v0


# --------------------------------------------------------------------------- CLI


def test_cli_export_prints_the_parity_line(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = shared_run(tmp_path_factory, "pointwise")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    version = model_version(run)
    assert f"exported {version} (generator) to {out}: item_tower.onnx, model.onnx" in result.output
    line = re.search(
        r"parity on 5 requests \(n = 60/45/20/9/4, m = 6\): max \|onnx - torch\| "
        r"(?P<diffs>.*); decoded lists identical: True",
        result.output,
    )
    assert line is not None, result.output
    diffs = dict(part.rsplit(" ", 1) for part in line["diffs"].split(", "))
    assert {"item_static", "log_probs", "click_logits", "item_repr"} <= set(diffs)
    assert all(float(v) <= TOLERANCE for v in diffs.values()), diffs
    assert load_manifest(out)["model_version"] == version
    assert "int8 graphs" not in result.output


# --------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _private_copy(factory: pytest.TempPathFactory, tmp_path: Path, name: str) -> Path:
    """A copy of the shared export of ``name``, free to damage."""
    onnx_dir, _ = shared_export(factory, name)
    return Path(shutil.copytree(onnx_dir, tmp_path / "onnx"))


def _edit_manifest(onnx_dir: Path, edit: Any) -> None:
    manifest = json.loads((onnx_dir / MANIFEST_FILE).read_text())
    edit(manifest)
    (onnx_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_the_manifest_hashes_every_file_of_the_export(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    onnx_dir, manifest = shared_export(tmp_path_factory, "pointwise")  # with int8 graphs
    on_disk = {p.name for p in onnx_dir.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk == {
        "item_tower.onnx", "model.onnx", "item_tower.int8.onnx", "model.int8.onnx"}
    assert manifest["files"] == {name: _sha256(onnx_dir / name) for name in on_disk}
    assert manifest["format_version"] == 2


def test_a_swapped_graph_is_refused_naming_the_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "pointwise")
    graph = onnx_dir / "model.onnx"
    expected = load_manifest(onnx_dir)["files"]["model.onnx"]
    OnnxModel(onnx_dir)  # intact: loads
    # Another model's valid graph with the same inputs and outputs: ONNX Runtime would serve it.
    other, _ = shared_export(tmp_path_factory, "prm")
    shutil.copyfile(other / "model.onnx", graph)
    actual = _sha256(graph)
    assert actual != expected
    message = (f"{graph.resolve()}: sha256 {actual[:12]}... differs from the manifest's "
               f"{expected[:12]}... (the file changed after export)")
    with pytest.raises(ManifestError, match=re.escape(message)) as info:
        OnnxModel(onnx_dir)
    assert "\n" not in str(info.value)
    assert f"re-export: genrerank export --run {shared_run(tmp_path_factory, 'pointwise')}" in (
        str(info.value))
    from genrerank.serving.runtime import load_reranker

    with pytest.raises(ValueError, match=re.escape(message)):
        load_reranker(onnx_dir=onnx_dir)
    # The command line: exit code 1 and the one line, before anything listens.
    result = CliRunner().invoke(main, ["serve", "--onnx", str(onnx_dir), "--port", "0"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_changed_int8_graph_blocks_the_float_graphs_too(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Every file of the folder is checked, not only those about to be loaded: the folder as a
    # whole is no longer what was exported.
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "pointwise")
    with (onnx_dir / "item_tower.int8.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match=r"item_tower\.int8\.onnx: sha256 .* differs"):
        OnnxModel(onnx_dir)


def test_a_missing_or_unhashed_graph_is_refused(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "prm")
    (onnx_dir / "item_tower.onnx").unlink()
    with pytest.raises(ManifestError, match=r"item_tower\.onnx: listed in .*manifest\.json but "
                                            "missing"):
        OnnxModel(onnx_dir)

    onnx_dir = _private_copy(tmp_path_factory, tmp_path / "b", "prm")
    _edit_manifest(onnx_dir, lambda m: m["files"].pop("model.onnx"))
    with pytest.raises(ManifestError, match="graph file 'model.onnx' has no hash in 'files'"):
        OnnxModel(onnx_dir)
    # Deleting all hashes does not switch the check off.
    _edit_manifest(onnx_dir, lambda m: m.pop("files"))
    with pytest.raises(ManifestError, match="no file hashes, so the graphs cannot be verified"):
        OnnxModel(onnx_dir)


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "windows_absolute"])
def test_manifest_paths_outside_the_folder_are_refused(
    kind: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "prm")
    # A real graph with its true hash outside the folder: only the path check can stop it.
    outside = tmp_path / "x.onnx"
    shutil.copyfile(onnx_dir / "model.onnx", outside)
    name = {"dotdot": "../x.onnx", "nested_dotdot": "sub/../../x.onnx",
            "absolute": str(outside), "windows_absolute": "C:\\exports\\x.onnx"}[kind]

    def point_outside(manifest: dict[str, Any]) -> None:
        manifest["graphs"]["model"]["file"] = name
        manifest["files"][name] = _sha256(outside)

    _edit_manifest(onnx_dir, point_outside)
    with pytest.raises(ManifestError, match=re.escape(
            f"{onnx_dir / MANIFEST_FILE}: file name {name!r} leaves the export folder "
            "(absolute paths and '..' are refused)")):
        OnnxModel(onnx_dir)


def test_a_symlink_out_of_the_folder_is_refused(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "prm")
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    os.replace(onnx_dir / "model.onnx", outside)  # same bytes, same hash: only the link differs
    (onnx_dir / "model.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match=re.escape(
            f"file 'model.onnx' resolves to {outside.resolve()}, outside the export folder")):
        OnnxModel(onnx_dir)
    # A link that stays inside the folder is fine, and so is a linked export folder.
    (onnx_dir / "model.onnx").unlink()
    os.replace(outside, onnx_dir / "real-model.onnx")
    (onnx_dir / "model.onnx").symlink_to("real-model.onnx")
    (tmp_path / "current").symlink_to(onnx_dir)
    assert OnnxModel(tmp_path / "current").sessions.keys() == {"item_tower", "model"}


def test_an_export_from_before_hashes_is_refused_with_a_re_export_hint(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx_dir = _private_copy(tmp_path_factory, tmp_path, "prm")

    def make_v1(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = 1
        del manifest["files"]

    _edit_manifest(onnx_dir, make_v1)
    run = shared_run(tmp_path_factory, "prm").resolve()
    with pytest.raises(ManifestError, match=re.escape(
            f"{onnx_dir / MANIFEST_FILE}: exported by an older genrerank without file hashes, "
            f"so its graphs cannot be verified; re-export: genrerank export --run {run} "
            f"--out {onnx_dir}")):
        OnnxModel(onnx_dir)


# --------------------------------------------------------------------------- incomplete runs


def test_an_incomplete_or_failed_run_is_not_exported(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_graphs(*_: Any) -> dict[str, Any]:
        raise AssertionError("an incomplete run must be refused before any work")

    monkeypatch.setattr(export, "_export_graphs", no_graphs)
    run = Path(shutil.copytree(shared_run(tmp_path_factory, "nar4rec"), tmp_path / "run"))
    (run / "run_config.json").unlink()  # killed after best/, before its decoder was chosen
    out = tmp_path / "onnx"
    with pytest.raises(IncompleteRunError, match=re.escape(
            f"run {run} is incomplete: run_config.json missing")):
        export_run(run, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / "run_config.json").write_text("{}")
    (run / "FAILED").write_text("train failed while training (at epoch 2, step 9): OSError: disk "
                                "full\n")
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(out)])
    assert result.exit_code == 1
    assert (f"run {run} failed (train failed while training (at epoch 2, step 9): OSError: disk "
            "full); fix the cause and re-run train, or --resume") in result.output
    assert not out.exists()
