"""Regenerate every generated table of the README and docs/ from the records in results/.

A published table stands between `<!-- generated:NAME -->` and `<!-- /generated -->` markers; this
script rewrites what is between them from the records, so no number is copied by hand. Summaries
come from tools/world/summarize_eval.py, one method at a time (so a row's bootstrap interval does
not depend on which other rows share the table).

    python tools/results/tables.py            # rewrite the tables in place
    python tools/results/tables.py --check    # change nothing; exit 1 naming each table that differs

The site renders the tables afresh when it is built (tools/results/mkdocs_hooks.py).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "world"))
import summarize_checks  # noqa: E402  (sibling tools, not a package)
import summarize_eval  # noqa: E402

RECORDS = REPO / "results" / "world"
MARKER = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def method_summary(files: list[str], method: str, seed: int | None = None) -> dict:
    """summarize_eval's numbers for one method of the given record files (one seed of them, if given)."""
    data = summarize_eval.load([RECORDS / f for f in files])
    if method not in data or (seed is not None and seed not in data[method]):
        raise SystemExit(f"no method {method!r}{'' if seed is None else f' of seed {seed}'} in {files}")
    seeds = data[method] if seed is None else {seed: data[method][seed]}
    return summarize_eval.summarize({method: seeds})["methods"][method]


def seeds(r: dict) -> str:
    return " / ".join(f"{v:.2f}" for v in r["all_attributes_per_seed"].values())


def mean_ci(r: dict) -> str:
    lo, hi = r["all_attributes_ci95"]
    return f"{r['all_attributes_mean']:.3f} ({lo:.2f}-{hi:.2f})"


# a column of a world table: (summarize_eval's number for one method, its format); the validation
# tables of one seed give two decimals where its 50 cases give no third, and PSNR without its unit
CELLS = {
    "colour": ("colour", "{:.3f}"),
    "shape": ("shape", "{:.3f}"),
    "shape2": ("shape", "{:.2f}"),
    "colour2": ("colour", "{:.2f}"),
    "complete2": ("complete", "{:.2f}"),
    "kept": ("preserved", "{:.3f}"),
    "kept2": ("preserved", "{:.2f}"),
    "complete": ("complete", "{:.3f}"),
    "all2": ("all_attributes_mean", "{:.2f}"),
    "mean3": ("all_attributes_mean", "{:.3f}"),
    # the tuning summaries of world_eval.json name their numbers as eval_world wrote them
    "all3": ("all_attributes", "{:.3f}"),
    "all2s": ("all_attributes", "{:.2f}"),
    "per_attribute3": ("per_attribute", "{:.3f}"),
    "background3": ("background", "{:.3f}"),
    "erosion3": ("erosion", "{:.3f}"),
    "bg": ("bg_psnr_in_boxes", "{:.1f} dB"),
    "bg_db": ("bg_psnr_in_boxes", "{:.1f}"),
    "outside": ("psnr_outside", "{:.1f} dB"),
    "outside_db": ("psnr_outside", "{:.1f}"),
    "seconds": ("seconds_per_edit", "{:.1f}"),
}


def cell(column: str, r: dict) -> str:
    if column == "seeds":
        return seeds(r)
    if column == "mean_ci":
        return mean_ci(r)
    if column == "spread":
        return f"{r['all_attributes_seed_sd']:.3f}; {r['all_attributes_min_seed']:.2f}..{max(r['all_attributes_per_seed'].values()):.2f}"
    if column == "ci":
        return "{:.2f}-{:.2f}".format(*r["all_attributes_ci95"])
    if column == "mean_seeds":
        return f"{r['all_attributes_mean']:.3f} ({seeds(r)})"
    key, form = CELLS[column]
    return form.format(r[key])


def world_table(header: list[str], columns: list[str], rows: list[tuple]) -> str:
    """rows: (label, record files, method as recorded[, seed]); one cell per column (see `cell`)."""
    out = []
    for label, files, method, *seed in rows:
        r = method_summary(files, method, *seed)
        out.append([label, *(cell(c, r) for c in columns)])
    return table(header, out)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


