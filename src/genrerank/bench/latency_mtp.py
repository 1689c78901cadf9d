"""The multi-token prediction section of ``genrerank bench latency``: self-speculative greedy
decoding of the autoregressive model against plain greedy (KV cache), batch 1.

How many proposals the next-item head accepts depends on the weights (random heads propose the
trunk's runners-up; trained heads what they learned), so unlike the rest of the benchmark this
section TRAINS its models, briefly: per preset (``kuaishou`` n = 60, m = 6; ``large`` n = 500,
m = 50) a small simulated data set, the packaged autoregressive config with ``mtp_heads`` heads,
its loss terms plus the ``mtp`` term (``mtp_target``, by default ``"model"``: the heads imitate
the next-item head, which is what verification accepts), and the shared
:class:`~genrerank.training.trainer.Trainer` for a few epochs (a few hundred steps). Another
simulated set (another seed) provides the requests that are decoded.

Per preset, on ``mtp_eval_requests`` requests decoded one at a time (batch 1):

- steps per list: decoder calls (plain greedy: m; self-speculative: the first call, at the start
  token, plus one per verification);
- acceptance: the share of the heads' proposals that the next-item head kept;
- identical to greedy: the share of lists equal to plain greedy's (verified mode: must be 1.0).

Timing, as in the rest of the benchmark (:func:`genrerank.bench.latency.time_cell`): one call
decodes ONE list, batch 1; consecutive rounds cycle through the first ``mtp_timed_requests``
requests, every variant on the same request in a round, so p50 / mean are per list over a mix of
requests. Variants: ``autoregressive`` (plain greedy, KV cache, the same trained model: the
reference), ``autoregressive_mtp`` (verified) and ``autoregressive_mtp_unverified``
(``mtp_verify=False``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from genrerank.data.dataset import Batch, RerankDataset, collate
from genrerank.utils.tables import markdown_table

if TYPE_CHECKING:
    from genrerank.bench.latency import LatencySettings
    from genrerank.models.autoregressive import Autoregressive

#: Variants of this section -> what one timed call is.
MTP_VARIANTS: dict[str, str] = {
    "autoregressive_mtp": "greedy by self-speculative decoding (heads propose, the next-item "
                          "head verifies), KV cache",
    "autoregressive_mtp_unverified": "heads' proposals kept unchecked (mtp_verify=False), KV "
                                     "cache",
}
#: The reference every MTP variant is compared with: plain greedy of the same trained model.
REFERENCE = "autoregressive"
MTP_PRESETS = ("kuaishou", "large")
EVAL_SEED_OFFSET = 1000  # the decoded requests: another simulation than the training data


def _decode_kwargs(variant: str) -> dict[str, Any]:
    if variant == REFERENCE:
        return {}
    if variant == "autoregressive_mtp":
        return {"mtp": True}
    if variant == "autoregressive_mtp_unverified":
        return {"mtp": True, "mtp_verify": False}
    raise ValueError(f"unknown MTP variant {variant!r}; known: {list(MTP_VARIANTS)}")


# ---------------------------------------------------------------------------- the trained model


def train_mtp_model(
    data_dir: Path, run_dir: Path, settings: LatencySettings
) -> tuple[Autoregressive, dict[str, Any]]:
    """The packaged autoregressive config with ``settings.mtp_heads`` heads, trained by the
    shared trainer on ``data_dir`` (its loss terms plus ``mtp``); the model and what was done."""
    from genrerank.experiment import resolve_config
    from genrerank.losses import build_objective, resolve_loss_config
    from genrerank.models import build_model
    from genrerank.training.config import TrainConfig
    from genrerank.training.trainer import Trainer, seed_everything

    cfg = resolve_config("autoregressive")
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "name"}
    model_cfg["mtp_heads"] = settings.mtp_heads
    train = RerankDataset(data_dir, split="train")
    valid = RerankDataset(data_dir, split="valid")
    term = {"name": "mtp", "weight": settings.mtp_weight, "target": settings.mtp_target}
    loss = resolve_loss_config([*cfg["loss"], term], train.spec)
    config = TrainConfig(seed=settings.seed, epochs=settings.mtp_epochs,
                         batch_size=settings.mtp_batch_size, lr=float(cfg["train"]["lr"]),
                         patience=0, num_threads=settings.threads, progress=False)
    seed_everything(config.seed)
    model = build_model("autoregressive", train.spec, model_cfg)
    trainer = Trainer(model, build_objective(loss), train, valid, config, run_dir,
                      loss_config=loss)
    t0 = time.perf_counter()
    best = trainer.fit()
    info = {
        "config": model_cfg,
        "loss": loss,
        "train_requests": len(train),
        "epochs": settings.mtp_epochs,
        "batch_size": settings.mtp_batch_size,
        "steps": trainer.state.step,
        "train_s": time.perf_counter() - t0,
        "valid_loss": best.get("loss"),
        "valid_mtp_loss": best.get("loss/mtp"),
    }
    return model.eval(), info  # type: ignore[return-value]


# ---------------------------------------------------------------------------- quality and steps


def decode_quality(model: Autoregressive, requests: Sequence[Batch], m: int) -> dict[str, Any]:
    """Per variant over ``requests`` (batch 1 each): mean steps per list, acceptance, and the
    share of lists identical to plain greedy."""
    from genrerank.models.mtp import speculative_greedy

    greedy = [model.generate(b, m, "greedy") for b in requests]
    out: dict[str, Any] = {REFERENCE: {
        "steps_per_list": float(m), "acceptance": None, "identical_to_greedy": 1.0}}
    for variant in MTP_VARIANTS:
        verify = _decode_kwargs(variant).get("mtp_verify", True)
        steps, same, proposed, accepted = [], [], 0, 0
        for batch, ref in zip(requests, greedy, strict=True):
            lengths, width = model._lengths(batch, m)
            lists, stats = speculative_greedy(model, batch, lengths, width, verify)
            steps.append(stats.steps)
            same.append(bool(torch.equal(lists, ref)))
            proposed += stats.proposed
            accepted += stats.accepted
        out[variant] = {
            "steps_per_list": float(np.mean(steps)),
            "steps_min": int(min(steps)),
            "steps_max": int(max(steps)),
            "acceptance": accepted / proposed if proposed else None,
            "identical_to_greedy": float(np.mean(same)),
        }
    return out


def cycling_call(model: Autoregressive, requests: Sequence[Batch], m: int,
                 variant: str) -> Callable[[], Any]:
    """A zero-argument call decoding the next request of ``requests`` (cyclically)."""
    kwargs = _decode_kwargs(variant)
    state = {"i": 0}

    def call() -> Any:
        batch = requests[state["i"] % len(requests)]
        state["i"] += 1
        return model.generate(batch, m, "greedy", **kwargs)

    return call


# ---------------------------------------------------------------------------- the section


def run_mtp_section(settings: LatencySettings, work: Path, progress: bool = True
                    ) -> dict[str, Any]:
    """Train, check and time the MTP variants for each of ``settings.mtp_presets``."""
    from genrerank.bench.latency import time_cell
    from genrerank.data.simulator import simulate_to_dir

    bad = [p for p in settings.mtp_presets if p not in MTP_PRESETS]
    bad += [v for v in settings.mtp_variants if v not in MTP_VARIANTS]
    if bad:
        raise ValueError(f"unknown MTP preset(s) / variant(s) {bad}; presets {list(MTP_PRESETS)}"
                         f", variants {list(MTP_VARIANTS)}")
    t_start = time.perf_counter()
    presets = []
    for preset in settings.mtp_presets:
        t0 = time.perf_counter()
        data_dir = simulate_to_dir(preset, settings.mtp_train_requests, settings.seed,
                                   work / f"{preset}_train", progress=False)
        model, training = train_mtp_model(data_dir, work / f"{preset}_run", settings)
        eval_dir = simulate_to_dir(preset, settings.mtp_eval_requests,
                                   settings.seed + EVAL_SEED_OFFSET, work / f"{preset}_eval",
                                   progress=False, allow_missing_splits=True)
        ds = RerankDataset(eval_dir)
        m = ds.spec.max_list_length
        requests = [collate([ds[i]]) for i in range(len(ds))]
        with torch.inference_mode():
            quality = decode_quality(model, requests, m)
            timed = requests[: settings.mtp_timed_requests]
            calls = {v: cycling_call(model, timed, m, v)
                     for v in (REFERENCE, *settings.mtp_variants)}
            timing = time_cell(calls, settings)
        variants = {}
        for v in (REFERENCE, *settings.mtp_variants):
            stats = timing["variants"][v]
            ref = timing["variants"][REFERENCE]
            variants[v] = {**quality[v], **stats,
                           "speedup_p50": ref["p50_ms"] / stats["p50_ms"],
                           "speedup_mean": ref["mean_ms"] / stats["mean_ms"],
                           "step_reduction": quality[REFERENCE]["steps_per_list"]
                           / quality[v]["steps_per_list"]}
        entry = {
            "preset": preset, "n": int(requests[0].candidate_mask.shape[1]), "m": m,
            "batch_size": 1, "eval_requests": len(requests), "timed_requests": len(timed),
            "training": training,
            **{k: v for k, v in timing.items() if k != "variants"},
            "variants": variants,
            "wall_s": time.perf_counter() - t0,
        }
        presets.append(entry)
        if progress:
            print(_preset_line(entry), flush=True)
        del model
    section = {
        "variants": {REFERENCE: "plain greedy, KV cache (the same trained model)",
                     **{v: MTP_VARIANTS[v] for v in settings.mtp_variants}},
        "heads": settings.mtp_heads,
        "presets": presets,
        "wall_time_s": time.perf_counter() - t_start,
    }
    section["targets"] = mtp_targets(presets)
    return section


def _preset_line(entry: Mapping[str, Any]) -> str:
    parts = "; ".join(
        f"{v} {s['steps_per_list']:.1f} steps, p50 {s['p50_ms']:.2f} ms, identical "
        f"{s['identical_to_greedy']:.2f}" for v, s in entry["variants"].items())
    return (f"mtp {entry['preset']} (n = {entry['n']}, m = {entry['m']}), batch 1: {parts} "
            f"(trained {entry['training']['steps']} steps in {entry['training']['train_s']:.0f}s"
            f", section {entry['wall_s']:.0f}s)")


def mtp_targets(presets: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for verified self-speculative greedy at m = 50, batch 1."""
    specs = [
        ("at least 2x fewer decoding steps than greedy", "step_reduction", ">=", 2.0),
        ("at least 1.5x faster than greedy with the KV cache (p50)", "speedup_p50", ">=", 1.5),
        ("lists identical to greedy", "identical_to_greedy", ">=", 1.0),
    ]
    out = []
    matching = [p for p in presets if p["m"] == 50 and "autoregressive_mtp" in p["variants"]]
    for label, key, op, bound in specs:
        if not matching:
            out.append({"target": label, "measure": key, "bound": f"{op} {bound}",
                        "where": "m = 50, batch 1", "status": "not measured"})
        for p in matching:
            value = p["variants"]["autoregressive_mtp"][key]
            out.append({"target": label, "measure": key, "bound": f"{op} {bound}",
                        "where": f"{p['preset']} (n = {p['n']}, m = {p['m']}), batch 1",
                        "value": value, "status": "met" if value >= bound else "not met"})
    return out


