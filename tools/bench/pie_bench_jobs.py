"""PIE-Bench (mapping_file.json) -> a `gas-edit batch` jobs file, one box per case from its mask.

    python tools/bench/pie_bench_jobs.py --pie_root data --out runs/pie/jobs.jsonl
    gas-edit batch --config configs/sd15.yaml --model /models/sd15 --jobs runs/pie/jobs.jsonl --output_dir runs/pie

The layout read (the benchmark's data/ folder): `mapping_file.json` maps a case id ("000000000000")
to {"image_path": path under annotation_images/, "original_prompt", "editing_prompt" (the changed
words in [brackets]), "editing_instruction", "editing_type_id" ("0".."9"), "blended_word" ("word
in the source, word in the target"), "mask": run-length pairs}.

The mask is a flat list [start0, length0, start1, length1, ...] over the mask's pixels in row-major
order (512 x 512 in the benchmark), 0-based: pixels start .. start + length - 1 are in the mask,
a run that would pass the last pixel stops there. The benchmark's own evaluation then marks the
border pixels as masked, to forgive annotation errors there; that is not done here, because every
box would become the whole image. A case's box is the bounding box of its mask, normalised
(x0 = first column / width, x1 = (last column + 1) / width); an empty mask gives the whole image.

The edit is the two prompts without brackets (`source`/`target`, split into noun-phrase subtasks by
gas-edit), each subtask given the mask's box; where the prompts' difference gives no subtask, the
blended words become one (`sources`/`targets`). Cases with neither are left out and listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PIE_SIZE = (512, 512)


def decode_mask(runs: list[int], size: tuple[int, int] = PIE_SIZE) -> np.ndarray:
    """(height, width) bool mask from PIE-Bench's run-length pairs."""
    height, width = size
    if len(runs) % 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in runs):
        raise ValueError("the mask must be an even-length list of non-negative integers (start, length pairs)")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        if start >= flat.size:
            raise ValueError(f"a run starts at pixel {start}, past the {height}x{width} mask")
        flat[start : start + length] = True
    return flat.reshape(height, width)


def mask_box(mask: np.ndarray) -> list[float]:
    """Normalised [x0, y0, x1, y1] around the mask's pixels; the whole image for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return [0.0, 0.0, 1.0, 1.0]
    height, width = mask.shape
    return [cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height]


def unbracket(prompt: str) -> str:
    return " ".join(prompt.replace("[", " ").replace("]", " ").split())


def case_job(key: str, item: dict, images: Path, size: tuple[int, int], seed: int) -> dict:
    """One jobs-file line; ValueError when the case gives gas-edit no edit."""
    from gas_lightning.errors import PlannerError
    from gas_lightning.planners import diff_sentences

    box = mask_box(decode_mask(item["mask"], size))
    source, target = unbracket(item["original_prompt"]), unbracket(item["editing_prompt"])
    job = {"name": key, "image": str((images / item["image_path"]).resolve()), "seed": seed}
    try:
        subtasks = len(diff_sentences(source, target).subtasks)
    except PlannerError:
        subtasks = 0
    if subtasks:
        return {**job, "source": source, "target": target, "boxes": [box] * subtasks}
    words = item.get("blended_word", "").split()
    if len(words) != 2 or words[0] == words[1]:
        raise ValueError(
            f"the prompts differ in no noun phrase and blended_word {item.get('blended_word')!r} names no change"
        )
    return {
        **job,
        "sources": [words[0]],
        "targets": [words[1]],
        "source_prompt": source,
        "target_prompt": target,
        "boxes": [box],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pie_root", type=Path, required=True, help="the folder holding mapping_file.json and annotation_images/"
    )
    p.add_argument("--out", type=Path, required=True, help="the jobs file to write")
    p.add_argument("--types", default=None, help="comma list of editing_type_id to keep (default: all)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases (after --types)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask_size", type=int, nargs=2, default=PIE_SIZE, metavar=("HEIGHT", "WIDTH"))
    args = p.parse_args(argv)
    mapping = json.loads((args.pie_root / "mapping_file.json").read_text(encoding="utf-8"))
    types = None if args.types is None else {t.strip() for t in args.types.split(",")}
    lines, skipped = [], []
    for key, item in sorted(mapping.items()):
        if types is not None and str(item.get("editing_type_id")) not in types:
            continue
        if args.limit is not None and len(lines) >= args.limit:
            break
        try:
            lines.append(case_job(key, item, args.pie_root / "annotation_images", tuple(args.mask_size), args.seed))
        except (KeyError, ValueError) as e:
            skipped.append(key)
            why = f"it has no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            print(f"case {key} left out: {why}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"{len(lines)} jobs written to {args.out}; {len(skipped)} cases left out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