S100, MORE = ["world_eval_seeds_cases.jsonl"], ["world_eval_more_cases.jsonl"]
S103, S106, S109 = (
    ["world_eval_seeds_103_105_cases.jsonl"],
    ["world_eval_seeds_106_108_cases.jsonl"],
    ["world_eval_seeds_109_111_cases.jsonl"],
)
S112 = ["world_eval_seeds_112_114_cases.jsonl", "world_eval_seeds_112_114_dds_seq_cases.jsonl"]
S115 = ["world_eval_seeds_115_116_steps75_cases.jsonl"]
TEST = ["colour", "shape", "kept", "bg", "outside"]
TEST_HEADER = ["colour", "shape", "untouched kept", "bg PSNR in boxes", "PSNR outside"]
PRESET = "gas+masks_same_outline"  # the preset's name in the records before target balance
VAL = ["world_eval_validation_cases.jsonl"]
OUTSIDE_KEPT_HEADER = ["bg PSNR in boxes (dB)", "PSNR outside (dB)", "untouched objects kept", "all right and all kept"]
VAL_HEADER = ["all attributes", "colour", "shape", "untouched kept", "bg PSNR in boxes (dB)", "PSNR outside (dB)"]

WORLD = {
    "world-preset-112-114": (
        [
            "test seeds 112-114, 150 cases",
            "all attributes, 112 / 113 / 114",
            "mean (95% interval)",
            "colour",
            "shape",
            "untouched objects kept",
            "bg PSNR in boxes",
            "PSNR outside",
        ],
        ["seeds", "mean_ci", *TEST],
        [
            (
                "**the preset** (`gas`: keep-aware sampling, masks for kept objects and recolours, target balance)",
                S112,
                "gas_target_balance+masks_same_outline",
            ),
            ("the preset before, without target balance (`gas_unbalanced`)", S112, PRESET),
            (
                "`gas_sequential` (the reference's schedule, with target balance)",
                S112,
                "gas_sequential+masks_same_outline",
            ),
            ("full-prompt DDS", S112, "dds+masks_same_outline"),
        ],
    ),
    "world-test-100-102": (
        [
            "method",
            "all attributes, seed 100 / 101 / 102",
            "mean (95% interval)",
            "untouched objects kept",
            "bg PSNR in boxes",
            "PSNR outside",
        ],
        ["seeds", "mean_ci", "kept", "bg", "outside"],
        [
            (
                "**`gas`**, keep-aware sampling, masks for kept objects and recolours (**the preset** before target balance)",
                MORE,
                PRESET,
            ),
            ("`gas`, keep-aware sampling, boxes", MORE, "gas_keep_aware"),
            ("`gas`, shared sampling, boxes", S100, "gas"),
            ("`gas_sequential` (the reference's schedule), boxes", MORE, "gas_sequential"),
            ("full-prompt DDS", S100, "dds"),
        ],
    ),
    "masks-test-100-102": (
        [
            "test seeds 100-102, 150 cases",
            "all attributes (seed 100 / 101 / 102)",
            "bg PSNR in edited boxes",
            "PSNR outside them",
            "untouched objects kept",
            "all right and all kept",
        ],
        ["mean_seeds", "bg", "outside", "kept", "complete"],
        [("boxes (keep-aware `gas`)", MORE, "gas_keep_aware"), ("masks for kept objects and recolours", MORE, PRESET)],
    ),
    "world-100-102-first": (
        [
            "method",
            "all attributes, seed 100 / 101 / 102",
            "mean",
            "spread between seeds (sd; min..max)",
            "95% interval",
            "colour",
            "shape",
            *OUTSIDE_KEPT_HEADER,
        ],
        ["seeds", "mean3", "spread", "ci", "colour", "shape", "bg_db", "outside_db", "kept", "complete"],
        [("**gas**", S100, "gas"), ("dds", S100, "dds")],
    ),
    "world-103-105": (
        ["test seeds 103-105, 150 cases", "all attributes, 103 / 104 / 105", "mean (95%)", *TEST_HEADER],
        ["seeds", "mean_ci", *TEST],
        [("preset", S103, PRESET), ("DDS", S103, "dds")],
    ),
    "world-106-108": (
        [
            "test seeds 106-108, 150 cases",
            "all attributes, 106 / 107 / 108",
            "mean (95%)",
            "colour",
            "shape",
            "untouched kept",
            "cases entirely right incl. kept",
            "bg PSNR in boxes",
            "PSNR outside",
        ],
        ["seeds", "mean_ci", "colour", "shape", "kept", "complete", "bg", "outside"],
        [("the preset", S106, PRESET), ("F", S106, "gas_current_ref_outline_mask_overlap_0+masks_same_outline")],
    ),
    "world-109-111": (
        ["test seeds 109-111, 150 cases", "all attributes, 109 / 110 / 111", "mean (95%)", *TEST_HEADER],
        ["seeds", "mean_ci", *TEST],
        [("the preset", S109, PRESET), ("`t_max_end 600`", S109, "gas_t_anneal600+masks_same_outline")],
    ),
    "world-112-114-history": (
        ["test seeds 112-114, 150 cases", "all attributes, 112 / 113 / 114", "mean (95%)", *TEST_HEADER],
        ["seeds", "mean_ci", *TEST],
        [
            ("the preset then (`gas_unbalanced`)", S112, PRESET),
            ("**target balance** (`gas` now)", S112, "gas_target_balance+masks_same_outline"),
            ("`gas_sequential` with target balance (run after the choice)", S112, "gas_sequential+masks_same_outline"),
            ("full-prompt DDS (run after the choice)", S112, "dds+masks_same_outline"),
        ],
    ),
    "val2-sampling": (
        [
            "validation (seed 2, 20 cases)",
            "all attributes",
            "colour",
            "shape",
            *OUTSIDE_KEPT_HEADER,
        ],
        ["all2", "colour2", "shape2", "bg_db", "outside_db", "kept2", "complete2"],
        [("shared t and noise (`gas`)", VAL, "gas_shared", 2), ("per-term t and noise", VAL, "gas_per_term", 2)],
    ),
    "val2-keep-aware": (
        [
            "validation (seed 2, 20 cases)",
            "all attributes",
            "colour",
            "shape",
            "PSNR outside (dB)",
            "untouched objects kept",
            "all right and all kept",
        ],
        ["all2", "colour2", "shape2", "outside_db", "kept2", "complete2"],
        [
            ("shared", VAL, "gas_shared", 2),
            ("per_term", VAL, "gas_per_term", 2),
            ("keep_aware", VAL, "gas_keep_aware", 2),
        ],
    ),
    "val3-preserve": (
        ["validation seed 3, 50 cases", *VAL_HEADER],
        ["all2", "colour", "shape", "kept2", "bg_db", "outside_db"],
        [
            ("preset (`gas --masks same_outline`)", VAL, PRESET, 3),
            ("`gas_preserve` (recolours marked preserve_form)", VAL, "gas_preserve+masks_same_outline", 3),
        ],
    ),
    "val3-budget": (
        ["validation seed 3, 50 cases", "all attributes", "colour", "shape", "PSNR outside (dB)", "kept"],
        ["all2", "colour", "shape2", "outside_db", "kept2"],
        [
            ("`gas` (keep-aware), 150 steps (the preset)", VAL, PRESET, 3),
            ("`gas`, 75 steps (cosine schedule over 75)", VAL, "gas_75steps+masks_same_outline", 3),
            ("`gas_sequential`, 150 steps", VAL, "gas_sequential+masks_same_outline", 3),
            (
                "`gas_sequential`, 75 steps (added later the same day)",
                VAL,
                "gas_sequential_75steps+masks_same_outline",
                3,
            ),
        ],
    ),
    "val3-steps": (
        ["validation seed 3, 50 cases", *VAL_HEADER],
        ["all2", "colour", "shape2", "kept2", "bg_db", "outside_db"],
        [
            ("preset, 75 steps", VAL, "gas_75steps+masks_same_outline", 3),
            ("preset, 150 steps", VAL, PRESET, 3),
            ("preset, 300 steps", VAL, "gas_300steps+masks_same_outline", 3),
        ],
    ),
    "val3-reference-context": (
        ["validation seed 3, 50 cases", *VAL_HEADER],
        ["all2", "colour", "shape", "kept2", "bg_db", "outside_db"],
        [
            ("the preset", VAL, PRESET, 3),
            ("E: `current`, all objects (`gas_current_ref`)", VAL, "gas_current_ref+masks_same_outline", 3),
            (
                "G: `current`, `same_outline` (`gas_current_ref_outline`)",
                VAL,
                "gas_current_ref_outline+masks_same_outline",
                3,
            ),
            (
                "**F**: G + `mask_overlap_weight 0` (`gas_current_ref_outline_mask_overlap_0`)",
                VAL,
                "gas_current_ref_outline_mask_overlap_0+masks_same_outline",
                3,
            ),
        ],
    ),
    "val4-anneal": (
        ["validation seed 4, 50 cases", *VAL_HEADER],
        ["all2", "colour", "shape2", "kept2", "bg_db", "outside_db"],
        [
            ("the preset", VAL, PRESET, 4),
            ("`t_max_end 400` (`gas_t_anneal400`)", VAL, "gas_t_anneal400+masks_same_outline", 4),
            ("**`t_max_end 600`** (`gas_t_anneal600`)", VAL, "gas_t_anneal600+masks_same_outline", 4),
        ],
    ),
    "world-115-116": (
        [
            "test seeds 115-116, 100 cases, 75 steps",
            "all attributes, 115 / 116",
            "mean (95%)",
            "colour",
            "shape",
            "kept",
            "PSNR outside",
            "s / edit",
        ],
        ["seeds", "mean_ci", "colour", "shape", "kept", "outside", "seconds"],
        [
            ("`gas`", S115, "gas_75steps+masks_same_outline"),
            ("`gas_sequential`", S115, "gas_sequential_75steps+masks_same_outline"),
        ],
    ),
}


