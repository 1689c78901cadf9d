"""DPO and PPO fine-tuning under data parallelism (``finetune --nproc``): 2 gloo ranks at batch
b tune DPO exactly like 1 process at batch 2b (every pair's loss has the same weight, so the
mean over ranks is the big batch's mean), the checkpoint loads in one process, and PPO runs to
a complete run on every rank. The ranks are real processes joined through a file store, as in
tests/training/test_distributed.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genrerank.data.dataset import RerankDataset
from genrerank.data.pairs import PairDataset, PairRule, read_pairs
from genrerank.data.simulator import simulate_to_dir
from genrerank.experiment import train_run
from genrerank.losses.base import list_log_probs
from genrerank.preference.finetune import finetune_run
from genrerank.preference.nearline import run_nearline
from genrerank.training import load_model
from tests.training import weights
from tests.training.test_distributed import assert_close_weights, history

BATCH = 8  # pairs per process; the single-process run tunes at 2 * BATCH
COMMON = ("train.epochs=1", "train.num_threads=1", "train.eval_every=0", "train.lr=0.001")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-ddp")
    data = simulate_to_dir("kuaishou", 200, 4, root / "data", progress=False)
    tiny = ("train.epochs=1", "model.dim=16", "train.num_threads=1")
    for name in ("autoregressive", "evaluator"):
        train_run(name, data, root / name, overrides=tiny)
    pairs = root / "pairs.parquet"
    run_nearline(root / "autoregressive", root / "evaluator", data, pairs,
                 rule=PairRule(delta=0.05, max_pairs=2), seed=0, max_requests=60,
                 show_progress=False,
                 samples=3, beams=2, mmr=1)
    return {"root": root, "data": data, "pairs": pairs}


def _rank(rank: int, world: int, store: str, jobs: list[dict]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        for job in jobs:
            finetune_run(**job)
    finally:
        dist.destroy_process_group()


def test_dpo_on_two_ranks_equals_one_process_at_twice_the_batch(setup, tmp_path) -> None:
    root, data = setup["root"], setup["data"]
    table, _ = read_pairs(setup["pairs"])
    n_pairs = sum(len(p) for p, s in zip(table.column("pairs").to_pylist(),
                                         table.column("split").to_pylist(), strict=True)
                  if s == "train")
    assert n_pairs % (2 * BATCH) != 0  # a short last batch is covered too
    # An even count: with an odd one the last batch is padded with a repeated pair (as
    # DistributedSampler pads) and the equality holds only approximately (README).
    assert n_pairs % 2 == 0
    common = {"init_run": root / "autoregressive", "data_dir": data, "method": "dpo",
              "pairs": setup["pairs"], "overwrite": True}
    ppo = {"init_run": root / "autoregressive", "data_dir": data, "method": "ppo",
           "evaluator": root / "evaluator", "overwrite": True,
           "overrides": (*COMMON, "train.batch_size=16", "loss.0.group_size=2")}
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), [
        {**common, "out_dir": tmp_path / "ddp",
         "overrides": (*COMMON, f"train.batch_size={BATCH}")},
        {**ppo, "out_dir": tmp_path / "ppo"},
    ]), nprocs=2, join=True)
    finetune_run(**common, out_dir=tmp_path / "one",
                 overrides=(*COMMON, f"train.batch_size={2 * BATCH}"))

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    # Key biases of attention and of the pointer are excluded: a softmax is blind to them, so
    # their true gradient is zero, and Adam turns its float noise (which differs with the batch
    # layout) into steps of about lr. The functions are compared instead, below.
    a, b = (weights(run / "last" / "model.safetensors") for run in (ddp, one))
    blind = re.compile(r"key.*bias|in_proj_bias")
    assert_close_weights({k: v for k, v in a.items() if not blind.search(k)},
                         {k: v for k, v in b.items() if not blind.search(k)}, atol=1e-5)
    valid = PairDataset(RerankDataset(data, split="valid"), table, "valid")
    batch = PairDataset.collate_fn([valid[i] for i in range(len(valid))])
    with torch.no_grad():
        logp = [list_log_probs(load_model(run, "last")[0](batch).log_probs, batch)
                for run in (ddp, one)]
    assert float((logp[0] - logp[1]).abs().max()) < 1e-4
    for a, b in zip(history(ddp), history(one), strict=True):
        assert a["step"] == b["step"]
        for key in ("valid/loss", "valid/reward", "valid/kl_ref"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # Rank 0 wrote one plain run that loads in this process, with its fine-tuning record.
    assert load_model(ddp, "best")[0].name == "autoregressive"
    assert json.loads((ddp / "run_config.json").read_text())["finetune"]["method"] == "dpo"
    # PPO under DDP: a complete run, whose steps are the global batches (2 x 16 requests).
    ppo_steps = json.loads((tmp_path / "ppo" / "last" / "checkpoint.json").read_text())["step"]
    assert ppo_steps == -(-160 // 32)
    assert json.loads((tmp_path / "ppo" / "run_config.json").read_text())["finetune"][
        "method"] == "ppo"
