"""Combine `tools/world/check_accuracy.py --jsonl` files of several seeds: per seed and over seeds.

    python tools/world/summarize_checks.py results/world/check_refine_seed120_user_cases.jsonl ...

One seed a file (the seed is the record's own, or the file name's `seedN` for records written before
it was). Each arm's all-attributes gets its mean over seeds, its worst seed and summarize_eval's 95%
bootstrap interval (cases resampled within seeds); each arm against one pass of the same budget gets
the paired difference; the checker gets its counts of caught failures and flagged successes. Only
numpy and the sibling summarize_eval are imported, so tools/results/tables.py can render the tables
without loading a model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import summarize_eval  # noqa: E402  (a sibling tool, not a package)


def tally(rows: list[tuple[bool, str]]) -> dict:
    """rows of (attribute right, its subtask's verdict) -> caught share of wrong, flagged share of right."""
    wrong = [v for ok, v in rows if not ok]
    right = [v for ok, v in rows if ok]
    return {
        "failed_attributes": len(wrong),
        "failed_caught": sum(v != "done" for v in wrong),
        "caught": float(np.mean([v != "done" for v in wrong])) if wrong else None,
        "caught_as_not_done": float(np.mean([v == "not done" for v in wrong])) if wrong else None,
        "right_attributes": len(right),
        "right_flagged": sum(v != "done" for v in right),
        "flagged": float(np.mean([v != "done" for v in right])) if right else None,
        "flagged_as_not_done": float(np.mean([v == "not done" for v in right])) if right else None,
    }


def load_records(paths: list[Path]) -> dict[int, list[dict]]:
    """seed -> the --jsonl records of its cases, in case order (a case written twice counts once)."""
    out: dict[int, dict[int, dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            seed = r.get("seed")
            if seed is None:  # records written before the seed was
                found = re.search(r"seed(\d+)", path.name)
                if found is None:
                    raise SystemExit(f"{path}: its records name no seed and the file name has no seedN")
                seed = int(found.group(1))
            out.setdefault(int(seed), {})[int(r["case"])] = r
    return {s: [cases[c] for c in sorted(cases)] for s, cases in sorted(out.items())}


# the arms of a --compare run: (name, which edit of the record, which of its all-attributes)
ARMS = (
    ("first_pass", "checked", "first_pass_all_attributes"),
    ("checked", "checked", "all_attributes"),
    ("one_pass", "one_pass", "all_attributes"),
)


def summarize_seeds(per_seed: dict[int, list[dict]], n_boot: int = 4000) -> dict:
    """Per seed and over seeds: each arm's all-attributes (mean of seed means, 95% bootstrap interval
    with cases resampled within seeds), untouched objects kept, steps and seconds; each arm against one
    pass of the same budget, paired; the checker's first-pass counts."""
    rng = np.random.default_rng(0)
    arms = [a for a in ARMS if all(r[a[1]] is not None for rs in per_seed.values() for r in rs)]
    out: dict = {"cases_per_seed": {str(s): len(rs) for s, rs in per_seed.items()}, "arms": {}, "paired": {}}
    for name, edit_key, key in arms:
        values = {s: np.array([r[edit_key][key] for r in rs], dtype=float) for s, rs in per_seed.items()}
        means = {str(s): float(v.mean()) for s, v in values.items()}
        recs = [r[edit_key] for rs in per_seed.values() for r in rs]
        out["arms"][name] = {
            "all_attributes_per_seed": means,
            "all_attributes_mean": float(np.mean(list(means.values()))),
            "all_attributes_min_seed": min(means.values()),
            "all_attributes_ci95": list(summarize_eval.bootstrap_mean(list(values.values()), rng, n_boot)),
            # the first pass is a stage of the checked edit: its kept objects, steps and seconds are not its own
            **(
                {}
                if name == "first_pass"
                else {
                    "preserved": float(np.mean([r["preserved"] for r in recs])),
                    "steps": float(np.mean([r["steps"] for r in recs])),
                    "seconds": float(np.mean([r["seconds"] for r in recs])),
                }
            ),
        }
    if "one_pass" in out["arms"]:
        for name, edit_key, key in arms[:2]:
            diff = np.array(
                [r[edit_key][key] - r["one_pass"]["all_attributes"] for rs in per_seed.values() for r in rs]
            )
            out["paired"][f"{name} - one_pass"] = {
                "cases": len(diff),
                "difference": float(diff.mean()),
                "ci95": summarize_eval.paired_ci(diff, rng, n_boot),
            }
        out["seconds_ratio"] = out["arms"]["checked"]["seconds"] / out["arms"]["one_pass"]["seconds"]
    out["checker_first_pass"] = {
        str(s): tally([row for r in rs for row in r["checked"]["rows"]["first_pass"]]) for s, rs in per_seed.items()
    }
    out["checker_first_pass"]["all"] = tally(
        [row for rs in per_seed.values() for r in rs for row in r["checked"]["rows"]["first_pass"]]
    )
    # untouched objects against their keep subtasks' verdicts (records from before 2026-12-07 lack them)
    kept_rows = [row for rs in per_seed.values() for r in rs for row in r["checked"]["rows"].get("first_pass_kept", [])]
    if kept_rows:
        out["checker_kept_first_pass"] = tally(kept_rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    summary = summarize_seeds(load_records(args.files))
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
