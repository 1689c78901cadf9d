"""Data-parallel training: 2 gloo processes at batch b train exactly like 1 process at batch 2b,
validation counts every request once, the checkpoint loads in one process, resume works.

The two ranks are real processes (torch.multiprocessing.spawn) joined through a file store,
as torchrun would join them; the trainer finds its rank through torch.distributed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import simulate_to_dir
from genrerank.data.streaming import StreamingRerankDataset
from genrerank.evaluation.offline import merge_predictions, predict
from genrerank.experiment import ListScorer
from genrerank.losses import build_objective, resolve_loss_config
from genrerank.models import build_model
from genrerank.training import TrainConfig, Trainer, load_model, seed_everything
from genrerank.training.launch import torchrun_command, without_option
from genrerank.utils.distributed import SINGLE, DistContext, rank_stream
from tests.training import weights

BATCH = 20  # per process; the single-process reference trains at 2 * BATCH


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # kuaishou: every list has the same length, so each rank's per-position mean loss weighs
    # as many positions as the other's and their average is the big batch's mean.
    return simulate_to_dir("kuaishou", 240, 3, tmp_path_factory.mktemp("ddp") / "d",
                           progress=False)


def fit(data_dir: Path, out: Path, batch: int, epochs: int, resume: bool = False,
        streaming: bool = False) -> None:
    """Train the pointwise model (no dropout: its masks would differ between the layouts)."""
    train = (StreamingRerankDataset(data_dir, "train", shuffle_buffer=64) if streaming
             else RerankDataset(data_dir, split="train"))
    valid = RerankDataset(data_dir, split="valid")
    seed_everything(0)
    model = build_model("pointwise", train.spec, {"dim": 16, "hidden": 32, "dropout": 0.0})
    objective = build_objective(resolve_loss_config([{"name": "gain_bce"}], train.spec))
    config = TrainConfig(epochs=epochs, batch_size=batch, lr=0.01, lr_schedule="constant",
                         patience=0, progress=False, num_threads=1, seed=0,
                         select_metric="list_score", select_mode="max")
    trainer = Trainer(model, objective, train, valid, config, out,
                      ListScorer(valid, train).validate_fn(), overwrite=True)
    trainer.fit(resume=resume)


def _rank(rank: int, world: int, store: str, jobs: list[tuple]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        for job in jobs:
            fit(*job)
    finally:
        dist.destroy_process_group()


def fit_ddp(tmp_path: Path, jobs: list[tuple], world: int = 2) -> None:
    store = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"
    mp.spawn(_rank, args=(world, str(store), jobs), nprocs=world, join=True)


def history(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                         atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def ddp_runs(sim_path, tmp_path_factory) -> Path:
    """In one 2-rank job: a 2-epoch run, a 1-epoch run resumed to 2 epochs, and a run over
    the streamed training split."""
    root = tmp_path_factory.mktemp("ddp-runs")
    fit_ddp(root, [
        (sim_path, root / "ddp", BATCH, 2),
        (sim_path, root / "split", BATCH, 1),
        (sim_path, root / "split", BATCH, 2, True),
        (sim_path, root / "streamed", BATCH, 2, False, True),
    ])
    return root


def test_two_ranks_train_like_one_process_at_twice_the_batch(sim_path, ddp_runs, tmp_path):
    n_train = len(RerankDataset(sim_path, split="train"))
    assert n_train % (2 * BATCH) != 0  # the short last batch is covered too
    fit(sim_path, tmp_path / "one", 2 * BATCH, 2)

    ddp, one = ddp_runs / "ddp", tmp_path / "one"
    last = json.loads((ddp / "last" / "checkpoint.json").read_text())
    assert last["step"] == 2 * -(-n_train // (2 * BATCH))  # the big batch's step count
    assert_close_weights(weights(ddp / "last" / "model.safetensors"),
                         weights(one / "last" / "model.safetensors"), atol=1e-5)
    # Validation: the sharded loss sums and the gathered lists count every request once.
    for a, b in zip(history(ddp), history(one), strict=True):
        assert a["step"] == b["step"]
        assert a["valid/loss"] == pytest.approx(b["valid/loss"], abs=1e-5)
        assert a["valid/list_score"] == pytest.approx(b["valid/list_score"], abs=1e-5)

    # The DDP checkpoint is a plain one: it loads in this (single) process.
    model, meta = load_model(ddp, "last")
    assert meta["step"] == last["step"]
    assert_close_weights(dict(model.state_dict()),
                         weights(ddp / "last" / "model.safetensors"), atol=0.0)


def test_resume_under_ddp_equals_an_uninterrupted_ddp_run(ddp_runs):
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_close_weights(weights(ddp_runs / "ddp" / "last" / name),
                             weights(ddp_runs / "split" / "last" / name), atol=0.0)
    assert history(ddp_runs / "ddp") == history(ddp_runs / "split")


# --------------------------------------------------------------------------- pieces


def test_rank_streams_cover_the_big_batches_and_pad_like_distributed_sampler():
    perm = list(np.random.default_rng(0).permutation(23))
    world, b = 2, 4
    streams = [rank_stream(perm, r, world, b) for r in range(world)]
    assert [len(s) for s in streams] == [12, 12]  # ceil(23 / 2) each: one padded request
    padded = perm + perm[:1]  # wrapped around to a multiple of the world size
    for k in range(3):  # big batch k = the union of the ranks' batch k (the last one short)
        big = padded[k * world * b:(k + 1) * world * b]
        mine = streams[0][k * b:(k + 1) * b] + streams[1][k * b:(k + 1) * b]
        assert sorted(mine) == sorted(big)
    assert sorted(streams[0] + streams[1]) == sorted(perm + perm[:1])
    assert rank_stream(perm, 0, 1, b) == perm


def test_context_shards_are_disjoint_and_unpadded():
    shards = [DistContext(rank=r, world_size=3).shard(10) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert SINGLE.shard(4) == range(4)


def test_merged_predictions_restore_order_and_refuse_duplicates(sim_path):
    from genrerank.models import build_model

    valid = RerankDataset(sim_path, split="valid")
    model = build_model("pointwise", valid.spec, {"dim": 8, "hidden": 8})
    whole = predict(model, valid)
    parts = [predict(model, valid, rows=range(r, len(valid), 3)) for r in range(3)]
    merged = merge_predictions([parts[2], None, parts[0], parts[1]], len(valid), valid.spec)
    np.testing.assert_array_equal(merged.request_index, whole.request_index)
    np.testing.assert_array_equal(merged.lists, whole.lists)
    np.testing.assert_allclose(merged.click_prob, whole.click_prob, rtol=1e-6)
    with pytest.raises(RuntimeError, match="expected"):
        # A padded sampler's duplicate: counted twice, the metric would be biased.
        merge_predictions([parts[0], parts[0], parts[1], parts[2]], len(valid), valid.spec)


def test_nproc_relaunches_the_same_command_under_torchrun():
    argv = ["train", "--model", "pointwise", "--nproc", "2", "--data", "d", "--nproc=3"]
    assert without_option(argv, "--nproc") == ["train", "--model", "pointwise", "--data", "d"]
    cmd = torchrun_command(2, ["train", "--data", "d"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m"]
    assert cmd[6:] == ["genrerank", "train", "--data", "d"]


def test_train_nproc_2_runs_under_torchrun(sim_path, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "genrerank", "train", "--model", "pointwise", "--data",
         str(sim_path), "--out", str(out), "--nproc", "2", "--set", "train.epochs=1",
         "--set", "train.progress=false", "--set", "model.dim=16"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2 processes)" in done.stdout and done.stdout.count("best (valid)") == 1
    assert (out / "run_config.json").exists()  # the decoder chosen on the gathered lists
    model, meta = load_model(out)
    assert meta["model_name"] == "pointwise"


def test_streamed_ranks_take_equal_steps_over_their_shares(sim_path, ddp_runs):
    # Each rank streams ceil(n / 2) requests (its row groups, padded): the ranks step together.
    n_train = len(RerankDataset(sim_path, split="train"))
    last = json.loads((ddp_runs / "streamed" / "last" / "checkpoint.json").read_text())
    assert last["step"] == 2 * math.ceil(math.ceil(n_train / 2) / BATCH)
    assert [h["epoch"] for h in history(ddp_runs / "streamed")] == [1, 2]
