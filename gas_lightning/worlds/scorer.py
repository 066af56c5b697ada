"""Exact scoring of an edited world image against its case.

Every pixel is read as its nearest named colour (objects and backgrounds), and every object's
true masks before and after the edit are known, so each requested attribute gets a yes/no:

- colour of object i: the majority colour name over its target mask is the requested colour;
- shape of object i: the object-coloured pixels near it overlap the ideal target shape
  (IoU >= 0.5) better than they overlap the source shape;
- background: the majority colour name of the pixels that are background before and after.

Beyond success: `erosion` (how much of an edited object's target mask turned into background,
the failure that the null-text penalty is meant to prevent), background PSNR inside the edited
boxes (did the edit tint the ground around the object?), PSNR outside the edited boxes, PSNR
outside the edited objects themselves (every pixel no edited object covers before or after, so the
ground in an edited box counts: the halo a box leaves and a mask should not), and `preserved`
(objects that were not to change kept colour and shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from gas_lightning.worlds.cases import EditCase
from gas_lightning.worlds.scenes import COLOURS, PALETTE, Scene, mask_iou, nearest_colour_names

NAMES = list(PALETTE)
N_OBJECT_COLOURS = len(COLOURS)
MAX_PSNR = 60.0  # PSNR cap: identical pixels give 60 dB instead of infinity, so means stay finite
SHAPE_IOU = 0.5
ERODED = 0.5  # an edited object counts as eroded when more than half of it became background


def as_array(image: Any, size: int) -> np.ndarray:
    """uint8 (size, size, 3) from a PIL image or an HxWx3 array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"expected an HxWx3 image, got an array of shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BOX if img.size[0] > size else Image.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def _majority(labels: np.ndarray) -> str | None:
    if labels.size == 0:
        return None
    return NAMES[int(np.bincount(labels.ravel(), minlength=len(NAMES)).argmax())]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return float("nan")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse <= 0:
        return MAX_PSNR
    return min(MAX_PSNR, 10 * math.log10(255.0**2 / mse))


def _box_mask(box: tuple[int, int, int, int], size: int, pad: int = 0) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((size, size), dtype=bool)
    m[max(0, y0 - pad) : min(size, y1 + pad), max(0, x0 - pad) : min(size, x1 + pad)] = True
    return m


def _object_region(scene_a: Scene, scene_b: Scene, i: int, labels: np.ndarray) -> np.ndarray:
    """Object-coloured pixels around object i, other objects' masks excluded."""
    size = scene_a.size
    near = _box_mask(scene_a.pixel_box(i), size, pad=1) | _box_mask(scene_b.pixel_box(i), size, pad=1)
    for j in range(len(scene_a.objects)):
        if j != i:
            near &= ~(scene_a.mask(j) | scene_b.mask(j))
    return near & (labels < N_OBJECT_COLOURS)


