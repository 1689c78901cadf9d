"""``genrerank bench large-data``: data larger than memory, written and trained over.

1. **Write**: ``genrerank simulate --preset kuaishou --requests N --shard-requests S`` in a child
   process: N requests generated and written chunk by chunk in shards
   (:func:`genrerank.data.simulator.simulate_sharded`).
2. **Train**: one epoch of the pointwise model over the training split of those shards, in a
   child process, with :class:`~genrerank.data.streaming.StreamingRerankDataset` in a
   ``DataLoader``: feature statistics fitted on ``statistics_sample()`` (the first 200,000
   training requests), then AdamW with the model's default learning rate, weight decay and
   gradient clipping (the shared trainer's defaults). ``--max-train-seconds`` caps the phase:
   the result then says how much of the epoch ran (``epoch_complete``) and the throughput
   measured; it never claims a full epoch that did not run.

Each phase's peak RSS is that child's own (``os.wait4``: the maximum resident set of the
process and the descendants it waited for, e.g. DataLoader workers), not this process's.
Reported: wall time, requests/s, peak RSS per phase, the data set's size on disk. Target: peak
RSS below 4 GiB in both phases. Outputs ``large_data.{json,md}`` (``large_data_quick.*`` with
``--quick``) in the output folder. On a 2-core machine other jobs change the timings; the JSON
records the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

TARGET_RSS_GIB = 4.0
DEFAULT_REQUESTS = 5_000_000
QUICK_REQUESTS = 40_000
DEFAULT_SHARD_REQUESTS = 200_000
QUICK_SHARD_REQUESTS = 10_000


def _run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; its wall seconds, peak RSS in bytes (``os.wait4``: this child and the
    descendants it waited for) and its stderr tail. Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    # Pipes are drained by threads so that a chatty child never blocks on a full pipe, and
    # wait4 (not Popen.wait) reaps it to get this child's own resource usage.
    import threading

    chunks: dict[str, list[str]] = {"out": [], "err": []}

    def drain(stream: Any, key: str) -> None:
        for line in stream:
            chunks[key].append(line)
            if key == "err":
                sys.stderr.write(line)  # progress lines of the child, shown live

    threads = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(chunks["err"])[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return seconds, int(usage.ru_maxrss) * 1024, "".join(chunks["out"])  # KiB on Linux


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- train phase (child)


def train_one_epoch(
    data_dir: Path,
    batch_size: int,
    workers: int,
    max_seconds: float | None,
    sample_requests: int,
    seed: int = 0,
) -> dict[str, Any]:
    """One epoch of the pointwise model over the training split of ``data_dir``, streamed."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from genrerank.data.dataset import collate
    from genrerank.data.streaming import StreamingRerankDataset
    from genrerank.experiment import resolve_config
    from genrerank.losses import build_objective, resolve_loss_config
    from genrerank.models import build_model
    from genrerank.training import TrainConfig, seed_everything
    from genrerank.utils.progress import progress

    cfg = resolve_config("pointwise")
    train_cfg = TrainConfig.from_dict(cfg["train"])
    seed_everything(seed)
    t0 = time.perf_counter()
    data = StreamingRerankDataset(data_dir, "train", seed=seed)
    open_s = time.perf_counter() - t0
    model = build_model("pointwise", data.spec,
                        {k: v for k, v in cfg["model"].items() if k != "name"})
    objective = build_objective(resolve_loss_config(cfg["loss"], data.spec))
    t0 = time.perf_counter()
    sample = data.statistics_sample(sample_requests)
    model.fit_statistics(sample)
    sample_size = len(sample)
    del sample
    stats_s = time.perf_counter() - t0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    data.set_epoch(0)
    model.train()
    done = steps = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    complete = True
    steps_total = math.ceil(len(data) / batch_size)
    for batch in progress(loader, "large-data epoch", "steps", total=steps_total):
        total, _ = objective(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        losses.append(float(total.detach()))
        done += batch.batch_size
        steps += 1
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            complete = done >= len(data)
            break
    seconds = time.perf_counter() - t0
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    last = float(np.mean(losses[-max(1, len(losses) // 10):]))
    return {
        "model": "pointwise", "trainer": "benchmark loop (AdamW)", "batch_size": batch_size,
        "workers": workers, "torch_threads": torch.get_num_threads(),
        "epoch_requests": len(data), "trained_requests": done, "steps": steps,
        "epoch_complete": bool(complete and done >= len(data)),
        "open_seconds": round(open_s, 2),
        "statistics_sample_requests": sample_size, "statistics_seconds": round(stats_s, 2),
        "train_seconds": round(seconds, 2),
        "requests_per_second": round(done / seconds, 1) if seconds else None,
        "loss_first_tenth": round(first, 5), "loss_last_tenth": round(last, 5),
    }


def train_epoch_with_trainer(
    data_dir: Path,
    batch_size: int,
    run_dir: Path,
    sample_requests: int,
    valid_requests: int = 20_000,
    seed: int = 0,
) -> dict[str, Any]:
    """One epoch of the pointwise model with the shared Trainer over the streamed training
    split: statistics on its ``statistics_sample``, validation (loss only) on the first
    ``valid_requests`` validation requests in memory, checkpoints in ``run_dir``."""
    import torch

    from genrerank.data.streaming import StreamingRerankDataset
    from genrerank.experiment import resolve_config
    from genrerank.losses import build_objective, resolve_loss_config
    from genrerank.models import build_model
    from genrerank.training import TrainConfig, Trainer, seed_everything

    cfg = resolve_config("pointwise")
    # One thread (the machine is shared); select on the loss: list metrics need the oracle's
    # scorer, which is not what this benchmark measures.
    train_cfg = TrainConfig.from_dict({**cfg["train"], "epochs": 1, "batch_size": batch_size,
                                       "num_threads": 1, "select_metric": "loss",
                                       "select_mode": "min"})
    seed_everything(seed)
    t0 = time.perf_counter()
    train = StreamingRerankDataset(data_dir, "train", seed=seed)
    open_s = time.perf_counter() - t0
    valid = StreamingRerankDataset(data_dir, "valid").statistics_sample(valid_requests)
    model = build_model("pointwise", train.spec,
                        {k: v for k, v in cfg["model"].items() if k != "name"})
    loss_cfg = resolve_loss_config(cfg["loss"], train.spec)
    trainer = Trainer(model, build_objective(loss_cfg), train, valid, train_cfg, run_dir,
                      loss_config=loss_cfg, overwrite=True)
    # fit_statistics reads the leading sample; the trainer takes the default size.
    t0 = time.perf_counter()
    best = trainer.fit()
    seconds = time.perf_counter() - t0
    return {
        "model": "pointwise", "trainer": "genrerank Trainer", "batch_size": batch_size,
        "workers": 0, "torch_threads": torch.get_num_threads(),
        "epoch_requests": len(train), "trained_requests": len(train),
        "steps": trainer.steps_per_epoch, "epoch_complete": True,
        "open_seconds": round(open_s, 2), "statistics_sample_requests": min(
            sample_requests, train.num_requests), "statistics_seconds": None,
        "train_seconds": round(seconds, 2),
        "requests_per_second": round(len(train) / seconds, 1),
        "valid_requests": len(valid), "valid_loss": round(float(best["loss"]), 5),
        "loss_first_tenth": None, "loss_last_tenth": None,
    }


# --------------------------------------------------------------------------- the benchmark


def render_markdown(result: dict[str, Any]) -> str:
    w, t = result["write"], result.get("train")
    rows = [{"phase": "write (simulate, sharded)", "requests": w["requests"],
             "seconds": w["seconds"], "requests/s": w["requests_per_second"],
             "peak RSS GiB": w["peak_rss_gib"], "disk GB": round(w["disk_bytes"] / 1e9, 3)}]
    if t:
        rows.append({"phase": "train (pointwise, streaming)" + ("" if t["epoch_complete"]
                                                                 else ", partial epoch"),
                     "requests": t["trained_requests"], "seconds": t["train_seconds"],
                     "requests/s": t["requests_per_second"], "peak RSS GiB": t["peak_rss_gib"],
                     "disk GB": ""})
    lines = [
        "# Large-data benchmark", "",
        f"{result['machine']}; load average at start {result['load_average']}; "
        f"{result['requests']:,} simulated `kuaishou` requests in shards of "
        f"{result['shard_requests']:,}.", "",
        markdown_table(rows, digits=2), "",
        f"Target: peak RSS below {TARGET_RSS_GIB:g} GiB in both phases; met: "
        f"{result['meets_target']}.", "",
        f"Write: `{w['command']}`; {w['shards']} shards, {w['disk_bytes'] / 1e9:.3f} GB on disk "
        f"({w['disk_bytes'] / max(w['requests'], 1):.0f} bytes a request).",
    ]
    if t:
        lines += ["",
                  f"Train ({t.get('trainer', 'benchmark loop (AdamW)')}): one epoch over the "
                  f"training split ({t['epoch_requests']:,} requests), batch {t['batch_size']}, "
                  f"{t['workers']} DataLoader workers, {t['torch_threads']} torch thread(s); "
                  f"statistics fitted on the first {t['statistics_sample_requests']:,} training "
                  f"requests; opening the data set (counting the split per row group) "
                  f"{t['open_seconds']} s."]
        if t.get("loss_first_tenth") is not None:
            lines[-1] += (f" Statistics {t['statistics_seconds']} s; mean loss "
                          f"{t['loss_first_tenth']} over the first tenth of the steps, "
                          f"{t['loss_last_tenth']} over the last.")
        if t.get("valid_loss") is not None:
            lines[-1] += (f" Train seconds include statistics, validation on the first "
                          f"{t['valid_requests']:,} validation requests (loss "
                          f"{t['valid_loss']}) and checkpoints.")
        if not t["epoch_complete"]:
            lines += ["", f"**Partial epoch**: stopped by `--max-train-seconds` after "
                          f"{t['trained_requests']:,} of {t['epoch_requests']:,} requests "
                          f"({100 * t['trained_requests'] / t['epoch_requests']:.1f} %); a full "
                          f"epoch at this rate would take "
                          f"{t['epoch_requests'] / t['requests_per_second'] / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def run_large_data_benchmark(
    n_requests: int,
    shard_requests: int,
    out_dir: Path,
    work_dir: Path,
    *,
    quick: bool = False,
    batch_size: int = 256,
    workers: int = 0,
    max_train_seconds: float | None = None,
    sample_requests: int = 200_000,
    keep_data: bool = False,
    skip_write: bool = False,
    trainer: bool = False,
) -> dict[str, Any]:
    """Write ``n_requests`` in shards under ``work_dir``, train one epoch over them; each phase
    in a child process. Writes ``large_data[_quick].{json,md}`` to ``out_dir``."""
    data_dir = work_dir / "kuaishou"
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "requests": n_requests, "shard_requests": shard_requests, "quick": quick,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)},
    }
    cmd = [sys.executable, "-m", "genrerank", "simulate", "--preset", "kuaishou", "--requests",
           str(n_requests), "--seed", "0", "--shard-requests", str(shard_requests), "--out",
           str(data_dir), "--overwrite"]
    if skip_write:  # reuse a data set written by an earlier run (its figures are not re-measured)
        previous = json.loads((work_dir / "write.json").read_text())
        result["write"] = previous
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        seconds, rss, _ = _run_child(cmd)
        disk = _disk_bytes(data_dir)
        result["write"] = {
            "command": " ".join(["genrerank", *cmd[3:]]), "requests": n_requests,
            "seconds": round(seconds, 1), "requests_per_second": round(n_requests / seconds, 1),
            "peak_rss_bytes": rss, "peak_rss_gib": round(rss / 2**30, 3), "disk_bytes": disk,
            "shards": len(list((data_dir / "requests").glob("*.parquet"))),
        }
        atomic_write_json(work_dir / "write.json", result["write"])
    print(f"write: {result['write']}", flush=True)
    train_json = work_dir / "train.json"
    train_cmd = [sys.executable, "-m", "genrerank.bench.large_data", "--data", str(data_dir),
                 "--result", str(train_json), "--batch-size", str(batch_size), "--workers",
                 str(workers), "--sample-requests", str(sample_requests)]
    if max_train_seconds is not None:
        train_cmd += ["--max-seconds", str(max_train_seconds)]
    if trainer:
        train_cmd += ["--trainer", "--run-dir", str(work_dir / "run")]
    seconds, rss, _ = _run_child(train_cmd)
    train = json.loads(train_json.read_text())
    train.update(wall_seconds=round(seconds, 1), peak_rss_bytes=rss,
                 peak_rss_gib=round(rss / 2**30, 3))
    result["train"] = train
    result["meets_target"] = bool(
        max(result["write"]["peak_rss_bytes"], rss) < TARGET_RSS_GIB * 2**30)
    name = "large_data_quick" if quick else "large_data"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", render_markdown(result))
    print(render_markdown(result))
    if not keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def _main(argv: list[str] | None = None) -> None:
    """The train phase's child process (``python -m genrerank.bench.large_data``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--sample-requests", type=int, default=200_000)
    parser.add_argument("--trainer", action="store_true", help="Use the shared Trainer.")
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.trainer:
        if args.max_seconds is not None or args.workers:
            parser.error("--trainer trains a whole epoch with 0 workers")
        out = train_epoch_with_trainer(args.data, args.batch_size, args.run_dir,
                                       args.sample_requests)
    else:
        out = train_one_epoch(args.data, args.batch_size, args.workers, args.max_seconds,
                              args.sample_requests)
    atomic_write_json(args.result, out)


if __name__ == "__main__":
    _main()
