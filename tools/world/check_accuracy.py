"""The checker against the exact scorer on held-out shapes-world cases, and one pass against --refine.

    python tools/world/check_accuracy.py --cases 50 --seed 112 --refine 2 --refine_steps 50 --compare

Each case is edited through `gas_lightning.edit()` (the bundled preset, the case's request as a user
writes it, `--requests user` without its keep sentences), so the checker, the grounding and the refine
passes are the ones `gas-edit` runs. Every requested attribute of the exact scorer
(gas_lightning/worlds/scorer.py) is matched to the subtask that owns it (its object's source phrase, or
the background); the checker *catches* a failed attribute when that subtask's verdict is not "done", and
*flags* a right one when it is not "done" either. Both are measured on the first pass's verdicts (what a
user of one pass is told) and on the last pass's. With --compare each case is also edited in one pass
of the same total step budget (steps + refine x refine_steps), so the two can be set side by side.

tools/world/summarize_checks.py combines the --jsonl files of several seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from gas_lightning import edit
from gas_lightning.worlds import held_out_cases, render_pil, score
from gas_lightning.worlds.grounder import parse_phrase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize_checks import summarize_seeds  # noqa: E402  (a sibling tool, not a package)


def owner(attribute: dict, case, plan: dict) -> int | None:
    """The index of the plan's subtask that owns a scorer attribute or untouched object (None when none does)."""
    subtasks = plan["subtasks"]
    if attribute.get("kind") == "background":
        return next((k for k, s in enumerate(subtasks) if parse_phrase(s["target"])[0] == "background"), None)
    o = case.source.objects[attribute["index"]]
    return next((k for k, s in enumerate(subtasks) if parse_phrase(s["source"]) == ("object", o.colour, o.shape)), None)


def run_case(case, args, seed: int, steps: int, refine: int) -> dict:
    request = case.request_text(keep=args.requests == "case")
    with tempfile.TemporaryDirectory(prefix="check-accuracy-") as out:
        start = time.perf_counter()
        result = edit(
            render_pil(case.source),
            request,
            config=args.config,
            model=args.model,
            steps=steps,
            seed=seed,
            output_dir=out,
            refine=refine,
            refine_steps=args.refine_steps,
            trainer_kwargs={"enable_progress_bar": False, "logger": False},
        )
        seconds = time.perf_counter() - start
        first_image = Path(out) / "edited_pass0.png"  # written when a refine pass ran
        first_image = Image.open(first_image).convert("RGB") if first_image.exists() else result.image
        scored, first = score(result.image, case), score(first_image, case)
    report, plan = result.report, result.plan.to_dict()
    rows = {}
    # each pass's verdicts against that pass's own picture, scored exactly: the requested attributes,
    # and (`_kept`) each untouched object against its keep subtask's verdict
    for name, verdicts, truth in (
        ("first_pass", report["passes"][0]["verdicts"], first),
        ("last_pass", report["verdicts"], scored),
    ):
        for suffix, items in (("", truth["attributes"]), ("_kept", truth["untouched"])):
            rows[name + suffix] = [
                (a["ok"], "unowned" if (k := owner(a, case, plan)) is None else verdicts[k]["verdict"]) for a in items
            ]
    return {
        "first_pass_all_attributes": first["all_attributes"],
        "all_attributes": scored["all_attributes"],
        "per_attribute": scored["per_attribute"],
        "first_pass_preserved": first["preserved"],
        "preserved": scored["preserved"],
        "seconds": seconds,
        "first_pass_steps": report["passes"][0]["steps"],
        "steps": result.steps,
        "passes": len(report["passes"]),
        "rows": rows,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the held-out seed (cases seed*100000 + 0..cases-1)")
    p.add_argument(
        "--config", default=None, help="a gas-edit config (default: the bundled preset, configs/shapes.yaml)"
    )
    p.add_argument("--model", default=None, help="a model other than the config's")
    p.add_argument("--steps", type=int, default=150, help="the first pass's steps")
    p.add_argument("--refine", type=int, default=0, help="extra passes of the subtasks not judged done")
    p.add_argument("--refine_steps", type=int, default=50, help="steps of each extra pass")
    p.add_argument("--requests", choices=("case", "user"), default="case", help="user: without the keep sentences")
    p.add_argument("--compare", action="store_true", help="also one pass of steps + refine x refine_steps")
    p.add_argument("--start", type=int, default=0, help="skip the seed's first cases (split a seed across processes)")
    p.add_argument("--json", type=Path, default=None, help="write the records and summaries here")
    p.add_argument("--jsonl", type=Path, default=None, help="append each case's records here as it finishes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cases = held_out_cases(args.cases, seed=args.seed)
    budget = args.steps + args.refine * args.refine_steps
    cased = []  # the --jsonl records: a case's checked edit and its one pass of the same budget
    for i, case in list(enumerate(cases))[args.start :]:
        seed = args.seed * 1000 + (case.seed or 0)
        record = {"seed": args.seed, "case": i, "checked": run_case(case, args, seed, args.steps, args.refine)}
        line = f"case {i}: all {record['checked']['all_attributes']:.0f}, steps {record['checked']['steps']}"
        record["one_pass"] = run_case(case, args, seed, budget, 0) if args.compare else None
        if record["one_pass"] is not None:
            line += f"; one pass of {budget}: all {record['one_pass']['all_attributes']:.0f}"
        print(line, flush=True)
        cased.append(record)
        if args.jsonl is not None:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, **summarize_seeds({args.seed: cased})}
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [r["checked"] for r in cased]
        baseline = [r["one_pass"] for r in cased if r["one_pass"] is not None]
        args.json.write_text(json.dumps({**results, "records": records, "baseline": baseline}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