def summary_table(header: list[str], where: list[str], columns: list[str], rows: list[tuple[str, str]]) -> str:
    """A table from the summaries of results/world/world_eval.json (the seed 0 and seed 1 tuning, whose
    per-case records were not kept): `where` leads to a dict of summaries, rows are (label, key)."""
    data = json.loads((RECORDS / "world_eval.json").read_text())
    for key in where:
        data = data[key]
    return table(header, [[label, *(cell(c, data[key]) for c in columns)] for label, key in rows])


SEED0 = ["per_attribute3", "all3", "colour", "shape", "background3", "erosion3", "bg_db", "outside_db", "kept"]
SEED0_HEADER = [
    "per attribute",
    "all attributes",
    "colour",
    "shape",
    "background",
    "erosion",
    "bg PSNR in boxes (dB)",
    "PSNR outside (dB)",
    "preserved",
]
SUMMARIES = {
    "tuning-seed0": (
        ["method", *SEED0_HEADER, "s / edit"],
        ["methods"],
        [*SEED0, "seconds"],
        [
            ("dds (full prompt, guidance 12.5)", "dds"),
            ("dds_7.5 (full prompt, guidance 7.5)", "dds_7.5"),
            ("gas_reference (DESIGN.md constants)", "gas_reference"),
            ("**gas** (batched)", "gas"),
            ("gas_sequential", "gas_sequential"),
        ],
    ),
    "tuning-seed0-previous": (
        ["method (100 steps, constant lr 0.1)", *[h for h in SEED0_HEADER if h != "background"]],
        ["previous", "methods"],
        [c for c in SEED0 if c != "background3"],
        [(m, m) for m in ("dds", "dds_7.5", "gas_reference", "gas", "gas_sequential")],
    ),
    "tuning-lr-gpu": (
        ["validation (seed 1, 40 cases, GPU)", "all attributes", "colour", "shape", "bg PSNR in boxes (dB)"],
        ["validation", "lr_schedule_gpu", "results"],
        ["all3", "colour", "shape", "bg_db"],
        [
            ("constant lr 0.1, 100 steps (earlier default)", "const"),
            ("cosine, lr 0.2, 100 steps", "cos_lr0.2"),
            ("cosine, lr 0.2 to 0.04 (`--lr_final 0.2`), 100 steps", "cos_lr0.2_f0.2"),
            ("cosine, lr 0.3, 100 steps", "cos_lr0.3"),
            ("cosine, lr 0.3 to 0.03, 100 steps", "cos_lr0.3_f0.1"),
            ("cosine, lr 0.2, 100 steps, guidance 14", "cos_lr0.2_g14"),
            ("cosine, lr 0.2, 100 steps, guidance 15.5", "cos_lr0.2_g15.5"),
            ("cosine, lr 0.3, 100 steps, guidance 14", "cos_lr0.3_g14"),
            ("cosine, lr 0.2, 100 steps, background guidance 9", "cos_lr0.2_w9"),
            ("cosine, lr 0.15, 150 steps", "cos_lr0.15_s150"),
            ("**cosine, lr 0.2, 150 steps** (gas)", "cos_lr0.2_s150"),
            ("dds, cosine, lr 0.2, 100 steps", "cos_lr0.2_dds"),
        ],
    ),
    "tuning-sweep": (
        ["validation (seed 1, 20 cases)", "all attributes", "colour", "shape", "bg PSNR in boxes (dB)"],
        ["validation", "sweep"],
        ["all2s", "colour2", "shape2", "bg_db"],
        [
            (k.replace("12.5 / 7.5 / 0.3 (gas)", "**12.5 / 7.5 / 0.3** (gas)"), k)
            for k in (
                "3.5 / 2.5 / 0.1",
                "5 / 3.5 / 0.1",
                "7.5 / 5 / 0.1 (the previous model's settings)",
                "10 / 5 / 0.1",
                "11 / 6 / 0.3",
                "12.5 / 5 / 0.1",
                "12.5 / 7.5 / 0.1",
                "12.5 / 7.5 / 0.3 (gas)",
                "12.5 / 7.5 / 0.5",
                "15 / 5 / 0.1",
                "15 / 7.5 / 0.1",
                "15 / 7.5 / 0.3",
            )
        ],
    ),
}


