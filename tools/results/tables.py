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
import summarize_eval  # noqa: E402  (a sibling tool, not a package)

WORLD = REPO / "results" / "world"
MARKER = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def method_summary(files: list[str], method: str) -> dict:
    """summarize_eval's numbers for one method of the given record files."""
    data = summarize_eval.load([WORLD / f for f in files])
    if method not in data:
        raise SystemExit(f"no method {method!r} in {files}")
    return summarize_eval.summarize({method: data[method]})["methods"][method]


def seeds(r: dict) -> str:
    return " / ".join(f"{v:.2f}" for v in r["all_attributes_per_seed"].values())


def mean_ci(r: dict) -> str:
    lo, hi = r["all_attributes_ci95"]
    return f"{r['all_attributes_mean']:.3f} ({lo:.2f}-{hi:.2f})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def world_preset_112_114() -> str:
    files = ["world_eval_seeds_112_114_cases.jsonl", "world_eval_seeds_112_114_dds_seq_cases.jsonl"]
    rows = [
        (
            "**the preset** (`gas`: keep-aware sampling, masks for kept objects and recolours, target balance)",
            "gas_target_balance+masks_same_outline",
        ),
        ("the preset before, without target balance (`gas_unbalanced`)", "gas+masks_same_outline"),
        ("`gas_sequential` (the reference's schedule, with target balance)", "gas_sequential+masks_same_outline"),
        ("full-prompt DDS", "dds+masks_same_outline"),
    ]
    out = []
    for label, method in rows:
        r = method_summary(files, method)
        out.append(
            [
                label,
                seeds(r),
                mean_ci(r),
                f"{r['colour']:.3f}",
                f"{r['shape']:.3f}",
                f"{r['preserved']:.3f}",
                f"{r['bg_psnr_in_boxes']:.1f} dB",
                f"{r['psnr_outside']:.1f} dB",
            ]
        )
    return table(
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
        out,
    )


def world_test_100_102() -> str:
    more, first = ["world_eval_more_cases.jsonl"], ["world_eval_seeds_cases.jsonl"]
    rows = [
        (
            "**`gas`**, keep-aware sampling, masks for kept objects and recolours (**the preset** before target balance)",
            more,
            "gas+masks_same_outline",
        ),
        ("`gas`, keep-aware sampling, boxes", more, "gas_keep_aware"),
        ("`gas`, shared sampling, boxes", first, "gas"),
        ("`gas_sequential` (the reference's schedule), boxes", more, "gas_sequential"),
        ("full-prompt DDS", first, "dds"),
    ]
    out = []
    for label, files, method in rows:
        r = method_summary(files, method)
        out.append(
            [
                label,
                seeds(r),
                mean_ci(r),
                f"{r['preserved']:.3f}",
                f"{r['bg_psnr_in_boxes']:.1f} dB",
                f"{r['psnr_outside']:.1f} dB",
            ]
        )
    return table(
        [
            "method",
            "all attributes, seed 100 / 101 / 102",
            "mean (95% interval)",
            "untouched objects kept",
            "bg PSNR in boxes",
            "PSNR outside",
        ],
        out,
    )


def masks_test_100_102() -> str:
    files = ["world_eval_more_cases.jsonl"]
    out = []
    for label, method in (
        ("boxes (keep-aware `gas`)", "gas_keep_aware"),
        ("masks for kept objects and recolours", "gas+masks_same_outline"),
    ):
        r = method_summary(files, method)
        out.append(
            [
                label,
                f"{r['all_attributes_mean']:.3f} ({seeds(r)})",
                f"{r['bg_psnr_in_boxes']:.1f} dB",
                f"{r['psnr_outside']:.1f} dB",
                f"{r['preserved']:.3f}",
                f"{r['complete']:.3f}",
            ]
        )
    return table(
        [
            "test seeds 100-102, 150 cases",
            "all attributes (seed 100 / 101 / 102)",
            "bg PSNR in edited boxes",
            "PSNR outside them",
            "untouched objects kept",
            "all right and all kept",
        ],
        out,
    )


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
    return (
        table(["module", "imports from the package"], rows)
        + f"\nModules that import each other (directly or round a loop): {said}.\n"
    )


TABLES = {
    "world-preset-112-114": world_preset_112_114,
    "world-test-100-102": world_test_100_102,
    "masks-test-100-102": masks_test_100_102,
    "gpu-h200": gpu_h200,
    "imports": imports,
}


# rendered afresh whenever the site is built (mkdocs_hooks.py), so --check does not hold them to the page's copy:
# the code they describe changes with every commit
LIVE = {"imports"}


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def render(text: str, cache: dict[str, str]) -> str:
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"unknown generated table {name!r}; known: {', '.join(TABLES)}")
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
        new = render(text, cache)
        if new != text:
            names = [
                m.group(2) for m, n in zip(MARKER.finditer(text), MARKER.finditer(new)) if m.group(3) != n.group(3)
            ]
            stale += [f"{page.relative_to(REPO)}: {name}" for name in names if not (args.check and name in LIVE)]
            if not args.check:
                page.write_text(new)
    verb = "differ from their records" if args.check else "regenerated"
    print(f"{len(stale)} tables {verb}" + "".join(f"\n  {s}" for s in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
