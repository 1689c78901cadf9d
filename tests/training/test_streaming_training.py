"""The shared trainer over a streaming data set (data larger than memory): it trains, counts its
steps from this rank's share, and a resume mid-run equals an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genrerank.data.dataset import RerankDataset
from genrerank.data.simulator import simulate_to_dir
from genrerank.data.streaming import StreamingRerankDataset
from genrerank.training import Trainer
from tests.training import TinyObjective, assert_same_tensors, make_model, small_config, weights


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_to_dir("avito", 400, 0, tmp_path_factory.mktemp("stream") / "d",
                           progress=False, shard_requests=120)


def make(sharded: Path, out: Path, epochs: int, model_seed: int = 0, **kwargs) -> Trainer:
    train = StreamingRerankDataset(sharded, "train", seed=0, shuffle_buffer=50)
    valid = RerankDataset(sharded, split="valid")
    model = make_model(train.spec, seed=model_seed)
    config = small_config(epochs=epochs, eval_every=kwargs.pop("eval_every", 0))
    return Trainer(model, TinyObjective(), train, valid, config, out, **kwargs)


def test_trains_over_a_sharded_folder_with_the_streamed_step_count(sharded, tmp_path):
    assert len(list((sharded / "requests").glob("*.parquet"))) > 1
    trainer = make(sharded, tmp_path / "run", epochs=2)
    trainer.fit()
    n_train = len(RerankDataset(sharded, split="train"))
    assert trainer.steps_per_epoch == math.ceil(n_train / trainer.config.batch_size)
    last = json.loads((tmp_path / "run" / "last" / "checkpoint.json").read_text())
    assert last["step"] == 2 * trainer.steps_per_epoch
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["train/loss"] > history[-1]["train/loss"]


def test_resume_over_a_stream_equals_an_uninterrupted_run(sharded, tmp_path):
    make(sharded, tmp_path / "straight", epochs=3).fit()
    make(sharded, tmp_path / "split", epochs=1).fit()
    make(sharded, tmp_path / "split", epochs=3, model_seed=7).fit(resume=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(weights(tmp_path / "straight" / "last" / name),
                            weights(tmp_path / "split" / "last" / name))


def test_resume_mid_epoch_skips_exactly_the_streamed_requests(sharded, tmp_path):
    make(sharded, tmp_path / "straight", epochs=2, eval_every=4).fit()

    calls = []

    def crash_on_second(model, loader):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # dies in the evaluation at step 8, mid-epoch
        return {}

    with pytest.raises(KeyboardInterrupt):
        make(sharded, tmp_path / "crash", epochs=2, eval_every=4,
             validate_fn=crash_on_second).fit()
    meta = json.loads((tmp_path / "crash" / "last" / "checkpoint.json").read_text())
    assert meta["trainer_state"]["epoch_step"] == 4  # resumes inside the first epoch
    make(sharded, tmp_path / "crash", epochs=2, eval_every=4, model_seed=3).fit(resume=True)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(weights(tmp_path / "straight" / "last" / name),
                            weights(tmp_path / "crash" / "last" / name))