def gpu_h200() -> str:
    """The H200 rows of which a benchmark JSON was kept (tools/bench/benchmark.py --json)."""
    rows = [
        ("SD 1.5, 512 px, fp16 weights", "fp16.json"),
        ("SD 1.5, fp16, `--low_memory true` (micro-batches of 4)", "fp16_lowmem.json"),
        ("SD 1.5, bf16 weights", "bf16.json"),
        ("SD 1.5, fp32 weights, `--precision 16-mixed` (configs/sd15.yaml)", "fp32_16mixed.json"),
    ]
    out = []
    for label, name in rows:
        r = json.loads((REPO / "results" / "gpu" / name).read_text())
        seq, bat = r["sequential"], r["batched"]
        out.append(
            [
                label,
                f"{seq['s_per_step']:.3f}",
                f"{bat['s_per_step']:.3f}",
                f"{r['ratio']:.2f}",
                f"{bat['s_per_500_steps']:.1f}",
                f"{bat['peak_mem_mb']:,.0f}",
            ]
        )
    return table(
        ["row", "sequential s/step", "batched s/step", "ratio", "batched s per 500 steps", "peak GPU MiB (batched)"],
        out,
    )


# the --refine measurement's records, a seed each (tools/world/check_accuracy.py --jsonl), by request form:
# "user" without the keep sentences (what a user types), "case" as the cases write them. Seeds 120-122 ran
# refine before it restored lost kept objects; "-restore" is refine as it is now, on fresh seeds (the same
# cases in both forms).
CHECK = {
    **{form: [f"check_refine_seed{s}_{form}_cases.jsonl" for s in (120, 121, 122)] for form in ("user", "case")},
    **{
        f"{form}-restore": [f"check_refine_restore_seed{s}_{form}_cases.jsonl" for s in (123, 124, 125)]
        for form in ("user", "case")
    },
}
FORM_LABEL = {"user": "user requests", "case": "requests as the cases write them"}
FORM_LABEL |= {f"{form}-restore": f"{label}, refine restoring kept objects" for form, label in FORM_LABEL.items()}


