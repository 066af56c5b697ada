"""What every box source shares: the `Grounder` protocol, filling a plan's boxes, a picture.

A grounder answers one question, "where is each of these phrases?", so the detectors stay
independent of plans. `ground_plan` is the one place that decides which subtasks need a box
and what happens when a phrase is not found (error, or the whole image when asked for).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gas_lightning.errors import GroundingError
from gas_lightning.plan import WHOLE_IMAGE, Box, EditPlan

log = logging.getLogger(__name__)

FALLBACK_HINT = (
    "lower --box_threshold / --text_threshold, give the boxes yourself with "
    "--boxes '[[x0, y0, x1, y1], ...]' (normalised to [0, 1]), or pass "
    "--grounding_fallback whole_image to edit the whole image for such phrases"
)


class GroundingMiss(GroundingError):
    """Some phrases were not found; `boxes` holds what was found (None for the misses).

    Carrying the partial result lets `ground_plan` apply the whole-image fallback without
    running the detector twice.
    """

    def __init__(self, message: str, boxes: Sequence[Box | None], missing: Sequence[str]):
        super().__init__(message)
        self.boxes = list(boxes)
        self.missing = list(missing)


@runtime_checkable
class Grounder(Protocol):
    """Anything that returns one normalised xyxy box per phrase, in order.

    Implementations raise `GroundingMiss` (a GroundingError) when a phrase is not found.
    """

    def ground(self, image: Image.Image, phrases: list[str]) -> list[Box]: ...


def ground_plan(
    plan: EditPlan,
    image: Image.Image,
    grounder: Grounder | None,
    fallback_whole_image: bool = False,
) -> EditPlan:
    """Return `plan` with a box for every subtask; boxes already given are kept as they are.

    The detector is queried once with the source phrases of the unboxed subtasks, in order; a
    phrase that occurs twice ("the dog" for each of two dogs) asks for two different boxes, and
    the grounder gives its later occurrences the next-best box.
    """
    todo = [i for i, s in enumerate(plan.subtasks) if s.box is None]
    if not todo:
        return plan
    phrases = [plan.subtasks[i].source for i in todo]
    if grounder is None:
        raise GroundingError(
            f"no box for {', '.join(repr(p) for p in phrases)} and no detector configured: "
            "give --boxes '[[x0, y0, x1, y1], ...]' or a detector with --detector ID_OR_PATH."
        )
    try:
        found: list[Box | None] = list(grounder.ground(image, phrases))
    except GroundingMiss as miss:
        if not fallback_whole_image:
            raise
        found = miss.boxes
        for phrase in miss.missing:
            log.warning("'%s' was not found in the image; its subtask edits the whole image.", phrase)
    if len(found) != len(phrases):
        raise GroundingError(
            f"the detector returned {len(found)} boxes for {len(phrases)} phrases; this is a bug in the grounder."
        )
    detected = iter(WHOLE_IMAGE if b is None else b for b in found)
    boxes = [s.box if s.box is not None else next(detected) for s in plan.subtasks]
    return plan.with_boxes(boxes)


_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
]


MASK_OPACITY = 0.45


def _paint_masks(canvas: Image.Image, plan: EditPlan) -> Image.Image:
    """Tint each masked subtask's pixels with its colour, in proportion to the mask's weight."""
    from gas_lightning.masks import mask_to_grid, read_mask

    w, h = canvas.size
    out = np.asarray(canvas, dtype=np.float32)
    for k, s in enumerate(plan.subtasks):
        if s.mask is None:
            continue
        weights = mask_to_grid(read_mask(s.mask, s.mask_label, f"mask of '{s.source}'"), h, w).numpy()[..., None]
        out = out * (1 - MASK_OPACITY * weights) + np.asarray(_COLOURS[k % len(_COLOURS)]) * MASK_OPACITY * weights
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def draw_grounding(image: Image.Image, plan: EditPlan, path: str | Path) -> Path:
    """Write `image` with each subtask's mask (tinted), box and "k: source -> target" label.

    This is what a user looks at (with --plan_only) before spending GPU time on an edit.
    """
    canvas = _paint_masks(image.convert("RGB").copy(), plan)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    w, h = canvas.size
    width = max(1, round(min(w, h) / 150))
    unboxed = []
    for k, s in enumerate(plan.subtasks):
        label = f"{k}: {s.source} -> {s.target}" + (" (mask)" if s.mask is not None else "")
        if s.box is None:
            unboxed.append(label + " (no box)")
            continue
        colour = _COLOURS[k % len(_COLOURS)]
        x0, y0, x1, y1 = s.box
        xy = (x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1))
        draw.rectangle(xy, outline=colour, width=width)
        tx, ty = xy[0] + width, xy[1] + width
        left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    y = 2
    for label in unboxed:
        draw.text((2, y), label, fill=(255, 255, 0), font=font)
        y += 12
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
