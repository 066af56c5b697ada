"""Regions to latent-grid weights: boxes, painted masks and segmenter masks.

Every subtask's region becomes an (h, w) weight in [0, 1] on the latent grid. A box covers
whole cells, its edges rounded to the nearest cell edge (binary, as the reference). A mask is
averaged over each cell's area, so an outline becomes fractional weights instead of stair-steps
when a 512-pixel mask meets a 64-cell grid. Where one region sits mostly inside another (a cup on
a table), the larger region's weight is capped on the overlap at 1 - (1 - overlap_weight) * (the
smaller region's weight): `overlap_weight` where the smaller one is whole, which is the reference's
rule for boxes, and proportionally less where its edge is soft. The whole-scene term is masked by the union (the maximum) of the subtask regions.

A mask reaches a plan as a string: a PNG path, or a `data:image/png;base64,` URI for masks made
in memory (a segmenter's, or a painted array), so plan.json records exactly what was used.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from gas_lightning.errors import PlanError
from gas_lightning.plan import WHOLE_IMAGE, Box, EditPlan

OVERLAP_WEIGHT = 0.3
DATA_URI = "data:image/png;base64,"
ASPECT_TOLERANCE = 0.01  # masks whose aspect differs from the image's by more are stretched, with a warning

MaskLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
Region = Union[Box, None, torch.Tensor]  # a box, the whole image, or a ready (h, w) grid weight

log = logging.getLogger(__name__)

_HOW = "paint the object white (255) on black (0) in a grey PNG of the image's size"


def box_cells(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of a normalised xyxy box on a (height, width) grid, as the reference:
    each edge rounded to the nearest cell edge (Python's round), at least one cell, inside the grid."""
    x0, y0, x1, y1 = box
    r0, c0 = min(round(y0 * height), height - 1), min(round(x0 * width), width - 1)
    r1, c1 = max(min(round(y1 * height), height), r0 + 1), max(min(round(x1 * width), width), c0 + 1)
    return r0, r1, c0, c1


