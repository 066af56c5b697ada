"""Boxes to object masks: SAM through transformers, and the step that puts masks into a plan.

A box holds the corners of the ground around an object: an edit of the ground stops there
and a keep subtask holds the old ground in them (the halo). A segmenter prompted with the
box returns the object itself. It runs after grounding, so the boxes may be the user's or the
detector's; its masks enter the plan as PNG data URIs, and plan.json records what was used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from gas_lightning.errors import ModelLoadError
from gas_lightning.grounding.gdino_hf import resolve_device
from gas_lightning.plan import WHOLE_IMAGE, Box, EditPlan

log = logging.getLogger(__name__)

EXAMPLE_SAM = "facebook/sam-vit-base"


@runtime_checkable
class Segmenter(Protocol):
    """Anything that returns one (H, W) weight map in [0, 1] per box, at the image's size, in order."""

    def segment(self, image: Image.Image, boxes: Sequence[Box], phrases: Sequence[str]) -> list[np.ndarray]: ...


def box_pixels(box: Box, width: int, height: int) -> list[float]:
    """Normalised xyxy -> pixel xyxy, the form SAM's processor takes."""
    x0, y0, x1, y1 = box
    return [x0 * width, y0 * height, x1 * width, y1 * height]


def inside_box(weights: np.ndarray, box: Box, margin: float = 0.01) -> np.ndarray:
    """Zero the weights outside the box grown by `margin` of the image side (at least one pixel):
    the subtask was grounded there and a mask spilling far out of it would edit its neighbours,
    but a soft rim or a tight detector box may cross the edge by a pixel or two."""
    h, w = weights.shape
    x0, y0, x1, y1 = box
    my, mx = max(1, round(margin * h)), max(1, round(margin * w))
    keep = np.zeros_like(weights)
    keep[
        max(0, int(np.floor(y0 * h)) - my) : int(np.ceil(y1 * h)) + my,
        max(0, int(np.floor(x0 * w)) - mx) : int(np.ceil(x1 * w)) + mx,
    ] = 1.0
    return weights * keep


def load_sam(name: str, device: torch.device) -> tuple[Any, Any]:
    """SamProcessor and SamModel from a local folder (local_files_only: never a download)."""
    from transformers import SamModel, SamProcessor

    from gas_lightning.io import looks_like_path

    source = os.path.expanduser(str(name))
    how = (
        f"Pass --segmenter /local/path to a SAM folder saved with save_pretrained (config.json, weights, "
        f"processor config), e.g. made on a machine with internet by `hf download {EXAMPLE_SAM} --local-dir "
        "/local/path`; nothing is downloaded here."
    )
    if looks_like_path(str(name)) and not Path(source).is_dir():
        raise ModelLoadError(f"segmenter folder {str(name)!r} does not exist or is not a folder. {how}")
    try:
        processor = SamProcessor.from_pretrained(source, local_files_only=True)
        model = SamModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as e:
        log.debug("loading segmenter %r failed", name, exc_info=True)
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"could not load the SAM segmenter {str(name)!r}: {reason}. {how}") from None
    return processor, model.to(device).eval()


class SamSegmenter:
    """Segment Anything, prompted with each box; of its three candidate masks the one SAM scores
    best (predicted IoU) is kept, as in SAM's own box-prompt usage."""

    def __init__(self, model: str, device: str | torch.device = "cpu"):
        self.name = str(model)
        self.device = resolve_device(device)
        self.processor, self.model = load_sam(self.name, self.device)

    def __repr__(self) -> str:
        return f"SamSegmenter(model={self.name!r}, device='{self.device}')"

    @torch.inference_mode()
    def segment(self, image: Image.Image, boxes: Sequence[Box], phrases: Sequence[str] = ()) -> list[np.ndarray]:
        rgb = image.convert("RGB")
        prompts = [[box_pixels(b, *rgb.size) for b in boxes]]
        inputs = self.processor(images=rgb, input_boxes=prompts, return_tensors="pt").to(self.device)
        out = self.model(**inputs, multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]
        best = out.iou_scores[0].float().cpu().argmax(dim=-1)  # (n_boxes,)
        return [masks[i, int(best[i])].numpy().astype(np.float32) for i in range(len(boxes))]


SEGMENT_SCOPES = ("all", "same_outline")


def segment_plan(plan: EditPlan, image: Image.Image, segmenter: Segmenter, scope: str = "all") -> EditPlan:
    """Give every boxed subtask without a mask the segmenter's mask of its box, in one call.

    A whole-image box (a background, or the grounding fallback) keeps the whole image: prompted
    with the whole frame a segmenter returns some object, not the ground. A subtask whose mask
    comes back empty keeps its box, with a warning. scope "same_outline" masks only the subtasks
    that keep their object's outline (`Subtask.keeps_outline`); a shape change keeps its box, since the
    mask is the old shape and the new one must grow past it.
    """
    from gas_lightning.masks import attach_masks

    if scope not in SEGMENT_SCOPES:
        raise ValueError(f"segment scope must be one of {SEGMENT_SCOPES}, got {scope!r}")
    todo = [
        i
        for i, s in enumerate(plan.subtasks)
        if s.box is not None and s.mask is None and s.box != WHOLE_IMAGE and (scope == "all" or s.keeps_outline)
    ]
    if not todo:
        return plan
    found = segmenter.segment(image, [plan.subtasks[i].box for i in todo], [plan.subtasks[i].source for i in todo])
    masks: list[np.ndarray | None] = [None] * len(plan.subtasks)
    for i, weights in zip(todo, found):
        weights = inside_box(np.asarray(weights, dtype=np.float32), plan.subtasks[i].box)
        if weights.max() > 0:
            masks[i] = weights
        else:
            log.warning(
                "the segmenter found nothing in the box of '%s'; that subtask keeps its box", plan.subtasks[i].source
            )
    return attach_masks(plan, masks)
