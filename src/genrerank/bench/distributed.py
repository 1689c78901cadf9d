"""``genrerank bench ddp``: training throughput of 1 and N data-parallel processes.

For each model (its packaged config, on simulated ``kuaishou`` requests) the shared trainer
runs one epoch over the training split in three layouts:

- 1 process, 1 thread: the reference of the parallel efficiency;
- 1 process, ``cores`` threads: what one would run without torchrun;
- N processes under ``torchrun`` (gloo on CPU), 1 thread each.

The global batch is the model's configured ``batch_size`` in every layout (N processes take
``batch_size / N`` each), so all three follow the same optimisation trajectory and only the
speed differs. Throughput counts training requests per second over the steps after a few
warm-up steps, data loading (collate) included and validation excluded. Efficiency =
throughput(N processes) / (N x throughput(1 process, 1 thread)).

On the GPU machine (``--device cuda``) the layouts are 1 and N processes, one GPU each.

Outputs ``ddp.{json,md}``; nothing else should run meanwhile (the JSON records the load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

WARMUP_STEPS = 3
MODELS = ("pointwise", "nar4rec")


# --------------------------------------------------------------------------- one layout


def _worker(args: argparse.Namespace) -> None:
    """One layout's training epoch (run alone or as every rank under torchrun)."""
    import torch

    from genrerank.data.dataset import RerankDataset
    from genrerank.experiment import resolve_config
    from genrerank.losses import build_objective, resolve_loss_config
    from genrerank.models import build_model
    from genrerank.training import TrainConfig, Trainer, seed_everything
    from genrerank.utils import distributed

    ctx = distributed.init_from_env(args.device)
    cfg = resolve_config(args.model)
    global_batch = int(cfg["train"]["batch_size"])
    train_cfg = TrainConfig.from_dict({
        **cfg["train"], "epochs": 1, "patience": 0, "progress": False,
        "batch_size": max(1, global_batch // ctx.world_size), "num_threads": args.threads,
        "device": args.device, "select_metric": "loss", "select_mode": "min",
    })
    seed_everything(0)
    train = RerankDataset(args.data, split="train")
    valid = RerankDataset(args.data, split="valid")
    model = build_model(args.model, train.spec,
                        {k: v for k, v in cfg["model"].items() if k != "name"})
    objective = build_objective(resolve_loss_config(cfg["loss"], train.spec))
    stamps: list[float] = []

    class TimedTrainer(Trainer):
        def _train_step(self, *a: Any, **k: Any) -> dict[str, float]:
            values = super()._train_step(*a, **k)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return values

    # Every rank reads the run folder rank 0 writes (best/ at the end): one shared path.
    run_dir = args.result.with_suffix(".run")
    trainer = TimedTrainer(model, objective, train, valid, train_cfg, run_dir, overwrite=True)
    trainer.fit()
    timed_steps = len(stamps) - 1 - WARMUP_STEPS
    if timed_steps < 1:
        raise RuntimeError(f"{len(stamps)} steps: too few to time; simulate more requests")
    seconds = stamps[-1] - stamps[WARMUP_STEPS]
    requests = timed_steps * train_cfg.batch_size * ctx.world_size
    if ctx.is_main:
        Path(args.result).write_text(json.dumps({
            "model": args.model, "processes": ctx.world_size, "threads": args.threads,
            "device": args.device, "batch_per_process": train_cfg.batch_size,
            "global_batch": train_cfg.batch_size * ctx.world_size, "steps": len(stamps),
            "timed_steps": timed_steps, "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 1),
        }))
    distributed.shutdown()


def run_layout(model: str, data: Path, processes: int, threads: int, device: str,
               work: Path) -> dict[str, Any]:
    """One layout in child processes (torchrun for more than one); its result row."""
    result = work / f"{model}-{processes}x{threads}.json"
    args = ["--worker", "--model", model, "--data", str(data), "--threads", str(threads),
            "--device", device, "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, "-m", "genrerank.bench.distributed", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "genrerank.bench.distributed", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------- the benchmark


def render_markdown(result: dict[str, Any]) -> str:
    lines = ["# Data-parallel training throughput (`genrerank bench ddp`)", "",
             f"{result['machine']}; device {result['device']}; {result['train_requests']:,} "
             f"simulated kuaishou training requests, one epoch per layout; load average at "
             f"start {result['load_average']}.", "",
             "Global batch = the model's configured batch in every layout (N processes take "
             "batch / N each). Requests/s after "
             f"{WARMUP_STEPS} warm-up steps, collate included, validation excluded. "
             "Efficiency = N-process throughput / (N x 1-process 1-thread throughput).", "",
             markdown_table(result["rows"], digits=2), ""]
    for model, eff in result["efficiency"].items():
        lines.append(f"- {model}: {eff['processes']} processes reach "
                     f"{eff['speedup_vs_1x1']:.2f}x one process with one thread (efficiency "
                     f"{eff['efficiency']:.0%}), {eff['speedup_vs_1xN']:.2f}x one process with "
                     f"{eff['processes']} threads.")
    lines.append("")
    return "\n".join(lines)


def run_ddp_benchmark(out_dir: Path, n_requests: int = 20_000, processes: int = 2,
                      models: tuple[str, ...] = MODELS, device: str = "cpu",
                      name: str = "ddp") -> dict[str, Any]:
    from genrerank.data.dataset import RerankDataset
    from genrerank.data.simulator import simulate_to_dir

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}",
        "device": device, "load_average": [round(x, 2) for x in os.getloadavg()],
        "requests": n_requests, "rows": [], "efficiency": {},
    }
    with tempfile.TemporaryDirectory(prefix="genrerank-bench-ddp-") as tmp:
        work = Path(tmp)
        data = simulate_to_dir("kuaishou", n_requests, 0, work / "data", progress=False)
        result["train_requests"] = len(RerankDataset(data, split="train"))
        layouts = ([(1, 1), (1, processes), (processes, 1)] if device == "cpu"
                   else [(1, 1), (processes, 1)])
        for model in models:
            rows = {}
            for procs, threads in layouts:
                row = run_layout(model, data, procs, threads, device, work)
                rows[(procs, threads)] = row
                result["rows"].append(row)
                print(f"{model}: {procs} process(es) x {threads} thread(s): "
                      f"{row['requests_per_s']:.0f} requests/s", flush=True)
            base = rows[(1, 1)]["requests_per_s"]
            par = rows[(processes, 1)]["requests_per_s"]
            one_n = rows.get((1, processes), rows[(1, 1)])["requests_per_s"]
            result["efficiency"][model] = {
                "processes": processes, "speedup_vs_1x1": round(par / base, 3),
                "efficiency": round(par / (processes * base), 3),
                "speedup_vs_1xN": round(par / one_n, 3),
            }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", render_markdown(result))
    print(render_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a layout of `genrerank bench ddp`")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--result", type=Path, required=True)
    _worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