def scale_cells(cells: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    """Latent-grid cells at a grid `factor` times coarser, as the reference crops CDS feature maps:
    each latent cell edge divided by the factor and rounded, an empty side widened to one cell."""
    r0, r1, c0, c1 = (round(v / factor) for v in cells)
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def box_to_grid(box: Box, height: int, width: int) -> torch.Tensor:
    """Binary (height, width) mask of a box's cells (`box_cells`): the subtask masks, as the reference."""
    r0, r1, c0, c1 = box_cells(box, height, width)
    mask = torch.zeros(height, width)
    mask[r0:r1, c0:c1] = 1.0
    return mask


def box_cover(box: Box, height: int, width: int) -> torch.Tensor:
    """Binary (height, width) mask of every cell a box touches, partly covered ones included (metrics'
    "inside the boxes": a pixel the box touches is not outside it)."""
    x0, y0, x1, y1 = box
    r0, r1 = math.floor(y0 * height), max(math.ceil(y1 * height), math.floor(y0 * height) + 1)
    c0, c1 = math.floor(x0 * width), max(math.ceil(x1 * width), math.floor(x0 * width) + 1)
    mask = torch.zeros(height, width)
    mask[min(r0, height - 1) : min(r1, height), min(c0, width - 1) : min(c1, width)] = 1.0
    return mask


# reading ------------------------------------------------------------------------------------
def _open(source: str, what: str) -> Image.Image:
    if source.startswith("data:"):
        if not source.startswith(DATA_URI):
            raise PlanError(f"{what} is a data URI but not '{DATA_URI}...'; give a PNG path or a base64 PNG")
        try:
            raw = base64.b64decode(source[len(DATA_URI) :], validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return im.copy()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
            raise PlanError(f"{what}: the data URI does not hold a readable PNG") from None
    p = Path(source)
    if not p.is_file():
        raise PlanError(
            f"{what} {source!r} "
            + ("is a folder" if p.is_dir() else "does not exist")
            + f"; pass an existing PNG ({_HOW})"
        )
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise PlanError(f"{what} {source!r} cannot be read as an image ({e}); {_HOW}") from None


def _grey(image: Image.Image) -> np.ndarray:
    """A painted mask as weights: alpha where the image has transparency, else its grey level."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255.0
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.mode in ("I",) or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float32)
        return np.clip(arr / (65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0), 0.0, 1.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _labels(image: Image.Image, what: str) -> np.ndarray:
    """Raw pixel values of a label map (palette indices for a palette PNG)."""
    if image.mode not in ("L", "P", "I", "1") and not image.mode.startswith("I;16"):
        raise PlanError(
            f"{what} is a {image.mode} image, but a label map must have one channel (grey or palette) "
            "whose value k marks subtask k (0: no subtask)"
        )
    return np.asarray(image).astype(np.int64)


def read_mask(source: MaskLike, label: int | None = None, what: str = "mask") -> np.ndarray:
    """Any mask form -> float32 (H, W) weights in [0, 1]; `label` picks one value of a label map.

    Paths and data URIs are PNGs; arrays and tensors are (H, W) (or with one channel), bool,
    uint8 (0..255) or float in [0, 1]. An empty mask is an error: it would switch its subtask off
    silently; give intensity 0 for that.
    """
    if isinstance(source, (str, Path)):
        image = _open(str(source), what)
        arr = (_labels(image, what) == label).astype(np.float32) if label is not None else _grey(image)
    elif isinstance(source, Image.Image):
        arr = (_labels(source, what) == label).astype(np.float32) if label is not None else _grey(source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        arr = _array(source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source, label, what)
    else:
        raise PlanError(
            f"{what} must be a PNG path, a PIL image, a numpy array or a tensor, got {type(source).__name__}"
        )
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise PlanError(f"{what} must be one (height, width) plane, got shape {tuple(arr.shape)}")
    if not arr.max() > 0:
        hint = f"no pixel has the value {label}" if label is not None else "no pixel is above 0"
        raise PlanError(f"{what} is empty ({hint}); {_HOW}, or remove the subtask")
    return arr


def label_values(source: str, what: str = "label map") -> list[int]:
    """The distinct non-zero values of a label-map PNG."""
    values = np.unique(_labels(_open(source, what), what))
    return [int(v) for v in values if v != 0]


def _array(arr: np.ndarray, label: int | None, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if label is not None:
        return (arr == label).astype(np.float32)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise PlanError(f"{what} holds values outside [0, 1] (or NaN); give weights in [0, 1], a bool or a uint8 mask")
    return arr


def mask_image(weights: np.ndarray) -> Image.Image:
    """(H, W) weights in [0, 1] -> an 8-bit grey image: how a mask made in memory is stored (soft edges kept)."""
    return Image.fromarray(np.clip(np.rint(np.asarray(weights, dtype=np.float32) * 255), 0, 255).astype(np.uint8))


def encode_mask(weights: np.ndarray) -> str:
    """(H, W) weights in [0, 1] -> a PNG data URI (8-bit grey): a mask made in memory, as plan data."""
    buf = io.BytesIO()
    mask_image(weights).save(buf, format="PNG", optimize=True)
    return DATA_URI + base64.b64encode(buf.getvalue()).decode("ascii")


def mask_bbox(weights: np.ndarray) -> Box:
    """Normalised xyxy box around the pixels with weight above 0."""
    rows, cols = np.nonzero(weights > 0)
    h, w = weights.shape
    return (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)


def check_aspect(mask_size: tuple[int, int], image_size: tuple[int, int], what: str = "mask") -> None:
    """Masks of another size are resized; warn only when that stretches them (the aspect differs)."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if abs((mw / mh) / (iw / ih) - 1.0) > ASPECT_TOLERANCE:
        log.warning(
            "%s is %dx%d but the image is %dx%d: a different aspect, so the mask is stretched to the image; "
            "paint masks at the image's size",
            what,
            mw,
            mh,
            iw,
            ih,
        )


def _area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): the share of output cell i's extent that input pixel p covers."""
    scale = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * scale
    p = torch.arange(n_in, dtype=torch.float64)[None, :]
    return ((torch.minimum(lo + scale, p + 1) - torch.maximum(lo, p)).clamp(min=0) / scale).float()


def area_resize(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) -> (height, width), each cell the mean of the weights over its exact (fractional) area.

    Written as two small matrices because pooling layers and PIL's box filter count whole pixels
    (by window or by pixel centre), which steps when the grid does not divide the mask. A mask
    smaller than the grid is enlarged bilinearly instead, so it does not turn into blocks either.
    """
    mh, mw = weights.shape
    if (mh, mw) == (height, width):
        return weights.float()
    if mh < height or mw < width:
        return F.interpolate(weights.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)[
            0, 0
        ].clamp(0.0, 1.0)
    rows, cols = _area_matrix(mh, height).to(weights.device), _area_matrix(mw, width).to(weights.device)
    return rows @ weights.float() @ cols.T


def mask_to_grid(weights: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(H, W) weights -> (height, width) soft weights on the latent grid (see `area_resize`)."""
    return area_resize(torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)), height, width)