def score(edited_image: Any, case: EditCase) -> dict[str, Any]:
    """Score one edited image. Rates are in [0, 1] (1 = good, except erosion: 0 = good).

    Returns per-attribute results (`attributes`: list of {kind, index, requested, got, ok}),
    `per_attribute` (fraction right), `all_attributes` (1.0 when all are right), the mean per
    kind (`colour`, `shape`, `background`; None when not requested), `erosion`, `eroded`,
    `bg_psnr_in_boxes`, `psnr_outside`, `psnr_outside_objects` (dB, capped at 60; NaN when there are no such pixels)
    and `preserved` (fraction of untouched objects that kept colour and shape; `untouched` lists
    them as {index, ok}).
    """
    src, tgt, size = case.source, case.target, case.size
    img = as_array(edited_image, size)
    ideal = case.target_image
    labels = nearest_colour_names(img, PALETTE)
    n = len(src.objects)
    src_cov, tgt_cov = src.coverage, tgt.coverage
    any_object = (src_cov.sum(0) > 0) | (tgt_cov.sum(0) > 0) if n else np.zeros((size, size), bool)
    background_px = ~any_object

    attributes = []
    for c in case.changes:
        if c.kind == "colour":
            got = _majority(labels[tgt.mask(c.index)])
            ok = got == c.after
        elif c.kind == "shape":
            region = _object_region(src, tgt, c.index, labels)
            iou_t, iou_s = mask_iou(region, tgt.mask(c.index)), mask_iou(region, src.mask(c.index))
            ok = iou_t >= SHAPE_IOU and iou_t > iou_s
            got = f"iou {iou_t:.2f} with {c.after}, {iou_s:.2f} with {c.before}"
        else:
            got = _majority(labels[background_px])
            ok = got == c.after
        attributes.append({"kind": c.kind, "index": c.index, "requested": c.after, "got": got, "ok": bool(ok)})

    by_kind = {}
    for kind in ("colour", "shape", "background"):
        oks = [a["ok"] for a in attributes if a["kind"] == kind]
        by_kind[kind] = float(np.mean(oks)) if oks else None

    edited = case.edited_objects
    lost = []
    for i in edited:
        m = tgt_cov[i] >= 0.9  # the interior: anti-aliased rims are half background by design
        if not m.any():
            m = tgt.mask(i)
        lost.append(float(np.mean(labels[m] >= N_OBJECT_COLOURS)) if m.any() else 0.0)

    in_boxes = np.zeros((size, size), dtype=bool)
    on_edited = np.zeros((size, size), dtype=bool)  # the edited objects themselves, before or after
    for i in edited:
        in_boxes |= _box_mask(src.pixel_box(i), size) | _box_mask(tgt.pixel_box(i), size)
        on_edited |= (src_cov[i] > 0) | (tgt_cov[i] > 0)
    bg_in = in_boxes & background_px
    outside = ~in_boxes

    untouched = []
    for i in range(n):
        if i in edited:
            continue
        o = src.objects[i]
        colour_ok = _majority(labels[src.mask(i)]) == o.colour
        shape_ok = mask_iou(_object_region(src, src, i, labels), src.mask(i)) >= SHAPE_IOU
        untouched.append({"index": i, "ok": bool(colour_ok and shape_ok)})
    kept = [u["ok"] for u in untouched]

    oks = [a["ok"] for a in attributes]
    return {
        "attributes": attributes,
        "per_attribute": float(np.mean(oks)) if oks else 1.0,
        "all_attributes": float(all(oks)),
        **by_kind,
        "erosion": float(np.mean(lost)) if lost else 0.0,
        "eroded": float(np.mean([v > ERODED for v in lost])) if lost else 0.0,
        "bg_psnr_in_boxes": _psnr(img[bg_in], ideal[bg_in]),
        "psnr_outside": _psnr(img[outside], ideal[outside]),
        "psnr_outside_objects": _psnr(img[~on_edited], ideal[~on_edited]),
        "preserved": float(np.mean(kept)) if kept else 1.0,
        "untouched": untouched,
        "n_attributes": len(oks),
    }


def aggregate(scores: Sequence[dict[str, Any]] | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases. `per_attribute` counts every attribute once (micro average); the
    per-kind rates count attributes of that kind; NaN PSNRs (no such pixels) are skipped."""
    scores = list(scores)
    out: dict[str, Any] = {"cases": len(scores)}
    if not scores:
        return out
    attrs = [a for s in scores for a in s["attributes"]]
    out["per_attribute"] = float(np.mean([a["ok"] for a in attrs])) if attrs else float("nan")
    for kind in ("colour", "shape", "background"):
        oks = [a["ok"] for a in attrs if a["kind"] == kind]
        out[kind] = float(np.mean(oks)) if oks else None
    for key in (
        "all_attributes",
        "erosion",
        "eroded",
        "bg_psnr_in_boxes",
        "psnr_outside",
        "psnr_outside_objects",
        "preserved",
    ):
        vals = [s[key] for s in scores if s.get(key) is not None and not math.isnan(s[key])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out
