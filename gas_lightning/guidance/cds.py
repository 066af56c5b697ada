"""Contrastive (CDS-style) shape preservation on UNet up-block self-attention.

The self-attention outputs of the decoder carry an object's layout. PatchNCE between the
source branch (reference, no gradient) and the edited branch pulls each edited patch towards
the source patch at the same position and away from the others: colour and texture may
change, the arrangement of parts may not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gas_lightning.errors import PlanError
from gas_lightning.masks import area_resize, box_cells, scale_cells
from gas_lightning.plan import Box, EditPlan

Region = Box | torch.Tensor  # a box, or a soft (h, w) weight on the latent grid


REDUCTIONS = ("sum", "mean")


@dataclass
class CDSConfig:
    """PatchNCE settings. The defaults are the reference's: 256 patches, sizes 1 and 2, temperature
    0.07, the loss *summed* over every hooked layer and both patch sizes with weight 1, and its
    gradient added after the DDS loss scale (not multiplied by it).

    `reduction="mean"` with `loss_scaled=True` and `weight=3` is what gas-lightning did before
    (about 330x the reference's strength on SD 1.5): kept as an explicit option.
    """

    weight: float = 1.0
    n_patches: int = 256
    patch_sizes: tuple[int, ...] = (1, 2)
    temperature: float = 0.07
    reduction: str = "sum"  # over hooked layers and patch sizes: "sum" (reference) | "mean"
    loss_scaled: bool = False  # True: the CDS gradient is multiplied by the DDS loss scale too

    def __post_init__(self) -> None:
        from gas_lightning.errors import GasError

        if self.reduction not in REDUCTIONS:
            raise GasError(f"guidance.cds.reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if not self.weight >= 0 or not self.temperature > 0 or self.n_patches < 1:
            raise GasError(
                f"guidance.cds needs weight >= 0, temperature > 0 and n_patches >= 1, got weight "
                f"{self.weight}, temperature {self.temperature}, n_patches {self.n_patches}"
            )
        if not self.patch_sizes or any(int(k) < 1 for k in self.patch_sizes):
            raise GasError(f"guidance.cds.patch_sizes must be positive integers, got {list(self.patch_sizes)}")


class SelfAttentionCapture:
    """Forward hooks on the `attn1` modules of the UNet's up blocks, active only inside `capture()`."""

    def __init__(self, unet: nn.Module):
        self.modules = [
            m for name, m in unet.named_modules() if name.startswith("up_blocks") and name.endswith("attn1")
        ]
        self._store: list[torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._store is not None:
            self._store.append(output[0] if isinstance(output, tuple) else output)

    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self._store = []
        try:
            yield self._store
        finally:
            self._store = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def coarsest_downscale(unet: nn.Module) -> int:
    """How many latent cells one cell of the coarsest hooked feature map spans (per side): up block i of
    n works at 1 / 2**(n - 1 - i) of the latent's resolution (4 for SD 1.5 and SDXL)."""
    n = len(unet.config.up_block_types)
    blocks = {
        int(name.split(".")[1])
        for name, _ in unet.named_modules()
        if name.startswith("up_blocks") and name.endswith("attn1")
    }
    return max((2 ** (n - 1 - i) for i in blocks), default=1)


def check_preserve_form_boxes(
    plan: EditPlan, latent_hw: tuple[int, int], unet: nn.Module, pixels_per_cell: int
) -> None:
    """A preserve-form box narrower or shorter than one cell of the coarsest hooked map is refused: the
    reference widens it to that one cell, where PatchNCE has no other patch to contrast with, so
    the shape loss silently does nothing there."""
    (h, w), factor = latent_hw, coarsest_downscale(unet)
    side = factor * pixels_per_cell  # pixels per coarsest cell
    for s in plan.subtasks:
        if not s.preserve_form or s.box is None:
            continue
        x0, y0, x1, y1 = s.box
        if (x1 - x0) * w < factor or (y1 - y0) * h < factor:
            raise PlanError(
                f"the preserve-form subtask '{s.source}' has a box of {(x1 - x0) * w * pixels_per_cell:.0f} x "
                f"{(y1 - y0) * h * pixels_per_cell:.0f} px, smaller than one cell of the coarsest self-attention map its "
                f"shape loss compares ({side} px at this working size); the smallest box that works is {side} x {side} "
                f"px ({factor / w:.3g} x {factor / h:.3g} of the image): enlarge the box, or set preserve_form off for it"
            )


def to_maps(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) attention tokens -> (B, C, h, w) at the resolution N implies for a height x width latent."""
    b, n, c = tokens.shape
    factor = math.sqrt(height * width / n)
    h, w = round(height / factor), round(width / factor)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def crop_at(
    region: Region, latent_hw: tuple[int, int], feature_hw: tuple[int, int]
) -> tuple[slice, slice, torch.Tensor | None]:
    """The rows and columns of a (feature_h, feature_w) map that the region covers, and for a soft mask
    its weight on those cells (None for a box).

    A box as the reference crops: its cells on the latent grid (`box_cells`), each edge divided by the
    map's downscale and rounded, an empty side widened to one cell. A mask: the bounding box of its
    area-averaged weight at the map's resolution.
    """
    (h, w), (hf, wf) = latent_hw, feature_hw
    if isinstance(region, torch.Tensor):
        weights = area_resize(region, hf, wf)
        rows, cols = torch.nonzero(weights > 0, as_tuple=True)
        if len(rows) == 0:
            return slice(0, 0), slice(0, 0), weights[:0, :0]
        r, c = slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)
        return r, c, weights[r, c]
    r0, r1, c0, c1 = scale_cells(box_cells(region, h, w), h / hf)
    return slice(r0, r1), slice(c0, c1), None


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., a, b) average-pooled in size x size windows as the reference: a side of one cell is not pooled."""
    a, b = x.shape[-2:]
    kernel = (1 if a == 1 else size, 1 if b == 1 else size)
    if size == 1 or kernel == (1, 1):
        return x
    lead = x.shape[:-2]
    return F.avg_pool2d(x.reshape(-1, 1, a, b), kernel, kernel).reshape(*lead, a // kernel[0], b // kernel[1])


def patch_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: slice,
    cols: slice,
    weights: torch.Tensor | None,
    cfg: CDSConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """PatchNCE between the edited branch's (`query`) and the source branch's (`key`) (C, h, w) feature
    maps, both cropped to `rows`, `cols` first and then pooled (the reference's order); positives share
    a position, anchors are the source patches.

    `weights` (the crop's soft-mask weights, None for a box) weight each patch's cross-entropy. For a
    box the weights are all 1: the reference's mean. For a mask the crop is the mask's bounding box
    rather than its cells because PatchNCE's negatives are the other patches drawn: the ground just
    outside the object is what the object's patches must stay distinct from, so keeping those patches
    as negatives holds the outline in place. Weighting the anchors by the mask holds only the object
    itself: the ground around it stays free to change (a box would hold it too, leaving a box-shaped
    halo), and a soft edge counts in proportion. One cross-entropy per patch size, combined by
    `cfg.reduction` (summed in the reference).
    """
    total = query.new_zeros((), dtype=torch.float32)
    count = 0
    q0, k0 = query[:, rows, cols].float(), key[:, rows, cols].float()
    w0 = weights if weights is not None else torch.ones(q0.shape[-2:], device=q0.device)
    for size in cfg.patch_sizes:
        q, k, wt = _pool(q0, size), _pool(k0, size), _pool(w0.to(q0.device), size)
        qf, kf, wf = q.flatten(1).T, k.flatten(1).T, wt.flatten()  # (P, C), (P, C), (P,)
        p = qf.shape[0]
        if p < 2:  # one patch: its only negative is itself, masked out by the reference: no loss
            continue
        idx = torch.randperm(p, generator=generator)[: cfg.n_patches].to(q.device)
        anchor = wf[idx]
        if not anchor.sum() > 0:
            continue
        qf = F.normalize(qf[idx], dim=1)
        kf = F.normalize(kf[idx], dim=1)
        # As the reference's CutLoss.PatchNCELoss: each row anchors a source patch (`key`, no gradient)
        # and its softmax runs over the edited branch's patches.
        logits = kf @ qf.T / cfg.temperature
        ce = F.cross_entropy(logits, torch.arange(len(idx), device=q.device), reduction="none")
        total = total + (anchor * ce).sum() / anchor.sum()
        count += 1
    return total if cfg.reduction == "sum" else total / max(count, 1)