# plans ---------------------------------------------------------------------------------------
def attach_masks(plan: EditPlan, masks: Sequence[MaskLike | None]) -> EditPlan:
    """The plan with in-memory masks (one per subtask; None keeps that subtask's region) as data
    URIs, and for a subtask without a box, the mask's bounding box (for pictures and area rules)."""
    if isinstance(masks, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
        masks = [masks]
    if len(masks) != len(plan.subtasks):
        raise PlanError(
            f"{len(masks)} masks for {len(plan.subtasks)} subtasks "
            f"({', '.join(repr(s.source) for s in plan.subtasks)}): give one per subtask, in order "
            "(null/None for a subtask that keeps its box)"
        )
    out = []
    for s, m in zip(plan.subtasks, masks):
        if m is None:
            out.append(s)
            continue
        weights = read_mask(m, what=f"mask of '{s.source}'")
        uri = str(m) if isinstance(m, (str, Path)) else encode_mask(weights)
        out.append(replace(s, mask=uri, mask_label=None, box=s.box if s.box is not None else mask_bbox(weights)))
    return plan.replace_subtasks(out)


def check_plan_masks(plan: EditPlan, image_size: tuple[int, int] | None = None) -> EditPlan:
    """Read every mask of the plan once (a bad one fails here, before any model loads), warn about
    stretched ones, and give a masked subtask without a box its mask's bounding box."""
    out = []
    for s in plan.subtasks:
        if s.mask is None:
            out.append(s)
            continue
        weights = read_mask(s.mask, s.mask_label, what=f"mask of '{s.source}'")
        if image_size is not None:
            check_aspect((weights.shape[1], weights.shape[0]), image_size, f"mask of '{s.source}'")
        out.append(s if s.box is not None else replace(s, box=mask_bbox(weights)))
    return plan.replace_subtasks(out)


# the overlap rule and the union ---------------------------------------------------------------
def apply_overlap(regions: torch.Tensor, overlap_weight: float = OVERLAP_WEIGHT) -> torch.Tensor:
    """Cap region k on region j where j is the smaller share-holder of their overlap (see module doc)."""
    areas = regions.sum(dim=(1, 2))
    n = regions.shape[0]
    out = regions.clone()
    for k in range(n):
        for j in range(n):
            if j == k:
                continue
            inter = (regions[k] * regions[j]).sum()
            # region j lies mostly inside region k: the overlap is a larger share of j than of k.
            if inter > 0 and inter / areas[j] > inter / areas[k]:
                out[k] = torch.minimum(out[k], 1.0 - (1.0 - overlap_weight) * regions[j])
    return out


def region_grid(region: Region, height: int, width: int) -> torch.Tensor:
    if isinstance(region, torch.Tensor):
        return region.float()
    return box_to_grid(region if region is not None else WHOLE_IMAGE, height, width)


def subtask_masks(
    regions: Sequence[Region],
    height: int,
    width: int,
    overlap_weight: float = OVERLAP_WEIGHT,
) -> torch.Tensor:
    """(n, height, width) masks with the overlap rule applied; a missing region is the whole image."""
    if not regions:
        return torch.zeros(0, height, width)
    return apply_overlap(torch.stack([region_grid(r, height, width) for r in regions]), overlap_weight)


def union_mask(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The union (elementwise maximum) of the subtask regions; all ones when there are no subtasks.

    For boxes this is binary: the smallest region covering a cell is never lowered there.
    """
    if masks.shape[0] == 0:
        return torch.ones(height, width)
    return masks.amax(dim=0)


@dataclass(frozen=True)
class EditMasks:
    """Masks of one plan at one latent resolution.

    `subtasks` is what each term's gradient is multiplied by (after the overlap rule); `regions`
    holds, for a subtask with a mask, its own soft weight before that rule (the preserve-form
    term's region), and None for a box.
    """

    subtasks: torch.Tensor  # (n, h, w)
    full: torch.Tensor  # (h, w)
    regions: tuple[torch.Tensor | None, ...] = ()

    @classmethod
    def from_plan(
        cls,
        plan: EditPlan,
        height: int,
        width: int,
        overlap_weight: float = OVERLAP_WEIGHT,
        masks: Sequence[MaskLike | None] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> EditMasks:
        """`masks`: in-memory masks (PIL, numpy, tensor or path), one per subtask, None where the
        plan's own mask or box applies. `image_size` (width, height) enables the stretch warning."""
        if masks is not None and len(masks) != len(plan.subtasks):
            raise PlanError(
                f"{len(masks)} masks for {len(plan.subtasks)} subtasks: give one per subtask (None: its box)"
            )
        soft: list[torch.Tensor | None] = []
        for i, s in enumerate(plan.subtasks):
            given = masks[i] if masks is not None else None
            if given is None and s.mask is None:
                soft.append(None)
                continue
            what = f"mask of '{s.source}'"
            weights = read_mask(given, what=what) if given is not None else read_mask(s.mask, s.mask_label, what)
            if image_size is not None:
                check_aspect((weights.shape[1], weights.shape[0]), image_size, what)
            soft.append(mask_to_grid(weights, height, width))
        regions = [r if r is not None else s.box for r, s in zip(soft, plan.subtasks)]
        raw = (
            torch.stack([region_grid(r, height, width) for r in regions]) if regions else torch.zeros(0, height, width)
        )
        subtasks = apply_overlap(raw, overlap_weight)
        return cls(subtasks=subtasks, full=union_mask(raw, height, width), regions=tuple(soft))
