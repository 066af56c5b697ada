"""Combine `tools/world/eval_world.py --json` files into per-seed and pooled results with their uncertainty.

    python tools/world/summarize_eval.py runs/test/*.json --json results/world/world_eval_seeds.json

Files of the same seed and method (cases split over processes with --first_case) are merged.
For each method: all-attributes success per seed, the mean over seeds, the spread between seeds
(min..max and standard deviation), and a 95% bootstrap interval over the pooled cases (cases
resampled within each seed, so every seed keeps its weight). For each pair of methods that edited
the same cases: the paired difference of all-attributes success with its 95% bootstrap interval
(the same cases resampled for both methods), which is what tells two methods apart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

PAIRED_PSNR = {
    "psnr_outside": "PSNR outside the edited boxes",
    "psnr_outside_objects": "PSNR outside the edited objects",
}
KEYS = ("all_attributes", "per_attribute_ok", "bg_psnr_in_boxes", "psnr_outside", "preserved", "seconds")


def load(paths: list[Path]) -> dict[str, dict[int, dict[int, dict]]]:
    """method -> seed -> case index -> per-case record."""
    out: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        if path.suffix == ".jsonl":  # eval_world --progress: one case a line, kept even if the run stopped
            for line in path.read_text().splitlines():
                r = json.loads(line)
                out[r["method"]][int(r["seed"])][int(r["case"])] = r
            continue
        data = json.loads(path.read_text())
        if "per_case" not in data:
            raise SystemExit(f"{path}: no per_case records (written by an older eval_world); re-run it")
        for method, records in data["per_case"].items():
            for r in records:
                out[method][int(data["seed"])][int(r["case"])] = r
    return out


def bootstrap_mean(per_seed: list[np.ndarray], rng: np.random.Generator, n: int = 4000) -> tuple[float, float]:
    """95% interval of the mean over seeds of per-seed means, resampling cases within each seed."""
    stats = np.empty(n)
    for b in range(n):
        stats[b] = np.mean([v[rng.integers(0, len(v), len(v))].mean() for v in per_seed])
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def paired_ci(diff: np.ndarray, rng: np.random.Generator, n: int) -> list[float]:
    """95% interval of the mean of paired differences, resampling the shared cases."""
    boots = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)])
    return [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]


def _finite_mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _shape_by_change(records: list[dict]) -> dict[str, list[int]]:
    """Shape changes grouped as 'before -> after': [right, asked]. The scorer's `got` reads
    'iou X with AFTER, Y with BEFORE'."""
    out: dict[str, list[int]] = {}
    for r in records:
        for a in r["attributes"]:
            if a["kind"] != "shape":
                continue
            before = str(a["got"]).rsplit(" ", 1)[-1]
            slot = out.setdefault(f"{before} -> {a['requested']}", [0, 0])
            slot[0] += int(bool(a["ok"]))
            slot[1] += 1
    return dict(sorted(out.items()))


def summarize(data, n_boot: int = 4000) -> dict:
    rng = np.random.default_rng(0)
    result: dict = {"methods": {}, "paired": {}}
    for method, seeds in sorted(data.items()):
        per_seed = {
            s: np.array([r["all_attributes"] for _, r in sorted(cases.items())]) for s, cases in sorted(seeds.items())
        }
        means = {s: float(v.mean()) for s, v in per_seed.items()}
        lo, hi = bootstrap_mean(list(per_seed.values()), rng, n_boot)
        recs = [r for cases in seeds.values() for r in cases.values()]
        colour = [a["ok"] for r in recs for a in r["attributes"] if a["kind"] == "colour"]
        shape = [a["ok"] for r in recs for a in r["attributes"] if a["kind"] == "shape"]
        result["methods"][method] = {
            "cases_per_seed": {str(s): len(v) for s, v in per_seed.items()},
            "all_attributes_per_seed": {str(s): m for s, m in means.items()},
            "all_attributes_mean": float(np.mean(list(means.values()))),
            "all_attributes_seed_sd": float(np.std(list(means.values()), ddof=1)) if len(means) > 1 else float("nan"),
            "all_attributes_min_seed": float(min(means.values())),
            "all_attributes_ci95": [lo, hi],
            "per_attribute": _finite_mean([a["ok"] for r in recs for a in r["attributes"]]),
            "colour": _finite_mean(colour),
            "shape": _finite_mean(shape),
            "bg_psnr_in_boxes": _finite_mean([r["bg_psnr_in_boxes"] for r in recs]),
            "psnr_outside": _finite_mean([r["psnr_outside"] for r in recs]),
            "psnr_outside_objects": _finite_mean([r.get("psnr_outside_objects") for r in recs]),
            "preserved": _finite_mean([r["preserved"] for r in recs]),
            # every requested attribute right and every untouched object kept: the edit a user wanted
            "complete": _finite_mean([float(r["all_attributes"] == 1 and r["preserved"] == 1) for r in recs]),
            "seconds_per_edit": _finite_mean([r.get("seconds") for r in recs]),
            "shape_by_change": _shape_by_change(recs),
        }
    for a, b in combinations(sorted(data), 2):
        shared = [(s, c) for s in data[a] for c in data[a][s] if c in data[b].get(s, {})]
        if not shared:
            continue
        diff = np.array([data[a][s][c]["all_attributes"] - data[b][s][c]["all_attributes"] for s, c in shared])
        result["paired"][f"{a} - {b}"] = {
            "cases": len(diff),
            "difference": float(diff.mean()),
            "ci95": paired_ci(diff, rng, n_boot),
            "only_first_right": int((diff > 0).sum()),
            "only_second_right": int((diff < 0).sum()),
        }
        # PSNR outside the edited boxes and outside the edited objects, paired (cases where both are
        # finite; records written before the second existed have none): what masks are for
        for key in PAIRED_PSNR:
            psnr = np.array([data[a][s][c].get(key, math.nan) - data[b][s][c].get(key, math.nan) for s, c in shared])
            psnr = psnr[np.isfinite(psnr)]
            if len(psnr):
                result["paired"][f"{a} - {b}"][key] = {
                    "cases": len(psnr),
                    "difference_db": float(psnr.mean()),
                    "median_db": float(np.median(psnr)),
                    "ci95": paired_ci(psnr, rng, n_boot),
                }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    summary = summarize(load(args.files))
    print(
        "| method | cases | all attributes per seed | mean | seed sd | 95% interval | colour | shape "
        "| bg PSNR in boxes | PSNR outside | preserved | complete | s / edit |"
    )
    print("|---" * 13 + "|")
    for m, r in summary["methods"].items():
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in r["all_attributes_per_seed"].items())
        print(
            f"| {m} | {sum(r['cases_per_seed'].values())} | {seeds} | {r['all_attributes_mean']:.3f} "
            f"| {r['all_attributes_seed_sd']:.3f} | {r['all_attributes_ci95'][0]:.2f}-{r['all_attributes_ci95'][1]:.2f} "
            f"| {r['colour']:.3f} | {r['shape']:.3f} | {r['bg_psnr_in_boxes']:.1f} | {r['psnr_outside']:.1f} "
            f"| {r['preserved']:.3f} | {r['complete']:.3f} | {r['seconds_per_edit']:.1f} |"
        )
    for m, r in summary["methods"].items():
        print(
            f"{m} shape changes (right/asked): "
            + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in r["shape_by_change"].items())
        )
    for pair, r in summary["paired"].items():
        print(
            f"paired {pair}: {r['difference']:+.3f} over {r['cases']} cases "
            f"(95% {r['ci95'][0]:+.3f}..{r['ci95'][1]:+.3f}; only first right {r['only_first_right']}, "
            f"only second right {r['only_second_right']})"
        )
        for key, label in PAIRED_PSNR.items():
            if key in r:
                q = r[key]
                print(
                    f"  {label}: {q['difference_db']:+.2f} dB (95% {q['ci95'][0]:+.2f}..{q['ci95'][1]:+.2f}; "
                    f"median {q['median_db']:+.2f}) over {q['cases']} cases"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
