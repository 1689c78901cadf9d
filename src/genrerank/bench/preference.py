"""``genrerank bench preference``: does training beyond the logs move the generator toward the
upper bound?

For each simulated data set and seed (data, trainer budget and evaluation as the quality
benchmark's, :mod:`genrerank.bench.quality`):

1. train the reference autoregressive generator and the list evaluator (packaged configs);
2. ``nearline``: K lists per train / valid request, scored by the evaluator's engagement
   reward, paired (:mod:`genrerank.preference.nearline`);
3. DPO and PPO fine-tuning from the reference (packaged ``configs/finetune/*.json``), each
   selected on the validation reward (the evaluator's, never the oracle's);
4. on the TEST split, side by side: the reference, DPO, PPO (each served alone, one list, its
   run's decoder) and G-E = the evaluator-reward's best of K = 16 samples of the reference.
   Reported: the oracle's expected gain and headroom captured, paired differences against the
   reference and against G-E (mean and standard error over requests), the evaluator's
   predicted reward (its gap to the oracle shows reward-model over-optimisation), KL to the
   reference, and the diversity and fairness reward terms.

On the first data set and seed, a Pareto sweep: the reward ``engagement + w * diversity`` (and
``+ w * fairness``) for several w, served by MMR (its own diversity weight), by G-E with that
reward, and by DPO tuned on the same near-line lists re-paired under that reward
(:func:`genrerank.data.pairs.reselect_pairs`). Engagement is the oracle's expected gain;
diversity is the category entropy (bits) of the shown lists; fairness the position-weighted
exposure share of cold-start and long-tail creators.

With a teacher (the policies ``teacher``, ``ge_k16_teacher``, ``dpo_teacher``, ``ppo_teacher``)
the structured list model (:mod:`genrerank.models.structured`, packaged config, the same budget)
is trained too and serves as the reward model instead of the list evaluator: ``teacher`` is its
own beam list served alone, ``ge_k16_teacher`` its pick among 16 reference samples,
``dpo_teacher`` DPO on near-line pairs whose proposals include its beam list (``nearline
--teacher``, so the winners can be lists the reference never proposes: distillation through
preferences), ``ppo_teacher`` PPO with its reward. Fine-tuning configs are the same as for the
evaluator rows, so the rows differ by the reward model (and the teacher's proposals) only.
``--policies`` picks the rows (the reference is always there).

The oracle scores test lists only; nothing is selected on test.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from genrerank.bench.quality import _json_safe, mean_std
from genrerank.data.dataset import RerankDataset, collate
from genrerank.data.pairs import PairRule, read_pairs, reselect_pairs, write_pairs
from genrerank.evaluation.offline import predict
from genrerank.evaluation.online import headroom_captured
from genrerank.experiment import run_decoding, train_run
from genrerank.metrics import category_entropy
from genrerank.models.heuristics import mmr
from genrerank.preference.finetune import finetune_run
from genrerank.preference.nearline import run_nearline
from genrerank.preference.report import kl_to_reference
from genrerank.rewards import EvaluatorSignals, ListReward
from genrerank.training import load_model
from genrerank.utils.io import atomic_write_json, atomic_write_text
from genrerank.utils.tables import markdown_table

SIM_DATA_SEED = 7_000  # the quality benchmark's: the same data sets
POLICIES = ("reference", "dpo", "ppo", "ge_k16", "ppo_feedback", "teacher", "ge_k16_teacher",
            "dpo_teacher", "ppo_teacher")
POLICY_LABELS = {"reference": "reference (autoregressive)", "dpo": "DPO (evaluator reward)",
                 "ppo": "PPO (evaluator reward)", "ge_k16": "G-E, K = 16 reference samples",
                 "ppo_feedback": "PPO, simulated feedback (online stand-in)",
                 "teacher": "structured model alone (teacher, beam)",
                 "ge_k16_teacher": "G-E, K = 16 reference samples, structured reward",
                 "dpo_teacher": "DPO (structured reward, its beam lists proposed)",
                 "ppo_teacher": "PPO (structured reward)"}
TEACHER_POLICIES = ("teacher", "ge_k16_teacher", "dpo_teacher", "ppo_teacher")
#: Besides the reference, each tuned policy is compared with the G-E of its own reward model
#: (and the teacher-tuned ones with the teacher: how much of it was distilled).
COMPARISONS = {"dpo": ("ge_k16",), "ppo": ("ge_k16",), "ppo_feedback": ("ge_k16",),
               "dpo_teacher": ("ge_k16_teacher", "teacher"),
               "ppo_teacher": ("ge_k16_teacher", "teacher")}


@dataclass
class PreferenceSettings:
    simulated: dict[str, int] = field(
        default_factory=lambda: {"kuaishou": 20_000, "avito": 20_000})
    epochs: int = 15  # reference and evaluator: the quality benchmark's budget
    patience: int = 3
    dim: int = 32
    batch_size: int = 128
    finetune_overrides: tuple[str, ...] = ()  # extra --set for DPO and PPO
    dpo_overrides: tuple[str, ...] = ()
    ppo_overrides: tuple[str, ...] = ()
    ge_k: int = 16
    #: The pair margin per data set (default: nearline's 0.1). avito's reward is clicks only,
    #: about 0.19 per list, so 0.1 pairs only 8 % of its requests (none at 2,000 requests).
    nearline_delta: dict[str, float] = field(default_factory=lambda: {"avito": 0.02})
    upper_bound_beam_width: int = 16
    pareto: bool = True
    pareto_dataset: str = "kuaishou"
    pareto_seed: int = 0
    pareto_weights: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"diversity": (1.0,), "fairness": (1.0,)})
    pareto_dpo_overrides: tuple[str, ...] = ()  # the same DPO budget as the main run
    mmr_diversity: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
    num_threads: int = 1
    policies: tuple[str, ...] = POLICIES
    out_stem: str = ""  # default preference / preference_quick

    @classmethod
    def quick(cls) -> PreferenceSettings:
        return cls(simulated={"kuaishou": 3_000, "avito": 2_000}, epochs=3, patience=2,
                   finetune_overrides=("train.epochs=1",),
                   ppo_overrides=("train.eval_every=0",),
                   pareto_weights={"diversity": (1.0,), "fairness": (1.0,)},
                   pareto_dpo_overrides=("train.epochs=1",))


def output_paths(out_dir: str | Path, quick: bool, stem: str = "") -> dict[str, Path]:
    stem = stem or ("preference_quick" if quick else "preference")
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md")}
    paths["pareto"] = out_dir / f"{stem}_pareto.png"
    return paths


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se,
            "z": float(d.mean() / se) if se and math.isfinite(se) and se > 0 else float("nan")}


class _Seed:
    """One data set and seed: trains, pairs, fine-tunes and evaluates."""

    def __init__(self, settings: PreferenceSettings, data_dir: Path, work: Path, seed: int,
                 say: Any, preset: str = "") -> None:
        self.s, self.data, self.work, self.seed, self.say = settings, data_dir, work, seed, say
        self.delta = settings.nearline_delta.get(preset, PairRule().delta)
        self.test = RerankDataset(data_dir, split="test")
        from genrerank.data.simulator import Simulator, request_index

        self.sim = Simulator.from_spec(self.test.spec)
        self.state = self.sim.requests(request_index(self.test.request_ids))

    def budget(self, model: str) -> tuple[str, ...]:
        s = self.s
        return (f"train.seed={self.seed}", f"train.epochs={s.epochs}",
                f"train.patience={s.patience}", f"train.batch_size={s.batch_size}",
                f"model.dim={s.dim}", "train.progress=false", f"train.num_threads={s.num_threads}")

    def finetune_overrides(self, method: str) -> tuple[str, ...]:
        extra = self.s.dpo_overrides if method == "dpo" else self.s.ppo_overrides
        return (f"train.seed={self.seed}", "train.progress=false",
                f"train.num_threads={self.s.num_threads}", *self.s.finetune_overrides, *extra)

    def timed(self, what: str, fn: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
        self.say(f"  {what}: {seconds:.0f} s")
        return out, seconds

    # -------------------------------------------------------------- lists and scores

    def oracle(self, lists: np.ndarray) -> np.ndarray:
        return self.sim.expected_gain(self.state, np.maximum(lists, 0), lists >= 0)

    def decoded(self, run: Path) -> np.ndarray:
        model, _ = load_model(run, "best")
        decode = run_decoding(run)
        name = decode.pop("name")
        return predict(model, self.test, name, decode).lists

    @torch.no_grad()
    def ge_lists(self, reference: torch.nn.Module, rewards: Sequence[ListReward],
                 source: EvaluatorSignals) -> list[np.ndarray]:
        """G-E with each reward: the best of ``ge_k`` distinct reference samples."""
        out: list[list[np.ndarray]] = [[] for _ in rewards]
        loader = DataLoader(self.test, batch_size=256, shuffle=False, collate_fn=collate)
        for i, batch in enumerate(loader):
            found = reference.generate(batch, batch.position_mask.sum(1), "sample",
                                       k=self.s.ge_k, seed=self.seed * 1_000 + i)
            lists = found.lists.masked_fill(~found.valid.unsqueeze(-1), -1)
            for j, reward in enumerate(rewards):
                total = reward(batch, lists, source).total
                pick = total.argmax(1)
                out[j].append(lists[torch.arange(batch.batch_size), pick].numpy())
        width = self.test.spec.max_list_length
        return [np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])),
                                       constant_values=-1) for x in parts]) for parts in out]

    @torch.no_grad()
    def reward_and_kl(self, lists: np.ndarray, report: ListReward, source: EvaluatorSignals,
                      policy: torch.nn.Module | None, reference: torch.nn.Module
                      ) -> dict[str, float]:
        totals: dict[str, list[np.ndarray]] = {}
        kls = []
        start = 0
        loader = DataLoader(self.test, batch_size=256, shuffle=False, collate_fn=collate)
        for i, batch in enumerate(loader):
            b, m = batch.batch_size, batch.position_mask.shape[1]
            chunk = torch.as_tensor(lists[start:start + b, :m]).long()
            start += b
            scored = report(batch, chunk.unsqueeze(1), source)
            for name, value in scored.terms.items():
                totals.setdefault(name, []).append(value[:, 0].numpy())
            if policy is not None:
                kls.append(kl_to_reference(policy, reference, batch, seed=i).numpy())
        out = {f"evaluator_{k}": float(np.concatenate(v).mean()) for k, v in totals.items()}
        out["kl_to_reference"] = float(np.concatenate(kls).mean()) if kls else None
        return out

    def online(self, lists: np.ndarray, logging: float, upper: float) -> dict[str, Any]:
        gains = self.oracle(lists)
        mask = lists >= 0
        cats = np.take_along_axis(self.state.category, np.maximum(lists, 0), axis=1)
        return {
            "gains": gains,
            "expected_gain": float(gains.mean()),
            "headroom_captured": headroom_captured(float(gains.mean()), logging, upper),
            "category_entropy": float(category_entropy(cats, mask)),
        }

    # -------------------------------------------------------------- the steps

    def run(self, pareto: bool) -> dict[str, Any]:
        s, work, data = self.s, self.work, self.data
        want = set(s.policies) | {"reference"}
        # The sweep re-pairs the evaluator's near-line file and plots these rows beside it.
        pareto = pareto and {"dpo", "ppo", "ge_k16"} <= want
        timings: dict[str, float] = {}
        ref_run, ev_run, teacher_run = work / "reference", work / "evaluator", work / "teacher"
        _, timings["train_reference"] = self.timed("reference", lambda: train_run(
            "autoregressive", data, ref_run, overrides=self.budget("autoregressive"),
            overwrite=True))
        # The evaluator is always trained: its predicted reward is a column of every row.
        _, timings["train_evaluator"] = self.timed("evaluator", lambda: train_run(
            "evaluator", data, ev_run, overrides=self.budget("evaluator"), overwrite=True))
        with_teacher = bool(want & set(TEACHER_POLICIES))
        if with_teacher:
            _, timings["train_teacher"] = self.timed("teacher (structured)", lambda: train_run(
                "structured", data, teacher_run, overrides=self.budget("structured"),
                overwrite=True))
        nearline: dict[str, Any] = {}
        checks: dict[str, Any] = {}
        pairs = work / "pairs.parquet"
        teacher_pairs = work / "pairs_teacher.parquet"
        if "dpo" in want:
            nearline["evaluator"], timings["nearline"] = self.timed(
                "nearline", lambda: run_nearline(
                    ref_run, ev_run, data, pairs, seed=self.seed, overwrite=True,
                    show_progress=False, rule=PairRule(delta=self.delta)))
            checks["evaluator"] = self.pairs_check(pairs)
        if "dpo_teacher" in want:
            nearline["teacher"], timings["nearline_teacher"] = self.timed(
                "nearline (structured reward, its beam lists proposed)", lambda: run_nearline(
                    ref_run, teacher_run, data, teacher_pairs, seed=self.seed, overwrite=True,
                    show_progress=False, rule=PairRule(delta=self.delta),
                    teachers=(teacher_run,)))
            checks["teacher"] = self.pairs_check(teacher_pairs)
        runs = {"reference": ref_run}
        if with_teacher:
            runs["teacher"] = teacher_run
        jobs = {  # policy: (method, pairs, reward model, reward source)
            "dpo": ("dpo", pairs, ev_run, "evaluator"),
            "ppo": ("ppo", None, ev_run, "evaluator"),
            "ppo_feedback": ("ppo", None, None, "simulated_feedback"),
            "dpo_teacher": ("dpo", teacher_pairs, teacher_run, "evaluator"),
            "ppo_teacher": ("ppo", None, teacher_run, "evaluator"),
        }
        for name, (method, pair_file, reward_run, reward_source) in jobs.items():
            if name not in want:
                continue
            runs[name] = work / name
            _, timings[name] = self.timed(POLICY_LABELS[name], lambda n=name, m=method,
                                          p=pair_file, r=reward_run, src=reward_source:
                                          finetune_run(ref_run, data, runs[n], m, pairs=p,
                                                       evaluator=r, reward_source=src,
                                                       overrides=self.finetune_overrides(m),
                                                       overwrite=True))

        reference = load_model(ref_run, "best")[0]
        evaluator = load_model(ev_run, "best")[0]
        source = EvaluatorSignals(evaluator)
        teacher_source = EvaluatorSignals(load_model(teacher_run, "best")[0]) \
            if with_teacher else None
        spec = self.test.spec
        engagement = ListReward({"engagement": 1.0}, spec=spec)
        report = ListReward({"engagement": 1.0, "diversity": 1.0, "fairness": 1.0}, spec=spec)
        logged = self.test.logged_lists()
        logging_gain = float(self.oracle(logged).mean())
        _, upper = self.sim.upper_bound(self.state, beam_width=s.upper_bound_beam_width)
        upper_gain = float(upper.mean())

        lists = {name: self.decoded(run) for name, run in runs.items()}
        if "ge_k16" in want:
            lists["ge_k16"] = self.ge_lists(reference, [engagement], source)[0]
        if "ge_k16_teacher" in want:
            lists["ge_k16_teacher"] = self.ge_lists(reference, [engagement], teacher_source)[0]
        policies: dict[str, Any] = {}
        gains: dict[str, np.ndarray] = {}
        for name in [p for p in POLICIES if p in lists]:
            x = lists[name]
            online = self.online(x, logging_gain, upper_gain)
            gains[name] = online.pop("gains")
            tuned = name in jobs
            policy = load_model(runs[name])[0] if tuned else None
            policies[name] = {**online, **self.reward_and_kl(
                x, report, source, policy, reference)}
            if teacher_source is not None:
                policies[name]["teacher_engagement"] = self._term(x, engagement, teacher_source)
            if name == "reference":
                policies[name]["kl_to_reference"] = 0.0
        for name in policies:
            if name != "reference":
                policies[name]["vs_reference"] = _paired(gains[name], gains["reference"])
            for other in COMPARISONS.get(name, ()):
                if other in gains:
                    policies[name][f"vs_{other}"] = _paired(gains[name], gains[other])
        record: dict[str, Any] = {
            "seed": self.seed,
            "test_requests": len(self.test),
            "logging_expected_gain": logging_gain,
            "upper_bound_expected_gain": upper_gain,
            "policies": policies,
            "valid": {m: _best_valid(runs[m]) for m in jobs if m in runs},
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        if "evaluator" in nearline:  # the keys the committed records have
            record["nearline"] = nearline["evaluator"]
            record["nearline_oracle_check"] = checks["evaluator"]
        if "teacher" in nearline:
            record["nearline_teacher"] = nearline["teacher"]
            record["nearline_teacher_oracle_check"] = checks["teacher"]
        if pareto:
            record["pareto"] = self.pareto(reference, source, pairs, ref_run, ev_run,
                                           logging_gain, upper_gain, policies)
        return record

    def pairs_check(self, pairs: Path) -> dict[str, float]:
        """How right the evaluator's preferences are, under the oracle (evaluation only, on the
        VALIDATION requests' near-line lists): share of pairs the oracle agrees with, and the
        oracle gain of the evaluator's best list, of the best list, and of the reference's own
        (its run's decoder) on the same requests."""
        from genrerank.data.simulator import request_index

        valid = RerankDataset(self.data, split="valid")
        state = self.sim.requests(request_index(valid.request_ids))
        position = {str(r): i for i, r in enumerate(valid.request_ids)}
        rows = [r for r in read_pairs(pairs)[0].to_pylist() if r["split"] == "valid"]
        agree, picked, best, index = [], [], [], []
        for r in rows:
            i = position[r["request_id"]]
            width = max(len(x) for x in r["lists"])
            lists = np.array([x + [-1] * (width - len(x)) for x in r["lists"]])
            gains = self.sim.expected_gain(state.take(np.full(len(lists), i)),
                                           np.maximum(lists, 0), lists >= 0)
            agree += [bool(gains[w] > gains[lo]) for w, lo in r["pairs"]]
            picked.append(gains[int(np.argmax(r["reward"]))])
            best.append(gains.max())
            index.append(i)
        model, _ = load_model(self.work / "reference", "best")
        decode = run_decoding(self.work / "reference")
        ref = predict(model, valid, decode.pop("name"), decode).lists[index]
        own = self.sim.expected_gain(state.take(np.array(index)), np.maximum(ref, 0), ref >= 0)
        return {"requests": len(rows), "pairs_oracle_agreement": float(np.mean(agree)),
                "evaluator_pick_gain": float(np.mean(picked)),
                "oracle_pick_gain": float(np.mean(best)),
                "reference_gain": float(own.mean())}

    def pareto(self, reference: torch.nn.Module, source: EvaluatorSignals, pairs: Path,
               ref_run: Path, ev_run: Path, logging: float, upper: float,
               policies: Mapping[str, Any]) -> dict[str, Any]:
        s, spec = self.s, self.test.spec
        n_max = max(len(self.test._per_candidate["category"][i]) for i in range(len(self.test)))
        out: dict[str, Any] = {"mmr": [], "ge": [], "dpo": [], "reference": {}, "ppo": {}}
        for name in ("reference", "ppo"):
            out[name] = {k: policies[name][k] for k in ("expected_gain", "category_entropy",
                                                        "evaluator_fairness")}
        # MMR over upstream scores at several diversity weights.
        scores = np.full((len(self.test), n_max), -np.inf)
        category = np.zeros((len(self.test), n_max), np.int64)
        mask = np.zeros((len(self.test), n_max), bool)
        for i in range(len(self.test)):
            n = len(self.test._per_candidate["upstream_score"][i])
            scores[i, :n] = self.test._per_candidate["upstream_score"][i]
            category[i, :n] = self.test._per_candidate["category"][i]
            mask[i, :n] = True
        lengths = np.array([len(self.test._exposed[i]) for i in range(len(self.test))])
        width = spec.max_list_length
        fairness = ListReward({"fairness": 1.0}, spec=spec)
        for lam in s.mmr_diversity:
            x = mmr(np.where(mask, scores, 0.0), category, mask, width, lam)
            x = np.where(np.arange(width)[None, :] < lengths[:, None], x, -1)
            row = self.online(x, logging, upper)
            row.pop("gains")
            row["evaluator_fairness"] = self._term(x, fairness, source)
            out["mmr"].append({"mmr_diversity": lam, **row})
        table, meta = read_pairs(pairs)
        for key, name in (("ge", "ge_k16"), ("dpo", "dpo")):  # weight 0: the main runs
            for term in s.pareto_weights:
                out[key].append({"term": term, "weight": 0.0, **{
                    k: policies[name][k] for k in ("expected_gain", "headroom_captured",
                                                   "category_entropy", "evaluator_fairness")}})
        for term, weights in s.pareto_weights.items():
            rewards = [ListReward({"engagement": 1.0, term: w}, spec=spec) for w in weights]
            for w, x in zip(weights, self.ge_lists(reference, rewards, source), strict=True):
                row = self.online(x, logging, upper)
                row.pop("gains")
                row["evaluator_fairness"] = self._term(x, fairness, source)
                out["ge"].append({"term": term, "weight": w, **row})
            for w in weights:
                weights_map = {"engagement": 1.0, term: w}
                repaired = reselect_pairs(table, weights_map, PairRule(**meta["rule"]))
                path = self.work / f"pairs_{term}_{w:g}.parquet"
                write_pairs(repaired, {k: v for k, v in meta.items() if k != "format"}
                            | {"reward": ListReward(weights_map, spec=spec).to_config()},
                            path, overwrite=True)
                run = self.work / f"dpo_{term}_{w:g}"
                # The re-paired file carries its reward: validation selects on it too.
                overrides = (*self.finetune_overrides("dpo"), *s.pareto_dpo_overrides)
                self.timed(f"pareto dpo {term} {w:g}", lambda p=path, r=run, o=overrides:
                           finetune_run(ref_run, self.data, r, "dpo", pairs=p, evaluator=ev_run,
                                        overrides=o, overwrite=True))
                x = self.decoded(run)
                row = self.online(x, logging, upper)
                row.pop("gains")
                row["evaluator_fairness"] = self._term(x, fairness, source)
                out["dpo"].append({"term": term, "weight": w, **row})
        return out

    @torch.no_grad()
    def _term(self, lists: np.ndarray, reward: ListReward, source: EvaluatorSignals) -> float:
        values, start = [], 0
        for batch in DataLoader(self.test, batch_size=512, shuffle=False, collate_fn=collate):
            b, m = batch.batch_size, batch.position_mask.shape[1]
            chunk = torch.as_tensor(lists[start:start + b, :m]).long().unsqueeze(1)
            start += b
            values.append(reward(batch, chunk, source).total[:, 0].numpy())
        return float(np.concatenate(values).mean())


def _best_valid(run: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    best = [r for r in lines if r.get("is_best")][-1]
    return {k.removeprefix("valid/"): v for k, v in best.items()
            if k in ("epoch", "step", "valid/reward", "valid/kl_ref")}


# ---------------------------------------------------------------------------- summary


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of each policy's numbers, and of the paired differences (the
    policies every record has)."""
    out: dict[str, Any] = {}
    for name in [p for p in POLICIES if all(p in r["policies"] for r in records)]:
        rows = [r["policies"][name] for r in records]
        metrics: dict[str, Any] = {}
        for key in ("expected_gain", "headroom_captured", "evaluator_engagement",
                    "teacher_engagement", "evaluator_diversity", "evaluator_fairness",
                    "category_entropy", "kl_to_reference"):
            vals = [r.get(key) for r in rows if r.get(key) is not None]
            metrics[key] = mean_std(vals)
        for pair in [k for k in rows[0] if k.startswith("vs_")]:
            if all(pair in r for r in rows):
                metrics[pair] = {
                    "diff": mean_std([r[pair]["diff"] for r in rows]),
                    "z": [r[pair]["z"] for r in rows],
                    "above_2se": [bool(r[pair]["diff"] > 2 * r[pair]["se"]) for r in rows],
                }
        out[name] = metrics
    return out


def _fmt(stat: Mapping[str, Any], digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def markdown(result: Mapping[str, Any]) -> str:
    lines = ["# Preference and RL fine-tuning benchmark", "",
             f"Generated {result['finished']} by `{result['command']}` "
             f"({result['wall_seconds'] / 60:.0f} min). Mean ± std over seeds; test split, "
             "oracle = the simulator's exact expected gain; evaluator / structured reward = the "
             "learned reward model's predicted engagement (the list evaluator's, or the "
             "structured list model's where it was trained), the reward the tuned policies "
             "optimised.", ""]
    settings = result.get("settings", {})
    changed = [f"{m.upper()} `{' '.join(settings[f'{m}_overrides'])}`" for m in ("dpo", "ppo")
               if settings.get(f"{m}_overrides")]
    if changed:
        lines += ["Fine-tuning configs: the packaged ones, with " + " and ".join(changed)
                  + " (chosen on the validation split).", ""]
    for preset, entry in result["datasets"].items():
        summary = entry["summary"]
        lines += [f"## {preset} ({entry['requests']} requests, seeds {entry['seeds']})", ""]
        with_teacher = "teacher" in summary
        rows = []
        for name in [p for p in POLICIES if p in summary]:
            m = summary[name]
            ge = m.get("vs_ge_k16") or m.get("vs_ge_k16_teacher")
            row = {
                "policy": POLICY_LABELS[name],
                "oracle gain": _fmt(m["expected_gain"]),
                "headroom": _fmt(m["headroom_captured"]),
                "evaluator reward": _fmt(m["evaluator_engagement"]),
            }
            if with_teacher:
                row["structured reward"] = _fmt(m["teacher_engagement"])
            row |= {
                "KL to ref": _fmt(m["kl_to_reference"], 2),
                "diversity": _fmt(m["evaluator_diversity"]),
                "fairness": _fmt(m["evaluator_fairness"]),
                "vs reference": _diff(m.get("vs_reference")),
                "vs G-E (same reward)": _diff(ge),
            }
            if with_teacher:
                row["vs teacher"] = _diff(m.get("vs_teacher"))
            rows.append(row)
        lines += [markdown_table(rows), "",
                  "`vs ...`: paired difference in oracle gain per request, mean over seeds, and "
                  "for each seed whether it exceeds two paired standard errors. `vs G-E (same "
                  "reward)`: against the G-E row of the reward model the policy was tuned on.",
                  ""]
        for key, what in (("", "the list evaluator's"), ("_teacher", "the structured model's")):
            records = [r for r in entry["records"] if f"nearline{key}" in r]
            if not records:
                continue
            nearline = [r[f"nearline{key}"] for r in records]
            lines += [f"Near-line with {what} reward: "
                      f"{np.mean([n['lists_per_request'] for n in nearline]):.1f} distinct lists "
                      f"per request, {np.mean([n['pairs'] for n in nearline]):.0f} pairs, "
                      f"{np.mean([n['requests_with_pairs'] for n in nearline]):.0%} of requests "
                      f"paired, mean reward gap "
                      f"{np.mean([n['mean_reward_gap'] for n in nearline]):.3f}."]
            shares = [n.get("winner_share") for n in nearline if n.get("winner_share")]
            if shares:
                labels = sorted({g for sh in shares for g in sh})
                top = sorted(((float(np.mean([sh.get(g, 0.0) for sh in shares])), g)
                              for g in labels), reverse=True)[:3]
                lines[-1] += " Winners by proposer: " + ", ".join(
                    f"{g} {v:.0%}" for v, g in top) + "."
            checks = [r[f"nearline{key}_oracle_check"] for r in records]
            mean = {k: float(np.mean([c[k] for c in checks])) for k in checks[0]}
            lines += ["", f"How right is {what} reward? On the validation requests' near-line "
                      f"lists (oracle, evaluation only): the oracle agrees with "
                      f"{mean['pairs_oracle_agreement']:.1%} of the pairs; oracle gain of the "
                      f"reward model's best list {mean['evaluator_pick_gain']:.4f}, of the "
                      f"reference's own list {mean['reference_gain']:.4f}, of the best of the "
                      f"same lists {mean['oracle_pick_gain']:.4f}.", ""]
    return "\n".join(lines) + "\n"


def _diff(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return ""
    marks = "".join("+" if a else "-" for a in entry["above_2se"])
    return f"{_fmt(entry['diff'])} [{marks}]"


def plot_pareto(result: Mapping[str, Any], path: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = [(p, e["records"][0]["pareto"]) for p, e in result["datasets"].items()
             if e["records"] and "pareto" in e["records"][0]]
    if not found:
        return None
    preset, pareto = found[0]
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for ax, (ykey, ylabel, term) in zip(fig.subplots(1, 2), (
            ("category_entropy", "category entropy of the list (bits)", "diversity"),
            ("evaluator_fairness", "fairness (exposure of cold-start / long-tail)",
             "fairness")), strict=True):
        mm = pareto["mmr"]
        ax.plot([r["expected_gain"] for r in mm], [r[ykey] for r in mm], "o-", color="#55a868",
                label="MMR (diversity weight sweep)")
        for key, color, label in (("ge", "#4c72b0", "G-E K=16, reward weight sweep"),
                                  ("dpo", "#c44e52", "DPO on re-paired lists, weight sweep")):
            rows = [r for r in pareto[key] if r["term"] == term]
            ax.plot([r["expected_gain"] for r in rows], [r[ykey] for r in rows], "s-",
                    color=color, label=label)
            for r in rows:
                ax.annotate(f"w={r['weight']:g}", (r["expected_gain"], r[ykey]), fontsize=7)
        for key, marker in (("reference", "*"), ("ppo", "^")):
            r = pareto[key]
            ax.plot([r["expected_gain"]], [r[ykey]], marker, markersize=11, color="#937860",
                    label=f"{key} (engagement reward)")
        ax.set_xlabel("oracle expected gain (engagement)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Pareto: engagement vs diversity and fairness ({preset}, test split)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------- entry point


def run_preference_benchmark(quick: bool, out_dir: Path = Path("benchmarks/results"),
                             seeds: tuple[int, ...] = (0, 1, 2),
                             datasets: Sequence[str] | None = None, merge: bool = False,
                             settings: PreferenceSettings | None = None,
                             command: str = "genrerank bench preference") -> dict[str, Any]:
    """Run the benchmark (see the module docstring); with ``merge`` the records of other
    invocations already in the result file are kept (runs can go side by side, one per seed)."""
    from genrerank.data.simulator import simulate_to_dir

    settings = settings or (PreferenceSettings.quick() if quick else PreferenceSettings())
    unknown_policies = [p for p in settings.policies if p not in POLICIES]
    if unknown_policies:
        raise ValueError(f"unknown policies {unknown_policies}; known: {list(POLICIES)}")
    presets = list(datasets or settings.simulated)
    unknown = [p for p in presets if p not in settings.simulated]
    if unknown:
        raise ValueError(f"unknown data set(s) {unknown}; known: {sorted(settings.simulated)}")
    paths = output_paths(out_dir, quick, settings.out_stem)
    torch.set_num_threads(settings.num_threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="genrerank-preference-"))
    records: dict[str, list[dict[str, Any]]] = {p: [] for p in presets}
    try:
        for preset in presets:
            for seed in seeds:
                print(f"{preset} seed {seed}", flush=True)
                data = work / "data" / preset / f"seed{seed}"
                simulate_to_dir(preset, settings.simulated[preset], SIM_DATA_SEED + seed, data,
                                progress=False)
                pareto = settings.pareto and (preset, seed) == (settings.pareto_dataset,
                                                                 settings.pareto_seed)
                runner = _Seed(settings, data, work / "runs" / preset / f"seed{seed}", seed,
                               lambda msg: print(msg, flush=True), preset)
                records[preset].append(runner.run(pareto))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _write(paths, records, settings, quick, merge, time.perf_counter() - started,
                  command)


def _write(paths: Mapping[str, Path], records: Mapping[str, list[dict[str, Any]]],
           settings: PreferenceSettings, quick: bool, merge: bool, wall: float,
           command: str) -> dict[str, Any]:
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    lock = paths["json"].with_suffix(".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # side-by-side invocations merge one at a time
        merged: dict[str, list[dict[str, Any]]] = {}
        old_wall = 0.0
        if merge and paths["json"].exists():
            old = json.loads(paths["json"].read_text())
            old_wall = float(old.get("wall_seconds", 0.0))
            for preset, entry in old.get("datasets", {}).items():
                merged[preset] = list(entry["records"])
        for preset, recs in records.items():
            seeds = {r["seed"] for r in recs}
            merged[preset] = sorted([r for r in merged.get(preset, []) if r["seed"] not in seeds]
                                    + recs, key=lambda r: r["seed"])
        result: dict[str, Any] = {
            "benchmark": "preference",
            "quick": quick,
            "command": command,
            "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": round(old_wall + wall, 1),
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads_per_run": settings.num_threads},
            "settings": asdict(settings),
            "datasets": {p: {"requests": settings.simulated.get(p),
                             "seeds": [r["seed"] for r in recs],
                             "summary": summarize(recs), "records": recs}
                         for p, recs in merged.items() if recs},
        }
        atomic_write_json(paths["json"], _json_safe(result))
        atomic_write_text(paths["md"], markdown(result))
        plot_pareto(result, paths["pareto"])
    lock.unlink(missing_ok=True)
    return result
