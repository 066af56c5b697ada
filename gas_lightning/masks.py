"""Boxes to latent-grid masks.

Each subtask's gradient is confined to its box. Where one box sits mostly inside another (a
cup on a table), the larger box's mask is lowered to `overlap_weight` on the overlap so the
smaller, more specific subtask owns that area. The whole-scene term is masked by the union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from gas_lightning.plan import WHOLE_IMAGE, Box, EditPlan

OVERLAP_WEIGHT = 0.3


def box_to_grid(box: Box, height: int, width: int) -> torch.Tensor:
    """Binary (height, width) mask of the latent cells a normalised xyxy box touches.

    Start edges round down and end edges round up so that a box never loses the cells it
    partly covers, and every box covers at least one cell.
    """
    x0, y0, x1, y1 = box
    r0, r1 = math.floor(y0 * height), max(math.ceil(y1 * height), math.floor(y0 * height) + 1)
    c0, c1 = math.floor(x0 * width), max(math.ceil(x1 * width), math.floor(x0 * width) + 1)
    mask = torch.zeros(height, width)
    mask[min(r0, height - 1) : min(r1, height), min(c0, width - 1) : min(c1, width)] = 1.0
    return mask


def subtask_masks(
    boxes: Sequence[Box | None], height: int, width: int, overlap_weight: float = OVERLAP_WEIGHT
) -> torch.Tensor:
    """(n, height, width) masks with the overlap rule applied; a missing box is the whole image."""
    binary = [box_to_grid(b if b is not None else WHOLE_IMAGE, height, width) for b in boxes]
    masks = [m.clone() for m in binary]
    for k, mk in enumerate(binary):
        area_k = mk.sum()
        for j, mj in enumerate(binary):
            if j == k:
                continue
            overlap = mk * mj
            inter = overlap.sum()
            if inter == 0:
                continue
            # b_j lies mostly inside b_k: the overlap is a larger share of b_j than of b_k.
            if inter / mj.sum() > inter / area_k:
                masks[k] = torch.where(overlap > 0, torch.minimum(masks[k], torch.tensor(overlap_weight)), masks[k])
    if not masks:
        return torch.zeros(0, height, width)
    return torch.stack(masks)


def union_mask(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Binary union of the subtask regions; all ones when there are no subtasks."""
    if masks.shape[0] == 0:
        return torch.ones(height, width)
    return (masks > 0).any(dim=0).float()


@dataclass(frozen=True)
class EditMasks:
    """Masks of one plan at one latent resolution."""

    subtasks: torch.Tensor  # (n, h, w)
    full: torch.Tensor  # (h, w)

    @classmethod
    def from_plan(cls, plan: EditPlan, height: int, width: int, overlap_weight: float = OVERLAP_WEIGHT) -> "EditMasks":
        m = subtask_masks([s.box for s in plan.subtasks], height, width, overlap_weight)
        return cls(subtasks=m, full=union_mask(m, height, width))
