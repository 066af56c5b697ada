"""The check report of one edit: verdicts per subtask, what was to stay kept, and where the edit leaked.

Preservation is measured against the source at the working size: PSNR (torchmetrics) over each kept
object's region and over everything outside the edit's regions; LPIPS over the same outside (the
edit's regions pasted back from the source) when torchvision's backbone weights are on disk, and
otherwise recorded as unavailable with the reason, never guessed. The leak heatmap is |edited - source|
(mean over channels) outside the edit regions, where a keep subtask's region counts as outside: it
owns its area under the overlap rule. Written as report.json and report.png beside edited.png.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from gas_lightning.checking import Verdict, counts
from gas_lightning.errors import GasError
from gas_lightning.io import atomic_write
from gas_lightning.masks import box_cover, mask_to_grid, read_mask
from gas_lightning.metrics import LPIPS_WEIGHTS, load_lpips, psnr_outside, to_tensor
from gas_lightning.plan import WHOLE_IMAGE, EditPlan, Subtask

VIEW_SIDE = 192  # report.png's panels are upscaled (nearest) to at least this many pixels


def region(s: Subtask, height: int, width: int) -> torch.Tensor:
    """(height, width) bool: the pixels a subtask acts on (its mask where it has one, else its box)."""
    if s.mask is not None:
        return mask_to_grid(read_mask(s.mask, s.mask_label, what=f"mask of '{s.source}'"), height, width) > 0
    return box_cover(s.box or WHOLE_IMAGE, height, width).bool()


def edit_area(plan: EditPlan, height: int, width: int) -> torch.Tensor:
    """Pixels the edit may change: the edit subtasks' regions less the keep subtasks' (they own theirs)."""
    area = torch.zeros(height, width, dtype=torch.bool)
    for s in plan.subtasks:
        if not s.keep and s.intensity > 0:
            area |= region(s, height, width)
    for s in plan.subtasks:
        if s.keep:
            area &= ~region(s, height, width)
    return area


def find_lpips(path: str | None, device: str | torch.device = "cpu"):
    """(LPIPS metric, None) from --check_lpips or torch hub's cache, else (None, why not).

    Raises:
        GasError: --check_lpips names a file that is not torchvision's AlexNet weights.
    """
    import torchvision

    expected = os.path.basename(getattr(torchvision.models, LPIPS_WEIGHTS["alex"]).DEFAULT.url)
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / expected
        if not cached.is_file():
            return None, f"no {expected} in {cached.parent} and no --check_lpips given (nothing is downloaded)"
        path = str(cached)
        try:
            return load_lpips(path, "alex", torch.device(device)), None
        except GasError as e:  # a cached file that is not the right one: the report says so
            return None, str(e)
    return load_lpips(path, "alex", torch.device(device)), None  # the user's own file: one clear error


def preservation(
    source: Image.Image, edited: Image.Image, plan: EditPlan, lpips=None, lpips_why: str | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """PSNR per kept object and outside the edit, LPIPS outside, leak statistics; and the (H, W) leak map."""
    if source.size != edited.size:
        source = source.convert("RGB").resize(edited.size, Image.Resampling.LANCZOS)
    src, out = to_tensor(source), to_tensor(edited)
    h, w = out.shape[-2:]
    area = edit_area(plan, h, w)
    outside = ~area
    kept = [
        {"index": k, "object": s.source, "psnr": psnr_outside(src, out, region(s, h, w))}
        for k, s in enumerate(plan.subtasks)
        if s.keep
    ]
    leak = (out - src).abs().mean(dim=1)[0] * outside
    values: dict[str, Any] = {
        "kept": kept,
        "psnr_outside": psnr_outside(src, out, outside),
        "outside_fraction": float(outside.float().mean()),
        "leak_mean": float(leak[outside].mean()) if outside.any() else None,
        "leak_max": float(leak.max()),
        "lpips_outside": None,
    }
    if lpips is None:
        values["lpips_unavailable"] = lpips_why or "LPIPS not configured"
    elif not outside.any():
        values["lpips_unavailable"] = "nothing lies outside the edit's regions"
    else:
        try:
            lpips.reset()
            device = next(iter(lpips.parameters())).device
            lpips.update(torch.where(outside, out, src).to(device), src.to(device))
            values["lpips_outside"] = float(lpips.compute())
        except RuntimeError as e:  # e.g. an image too small for the backbone's pooling
            values["lpips_unavailable"] = f"LPIPS failed on this image: {' '.join(str(e).split())[:160]}"
    return values, leak


def build_report(
    checker: str | None, verdicts: Sequence[Verdict], preserved: dict[str, Any], passes: Sequence[dict]
) -> dict[str, Any]:
    """The report.json object: the last check's verdicts, their counts, preservation and every pass."""
    return {
        "checker": checker,
        "verdicts": [v.to_dict() for v in verdicts],
        "counts": counts(verdicts),
        "all_done": all(v.passed for v in verdicts if not v.keep) if checker else None,
        "all_kept": all(v.passed for v in verdicts if v.keep) if checker else None,
        "preservation": preserved,
        "passes": list(passes),
        "steps": sum(p["steps"] for p in passes),
    }