def _check_summary(files: list[str]) -> dict:
    """The seeds recorded so far (a seed still to run has no file)."""
    found = [RECORDS / f for f in files if (RECORDS / f).exists()]
    if not found:
        raise SystemExit(f"no records among {files}")
    return summarize_checks.summarize_seeds(summarize_checks.load_records(found))


def check_refine(form: str) -> str:
    """One pass, checked + refine, and one pass of the same budget, per seed and over seeds."""
    s = _check_summary(CHECK[form])
    seeds = " / ".join(s["cases_per_seed"])
    cases = " / ".join(str(n) for n in s["cases_per_seed"].values())
    rows = []
    labels = {
        "first_pass": "one pass of 150 steps (the checked edit's first pass)",
        "checked": "checked, `--refine 2`",
        "one_pass": "one pass of 250 steps (the same budget)",
    }
    for name, label in labels.items():
        r = s["arms"][name]
        lo, hi = r["all_attributes_ci95"]
        paired = s["paired"].get(f"{name} - one_pass")
        rows.append(
            [
                label,
                " / ".join(f"{v:.2f}" for v in r["all_attributes_per_seed"].values()),
                f"{r['all_attributes_mean']:.3f} ({lo:.2f}-{hi:.2f})",
                "" if paired is None else "{:+.3f} ({:+.2f}..{:+.2f})".format(paired["difference"], *paired["ci95"]),
                f"{r['preserved']:.3f}" if "preserved" in r else "",
                f"{r['steps']:.0f}" if "steps" in r else "150",
                f"{r['seconds']:.1f}" if "seconds" in r else "",
            ]
        )
    return table(
        [
            FORM_LABEL[form],
            f"all attributes, seed {seeds} ({cases} cases)",
            "mean (95% interval)",
            "against one pass of 250 (paired, 95%)",
            "untouched objects kept",
            "mean steps",
            "seconds per edit",
        ],
        rows,
    )