def render_mtp_targets(section: Mapping[str, Any]) -> str:
    lines = ["Multi-token prediction targets (verified self-speculative greedy vs greedy):"]
    for t in section["targets"]:
        value = "-" if t.get("value") is None else f"{t['value']:.2f}"
        status = "NOT met" if t["status"] == "not met" else t["status"]
        lines.append(f"- {t['target']} ({t['measure']} {t['bound']}) at {t['where']}: "
                     f"measured {value}: {status}")
    return "\n".join(lines)


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_mtp(section: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    rows = []
    for p in section["presets"]:
        for v, s in p["variants"].items():
            rows.append({
                "setting": p["preset"], "n": p["n"], "m": p["m"], "variant": v,
                "steps / list": _f(s["steps_per_list"], 1),
                "fewer steps": f"{s['step_reduction']:.2f}x",
                "acceptance": _f(s["acceptance"]),
                "identical to greedy": _f(s["identical_to_greedy"], 3),
                "p50 ms / list": _f(s["p50_ms"]), "mean ms / list": _f(s["mean_ms"]),
                "speed-up (p50)": f"{s['speedup_p50']:.2f}x",
                "runs": s["runs"],
            })
    train = "; ".join(
        f"{p['preset']}: {p['training']['train_requests']} training requests, "
        f"{p['training']['steps']} steps ({p['training']['epochs']} epochs of batch "
        f"{p['training']['batch_size']}) in {p['training']['train_s']:.0f} s"
        for p in section["presets"])
    return "\n".join([
        "## Multi-token prediction: self-speculative greedy, batch 1",
        "",
        f"The autoregressive model with {section['heads']} MTP heads (packaged config plus "
        f"`mtp_heads`), trained briefly by the shared trainer on simulated data with its loss "
        f"terms plus `mtp` (weight {settings['mtp_weight']}, target "
        f"`{settings['mtp_target']}`): {train}. Proposals are accepted as often as the heads "
        "agree with the next-item head, which depends on training, so these models are "
        "trained, not random. Each request (another simulated set) is decoded "
        "alone; steps = decoder calls per list (greedy: m); acceptance = share of proposals "
        "kept; identical = share of lists equal to plain greedy's (verified: 1.0 by "
        "construction). Timed calls decode one list each, cycling through the first "
        f"{section['presets'][0]['timed_requests'] if section['presets'] else 0} requests; "
        "`autoregressive` is plain greedy with the KV cache on the same trained model.",
        "",
        markdown_table(rows),
        "",
        render_mtp_targets(section),
        "",
    ])