def _view(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr)
    factor = max(1, -(-VIEW_SIDE // min(img.size)))
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


def heat_colours(leak: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> uint8 RGB, black (no change) through red to yellow (a full-range change)."""
    x = leak.clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def report_picture(source: Image.Image, edited: Image.Image, leak: torch.Tensor, report: dict) -> Image.Image:
    """source | edited | leak heatmap, and one line per subtask: verdict and scores."""
    source = source.convert("RGB").resize(edited.size, Image.Resampling.LANCZOS)
    panels = [_view(np.asarray(source)), _view(np.asarray(edited.convert("RGB"))), _view(heat_colours(leak))]
    lines = [
        f"{v['index']}: {v['verdict']:<8} {v['source']} -> {v['target']}  "
        + " ".join(f"{k} {s:.2f}" for k, s in v["scores"].items())
        for v in report["verdicts"]
    ]
    p = report["preservation"]
    lines.append(f"outside the edit: PSNR {_fmt(p['psnr_outside'])} dB, leak mean {_fmt(p['leak_mean'])}")
    width = sum(im.width for im in panels) + 8 * (len(panels) - 1)
    canvas = Image.new("RGB", (width, panels[0].height + 14 * len(lines) + 8), (255, 255, 255))
    x = 0
    for im in panels:
        canvas.paste(im, (x, 0))
        x += im.width + 8
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, panels[0].height + 4 + 14 * i), line, fill=(0, 0, 0))
    return canvas


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_report(report: dict, picture: Image.Image, out: Path) -> None:
    with atomic_write(out / "report.json", "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    with atomic_write(out / "report.png") as f:
        picture.save(f, format="PNG")


def log_report(logger, report: dict, picture: Image.Image, step: int) -> None:
    """The verdicts (1 done, 0 not done, 0.5 unsure), scores and preservation to TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return
    level = {"done": 1.0, "not done": 0.0, "unsure": 0.5}
    scalars = {}
    for v in report["verdicts"]:
        scalars[f"check/{v['index']}/verdict"] = level[v["verdict"]]
        scalars.update({f"check/{v['index']}/{k}": s for k, s in v["scores"].items()})
    p = report["preservation"]
    scalars.update(
        {f"preservation/{k}": p[k] for k in ("psnr_outside", "leak_mean", "lpips_outside") if p[k] is not None}
    )
    scalars.update({f"preservation/kept_{o['index']}_psnr": o["psnr"] for o in p["kept"] if o["psnr"] is not None})
    logger.log_metrics(scalars, step)
    logger.experiment.add_image("check/report", np.asarray(picture), step, dataformats="HWC")
    logger.experiment.close()  # the Trainer closed it already; logging reopened it


def summary(report: dict | None) -> dict[str, Any]:
    """A job's check in a few numbers, for the batch summary: verdict counts, refine passes run, the
    lowest PSNR of a kept object and the PSNR outside the edit. Empty when the edit was not checked."""
    if not report:
        return {}
    c, p = report["counts"], report["preservation"]
    kept = [o["psnr"] for o in p["kept"] if o["psnr"] is not None]
    return {
        "check_done": c["done"],
        "check_not_done": c["not done"],
        "check_unsure": c["unsure"],
        "refine_passes": len(report["passes"]) - 1,
        "kept_psnr_min": min(kept) if kept else None,
        "check_psnr_outside": p["psnr_outside"],
    }