def check_checker(form: str) -> str:
    """The checker's first-pass verdicts against the exact scorer, per seed and pooled; and on the
    untouched objects (their keep subtasks' verdicts) where the records have them."""
    s = _check_summary(CHECK[form])
    rows = []
    found = dict(s["checker_first_pass"])
    if "checker_kept_first_pass" in s:
        found["kept"] = s["checker_kept_first_pass"]
    for seed, t in found.items():
        rows.append(
            [
                {"all": "all seeds", "kept": "untouched objects, all seeds"}.get(seed, f"seed {seed}"),
                f"{t['failed_caught']} of {t['failed_attributes']}"
                + ("" if t["caught"] is None else f" ({t['caught']:.2f})"),
                f"{t['right_flagged']} of {t['right_attributes']}"
                + ("" if t["flagged"] is None else f" ({t['flagged']:.3f})"),
            ]
        )
    return table(["first pass", "failed attributes caught", "right attributes flagged"], rows)


# The stages of gas_lightning, lowest first: data flows request -> plan -> boxes and masks -> guidance ->
# module -> Trainer -> outputs, with the command line, the API, batch and the app on top. A module should
# import only from its own stage or below; the architecture page lists the imports that do not.
STAGES = [
    ("shared ground: errors, atomic IO, the terminal's set-up", ["errors", "io", "terminal", "usage"]),
    ("the plan: subtasks, phrases, boxes", ["plan"]),
    ("planners: request -> plan", ["planners"]),
    ("regions: boxes and masks -> latent weights", ["masks"]),
    ("grounding: boxes and masks from detectors and segmenters", ["grounding"]),
    ("the bundled world: scenes, cases, scorer, grounder, models", ["worlds"]),
    (
        "the frozen model: backbones and their loading",
        ["components", "backbone", "flow_backbone", "flow_loading", "loading", "single_file", "testing"],
    ),
    ("guidance: the DDS terms, schedules and the CDS loss; the flow solver's terms", ["guidance"]),
    ("the LightningModule (the DDS edit, the flow edit)", ["module", "flow_module"]),
    ("image + plan + backbone -> a ready edit; the solver registry", ["pipeline", "flow_pipeline", "solvers"]),
    ("callbacks: penalty, previews, outputs, progress", ["callbacks"]),
    ("choosing the planner and box source", ["resolve"]),
    (
        "one edit run: its passes, checks, report, records and metrics",
        ["runner", "fitting", "checking", "report", "refine", "records", "metrics", "jobs"],
    ),
    ("on top: the Python API, batch, the app, the command line", ["api", "batch", "app", "app_ui", "cli"]),
]


