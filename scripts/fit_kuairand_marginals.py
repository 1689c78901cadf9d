"""Fit the few KuaiRand-Pure marginals the simulator uses and write them as JSON.

Usage::

    python scripts/fit_kuairand_marginals.py /path/to/kuairand_pure_features \
        [--out src/genrerank/data/simulator/kuairand_marginals.json]

Reads ``video_features_basic_pure.csv`` and ``user_features_pure.csv`` (KuaiRand-Pure, CC BY-SA 4.0)
and writes only summary numbers (shares, quantiles, exponents), never rows, so the simulator runs
without the data. The output is deterministic: same input files, same JSON bytes.

What is fitted (and why the simulator needs it):

- video duration (seconds): log-normal parameters and a quantile table (the world samples by
  inverse CDF from the table), plus the mean / std of log duration per primary tag;
- primary tag (the first tag of a video) = simulated category: shares of the top tags and "other";
- tag pairs that co-occur on one video, both among the top primary tags: the world draws its
  complementary category pairs from these;
- videos per creator: the empirical pmf and the MLE exponent of a zeta (discrete power-law) fit;
- user activity level shares (``user_active_degree``, rare levels merged);
- creator popularity: fan-count quantiles of users who are video authors; follow counts and
  registration age of all users; the share of authors registered recently (cold start).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import optimize, special

QUANTILE_PROBS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98,
                  0.99, 1.0]
TOP_TAGS = 30
TOP_PAIRS = 20
# user_active_degree values merged into the simulator's five activity levels.
ACTIVITY_MERGE = {
    "full_active": "full_active",
    "high_active": "high_active",
    "middle_active": "middle_active",
    "low_active": "low_active",
    "single_low_active": "low_active",
    "2_14_day_new": "new",
    "day_new": "new",
    "30day_retention": "new",
}
ACTIVITY_LEVELS = ["full_active", "high_active", "middle_active", "low_active", "new"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _float(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return math.nan


def _quantiles(values: np.ndarray) -> list[float]:
    return [round(float(q), 4) for q in np.quantile(values, QUANTILE_PROBS)]


def _mean_or(values: list[float], default: float, min_n: int = 5) -> float:
    return float(np.mean(values)) if len(values) >= min_n else default


def _std_or(values: list[float], default: float, min_n: int = 5) -> float:
    return float(np.std(values)) if len(values) >= min_n else default


def _zeta_mle(counts: np.ndarray) -> float:
    """MLE exponent of a zeta distribution P(k) = k^-a / zeta(a), k >= 1."""
    mean_log = float(np.mean(np.log(counts)))

    def nll(a: float) -> float:
        return a * mean_log + math.log(special.zeta(a, 1))

    res = optimize.minimize_scalar(nll, bounds=(1.01, 10.0), method="bounded")
    return float(res.x)


def fit(data_dir: Path) -> dict:
    videos = _read_csv(data_dir / "video_features_basic_pure.csv")
    users = _read_csv(data_dir / "user_features_pure.csv")

    # -- durations (ms in the file)
    dur_ms = np.array([_float(v["video_duration"]) for v in videos])
    ok = np.isfinite(dur_ms) & (dur_ms > 0)
    dur = dur_ms[ok] / 1000.0
    log_dur = np.log(dur)

    # -- primary tags
    tags = [v["tag"].strip() for v in videos]
    primary = [t.split(",")[0] if t else "" for t in tags]
    tagged = [p for p in primary if p]
    counts = Counter(tagged)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], int(kv[0])))[:TOP_TAGS]
    top_names = [t for t, _ in top]
    n_tagged = len(tagged)
    other_share = 1.0 - sum(c for _, c in top) / n_tagged
    per_tag_log_dur: dict[str, list[float]] = {t: [] for t in [*top_names, "other"]}
    for p, d in zip(primary, dur_ms, strict=True):
        if not p or not (np.isfinite(d) and d > 0):
            continue
        per_tag_log_dur[p if p in counts and p in top_names else "other"].append(math.log(d / 1e3))

    # -- co-occurring tag pairs among the top primary tags
    pair_counts: Counter[tuple[str, str]] = Counter()
    top_set = set(top_names)
    for t in tags:
        parts = sorted({p for p in t.split(",") if p in top_set}, key=int)
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                pair_counts[(parts[i], parts[j])] += 1
    pairs = sorted(pair_counts.items(), key=lambda kv: (-kv[1], int(kv[0][0]), int(kv[0][1])))

    # -- videos per creator
    per_creator = np.array(sorted(Counter(v["author_id"] for v in videos).values()))
    pmf = Counter(per_creator.tolist())

    # -- users
    degree = Counter(ACTIVITY_MERGE.get(u["user_active_degree"], "") for u in users)
    known = sum(degree[lv] for lv in ACTIVITY_LEVELS)
    authors = [u for u in users if u["is_video_author"] == "1"]
    fans = np.array([_float(u["fans_user_num"]) for u in authors])
    follow = np.array([_float(u["follow_user_num"]) for u in users])
    reg_days = np.array([_float(u["register_days"]) for u in users])
    author_reg = np.array([_float(u["register_days"]) for u in authors])

    return {
        "source": "KuaiRand-Pure: video_features_basic_pure.csv, user_features_pure.csv",
        "licence": "KuaiRand is CC BY-SA 4.0; this file holds only fitted summary numbers",
        "script": "scripts/fit_kuairand_marginals.py",
        "n_videos": len(videos),
        "n_users": len(users),
        "quantile_probs": QUANTILE_PROBS,
        "duration_s": {
            "missing_share": round(1.0 - float(ok.mean()), 4),
            "log_mean": round(float(log_dur.mean()), 4),
            "log_std": round(float(log_dur.std()), 4),
            "quantiles": _quantiles(dur),
        },
        "primary_tag": {
            "n_distinct": len(counts),
            "untagged_share": round(1.0 - n_tagged / len(videos), 4),
            "tags": top_names,
            "shares": [round(c / n_tagged, 5) for _, c in top],
            "other_share": round(other_share, 5),
            # Tags whose videos are all picture posts (no duration) fall back to the overall fit.
            "log_duration_n": [len(per_tag_log_dur[t]) for t in [*top_names, "other"]],
            "log_duration_mean": [
                round(_mean_or(per_tag_log_dur[t], float(log_dur.mean())), 4)
                for t in [*top_names, "other"]
            ],
            "log_duration_std": [
                round(_std_or(per_tag_log_dur[t], float(log_dur.std())), 4)
                for t in [*top_names, "other"]
            ],
        },
        "tag_pairs": [{"a": a, "b": b, "count": c} for (a, b), c in pairs[:TOP_PAIRS]],
        "videos_per_creator": {
            "n_creators": int(len(per_creator)),
            "mean": round(float(per_creator.mean()), 4),
            "max": int(per_creator.max()),
            "pmf": {str(k): round(c / len(per_creator), 5) for k, c in sorted(pmf.items())},
            "zeta_exponent_mle": round(_zeta_mle(per_creator), 4),
        },
        "user_activity": {
            "levels": ACTIVITY_LEVELS,
            "shares": [round(degree[lv] / known, 5) for lv in ACTIVITY_LEVELS],
            "merged_from": ACTIVITY_MERGE,
        },
        "creator_fans_quantiles": _quantiles(fans),
        "user_follow_quantiles": _quantiles(follow),
        "user_register_days_quantiles": _quantiles(reg_days),
        "author_share_registered_within_days": {
            str(d): round(float((author_reg < d).mean()), 5) for d in (90, 180, 365)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="folder with the KuaiRand-Pure feature CSVs")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1]
        / "src/genrerank/data/simulator/kuairand_marginals.json",
    )
    args = parser.parse_args()
    result = fit(args.data_dir)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
