"""The Triton model repository of an export, validated offline (no server needed: always runs).

The nar4rec export is shared with test_export.py (exported once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from genrerank.cli import main
from genrerank.serving.export import MANIFEST_FILE, synthetic_requests
from genrerank.serving.onnx_model import OnnxModel
from genrerank.serving.parity import PARITY_SIZES
from genrerank.serving.triton.backend import pad_feeds
from genrerank.serving.triton.repository import (
    MANIFEST_PARAMETER,
    TritonRepositoryError,
    candidate_bucket,
    validate_repository,
    write_repository,
)
from tests.serving.test_export import shared_export, shared_run


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory, "nar4rec")[0]


@pytest.fixture()
def repo(export_dir: Path, tmp_path: Path) -> Path:
    write_repository(export_dir, tmp_path / "repo")
    return tmp_path / "repo"


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_repository_layout_and_configs(repo: Path, export_dir: Path) -> None:
    assert _tree(repo) == ["nar4rec_item_tower/1/model.onnx", "nar4rec_item_tower/config.pbtxt",
                           "nar4rec_model/1/model.onnx", "nar4rec_model/config.pbtxt"]
    assert (repo / "nar4rec_model/1/model.onnx").read_bytes() == (
        export_dir / "model.onnx").read_bytes()
    for name in ("nar4rec_item_tower", "nar4rec_model"):
        config = _config(repo / name / "config.pbtxt")  # Triton's own protobuf definitions
        assert config.name == name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0
        assert config.HasField("dynamic_batching")
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    tower = _config(repo / "nar4rec_item_tower/config.pbtxt")
    dims = {i.name: (mc.DataType.Name(i.data_type), list(i.dims)) for i in tower.input}
    spec_width = len(json.loads((export_dir / MANIFEST_FILE).read_text())
                     ["feature_spec"]["item_dense"])
    assert dims["item_dense"] == ("TYPE_FP32", [spec_width])
    # A per-item scalar: dims [1] reshaped to [] (the graph's input is [batch]).
    assert dims["item_hash"] == ("TYPE_INT64", [1])
    assert [i.reshape.shape for i in tower.input if i.name == "item_hash"] == [[]]
    model = _config(repo / "nar4rec_model/config.pbtxt")
    dims = {t.name: (mc.DataType.Name(t.data_type), list(t.dims))
            for t in [*model.input, *model.output]}
    assert dims["candidate_mask"] == ("TYPE_BOOL", [-1])
    assert dims["item_static"] == ("TYPE_FP32", [-1, 16])
    assert dims["log_probs"] == ("TYPE_FP32", [-1, -1])
    assert dims["context_cat"] == ("TYPE_INT64", [-1])  # width 0 in the graph: -1, not 0
    manifest = json.loads(model.parameters[MANIFEST_PARAMETER].string_value)
    assert manifest["model_version"] == json.loads(
        (export_dir / MANIFEST_FILE).read_text())["model_version"]
    assert "files" not in manifest and "parity" not in manifest


def test_validation_checks_every_tensor_against_the_graph(repo: Path) -> None:
    report = validate_repository(repo)
    model = report["nar4rec_model"]
    assert set(model["inputs"]) == {"user_cat", "user_dense", "context_cat", "context_dense",
                                    "item_static", "upstream_score", "candidate_mask",
                                    "category", "position_mask"}
    assert set(model["outputs"]) == {"log_probs", "click_logits", "item_repr"}
    assert report["nar4rec_item_tower"]["outputs"] == {"item_static": ["TYPE_FP32", [16]]}


def test_gpu_instances_get_the_execution_accelerator(export_dir: Path, tmp_path: Path) -> None:
    write_repository(export_dir, tmp_path / "trt", gpu=True)
    config = _config(tmp_path / "trt/nar4rec_model/config.pbtxt")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    (acc,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP32"
    write_repository(export_dir, tmp_path / "cuda", gpu=True, accelerator="cuda")
    config = _config(tmp_path / "cuda/nar4rec_item_tower/config.pbtxt")
    assert [a.name for a in
            config.optimization.execution_accelerators.gpu_execution_accelerator] == ["cuda"]
    with pytest.raises(TritonRepositoryError, match="CPU stand-in"):
        write_repository(export_dir, tmp_path / "x", gpu=True, backend="python")


def test_python_stand_in_has_the_same_interface(export_dir: Path, tmp_path: Path) -> None:
    write_repository(export_dir, tmp_path / "ort")
    write_repository(export_dir, tmp_path / "py", backend="python")
    assert "nar4rec_model/1/model.py" in _tree(tmp_path / "py")
    for name in ("nar4rec_item_tower", "nar4rec_model"):
        ort, py = (_config(tmp_path / k / name / "config.pbtxt") for k in ("ort", "py"))
        assert py.backend == "python" and py.platform == ""
        assert list(py.input) == list(ort.input) and list(py.output) == list(ort.output)
        assert py.max_batch_size == ort.max_batch_size
        assert py.dynamic_batching == ort.dynamic_batching


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("old", "new", "message"), [
    ("data_type: TYPE_BOOL", "data_type: TYPE_INT32",
     r"input candidate_mask is TYPE_INT32, the ONNX graph's is TYPE_BOOL"),
    ("dims: 16", "dims: 8", r"input item_static dims \[-1, 8\] differ from the ONNX graph's "
                            r"\[-1, 16\]"),
    ("max_batch_size: 64", "max_batch_size: 0", r"max_batch_size 0; must be > 0"),
    ('name: "nar4rec_model"', 'name: "other"', r"name 'other' differs from its folder"),
    ('name: "click_logits"', 'name: "clicks"', r"outputs \[.*'clicks'.*\] differ from the "
                                                r"ONNX graph's"),
    ("max_queue_delay_microseconds: 200", "foo: 1", r"not a Triton ModelConfig"),
])
def test_validation_names_what_is_wrong(repo: Path, old: str, new: str, message: str) -> None:
    config = repo / "nar4rec_model/config.pbtxt"
    _edit(config, old, new)
    with pytest.raises(TritonRepositoryError, match=message) as info:
        validate_repository(repo)
    assert "\n" not in str(info.value)  # one line
    assert str(config) in str(info.value)


def test_validation_requires_dynamic_batching(repo: Path) -> None:
    config = repo / "nar4rec_item_tower/config.pbtxt"
    text = config.read_text()
    start = text.index("dynamic_batching {")
    config.write_text(text[:start] + text[text.index("}", start) + 1:])
    with pytest.raises(TritonRepositoryError, match="no dynamic_batching"):
        validate_repository(repo)


def test_other_models_are_left_alone_and_foreign_folders_refused(
        export_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "ranker/1").mkdir(parents=True)
    (repo / "ranker/config.pbtxt").write_text('name: "ranker"\n')
    write_repository(export_dir, repo)
    write_repository(export_dir, repo)  # rewriting our own models is fine
    assert (repo / "ranker/config.pbtxt").read_text() == 'name: "ranker"\n'
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    (repo / "other_model").mkdir()  # someone else's model of the name we would write
    with pytest.raises(TritonRepositoryError, match="other_model exists and was not written"):
        write_repository(export_dir, repo, name="other")
    assert not (repo / "other_item_tower").exists()  # refused before anything was written


def test_step_by_step_models_are_refused_in_one_line(export_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "ar"
    shutil.copytree(export_dir, fake)
    manifest = json.loads((fake / MANIFEST_FILE).read_text())
    manifest.update(stepwise=True, model_name="autoregressive")
    (fake / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TritonRepositoryError, match="'autoregressive' .* no Triton repository"):
        write_repository(fake, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_a_swapped_graph_is_refused(export_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "swapped"
    shutil.copytree(export_dir, fake)
    shutil.copyfile(fake / "item_tower.onnx", fake / "model.onnx")
    with pytest.raises(ValueError, match="sha256"):
        write_repository(fake, tmp_path / "repo")


def test_candidate_buckets() -> None:
    assert [candidate_bucket(n) for n in (1, 8, 9, 60, 64, 65, 500)] == [8, 8, 16, 64, 64, 128,
                                                                         512]
    assert candidate_bucket(60, limit=60) == 60 and candidate_bucket(70, limit=60) == 70


def test_padded_and_stacked_requests_give_the_unpadded_outputs(export_dir: Path) -> None:
    """What Triton's batching relies on: each parity request padded to its bucket and the
    model's positions, then stacked with others of the same bucket, gives the same log-probs
    and item vectors on its real candidates and positions as alone and unpadded."""
    onnx = OnnxModel(export_dir)
    m = 3
    req = {k: v.numpy() for k, v in synthetic_requests(onnx.spec, PARITY_SIZES, m, 1).items()}
    singles, padded = [], []
    for b, n in enumerate(PARITY_SIZES):
        static = onnx.item_embedding(req["item_cat"][b, :n], req["item_dense"][b, :n],
                                     req["item_hash"][b, :n])
        feeds = onnx.request_feeds(req["user_cat"][b:b + 1], req["user_dense"][b:b + 1],
                                   static[None], req["upstream_score"][b:b + 1, :n],
                                   np.ones((1, n), bool), req["category"][b:b + 1, :n])
        singles.append(onnx.matrix(feeds, m))
        padded.append(pad_feeds(feeds, m, positions=6, max_candidates=None))
    # Stack the requests that share a bucket (60 and 45 -> 64), as the batcher would.
    groups: dict[tuple, list[int]] = {}
    for b, feeds in enumerate(padded):
        groups.setdefault(feeds["item_static"].shape[1:], []).append(b)
    assert any(len(g) > 1 for g in groups.values())
    for members in groups.values():
        stacked = {k: np.concatenate([padded[b][k] for b in members]) for k in padded[0]}
        log_probs, _, item_repr = onnx._run("model", stacked)
        for row, b in enumerate(members):
            n = PARITY_SIZES[b]
            want_lp, _, want_repr = singles[b]
            got = log_probs[row:row + 1, :n, :m]
            assert np.array_equal(np.isfinite(got), np.isfinite(want_lp))
            finite = np.isfinite(want_lp)
            assert np.abs(got[finite] - want_lp[finite]).max() <= 1e-5
            assert np.abs(item_repr[row:row + 1, :n] - want_repr).max() <= 1e-5


def test_cli_export_writes_the_repository(tmp_path_factory: pytest.TempPathFactory,
                                          tmp_path: Path) -> None:
    run = shared_run(tmp_path_factory, "pointwise")
    result = CliRunner().invoke(main, [
        "export", "--run", str(run), "--out", str(tmp_path / "onnx"), "--no-check",
        "--triton", str(tmp_path / "repo"), "--triton-name", "pw", "--triton-max-batch", "32"])
    assert result.exit_code == 0, result.output
    assert "triton: " in result.output and "pw_model/config.pbtxt" in result.output
    assert _config(tmp_path / "repo/pw_model/config.pbtxt").max_batch_size == 32
    validate_repository(tmp_path / "repo", name="pw")
    bad = CliRunner().invoke(main, [
        "export", "--run", str(run), "--out", str(tmp_path / "other"), "--no-check",
        "--triton", str(tmp_path / "repo"), "--triton-name", "bad name"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "Error: model name 'bad name': use letters, digits, '_' and '-'"]
    assert not (tmp_path / "other").exists()  # refused before the export