def stage_of(module: str, package: str) -> int | None:
    name = module.removeprefix(package + ".")
    for k, (_, owners) in enumerate(STAGES):
        if any(name == o or name.startswith(o + ".") for o in owners):
            return k
    return None


def stages() -> str:
    """Which modules own which stage, lowest first."""
    rows = [[str(k), what, ", ".join(f"`{o}`" for o in owners)] for k, (what, owners) in enumerate(STAGES)]
    return table(["stage", "what", "modules of `gas_lightning`"], rows)


def imports(package: Path = REPO / "gas_lightning") -> str:
    """Each package module and the package modules it imports (function-level imports included)."""
    import networkx as nx  # a dependency of torch

    graph = nx.DiGraph()
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    rows = []
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from package import module` depends on that module; `from module import name` on the module
                found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in names else target for a in node.names)
        deps = sorted({d for d in found if d in names and d != module})
        graph.add_edges_from((module, d) for d in deps)
        rows.append([f"`{module}`", ", ".join(f"`{d.removeprefix(package.name + '.')}`" for d in deps) or "-"])
    loops = sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)
    said = "; ".join(" / ".join(f"`{m}`" for m in loop) for loop in loops) or "none"
    short = package.name + "."
    upward = [
        f"`{a.removeprefix(short)}` -> `{b.removeprefix(short)}`"
        for a, b in sorted(graph.edges)
        if None not in (stage_of(a, package.name), stage_of(b, package.name))
        and stage_of(a, package.name) < stage_of(b, package.name)
    ]
    unplaced = [f"`{m}`" for m in names if m != package.name and stage_of(m, package.name) is None]
    text = table(["module", "imports from the package"], rows)
    text += f"\nModules that import each other (directly or round a loop): {said}.\n"
    if package.name == "gas_lightning":
        text += f"\nImports from a later stage (against the flow): {', '.join(upward) or 'none'}.\n"
        text += f"\nModules in no stage: {', '.join(unplaced) or 'none'}.\n"
    return text


def cli_help() -> str:
    """`gas-edit --help` as the package prints it (the options a user sets, grouped)."""
    import os
    import subprocess

    env = {**os.environ, "COLUMNS": "100"}
    run = subprocess.run(
        [sys.executable, "-m", "gas_lightning.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    if run.returncode != 0:
        raise SystemExit(f"gas-edit --help failed: {run.stderr[-500:]}")
    return "```text\n" + run.stdout.rstrip() + "\n```\n"


TABLES = {
    **{name: (lambda spec=spec: world_table(*spec)) for name, spec in WORLD.items()},
    **{name: (lambda spec=spec: summary_table(*spec)) for name, spec in SUMMARIES.items()},
    "gpu-h200": gpu_h200,
    **{f"check-refine-{form}": (lambda form=form: check_refine(form)) for form in CHECK},
    **{f"check-checker-{form}": (lambda form=form: check_checker(form)) for form in CHECK},
    "stages": stages,
    "cli-help": cli_help,
    "imports": imports,
}


# rendered afresh whenever the site is built (mkdocs_hooks.py), so --check does not hold them to the page's copy:
# the code they describe changes with every commit
LIVE = {"imports", "stages", "cli-help"}


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def render(text: str, cache: dict[str, str], skip: set[str] = frozenset()) -> str:
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"unknown generated table {name!r}; known: {', '.join(TABLES)}")
        if name in skip:
            return m.group(0)
        if name not in cache:
            cache[name] = TABLES[name]()
        return m.group(1) + cache[name] + m.group(4)

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a published table differs")
    args = parser.parse_args(argv)
    cache: dict[str, str] = {}
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text, cache, LIVE if args.check else frozenset())
        if new != text:
            names = [
                m.group(2) for m, n in zip(MARKER.finditer(text), MARKER.finditer(new)) if m.group(3) != n.group(3)
            ]
            stale += [f"{page.relative_to(REPO)}: {name}" for name in names]
            if not args.check:
                page.write_text(new)
    verb = "differ from their records" if args.check else "regenerated"
    print(f"{len(stale)} tables {verb}" + "".join(f"\n  {s}" for s in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
