"""Contrastive (CDS-style) shape preservation on UNet up-block self-attention.

The self-attention outputs of the decoder carry an object's layout. PatchNCE between the
source branch (reference, no gradient) and the edited branch pulls each edited patch towards
the source patch at the same position and away from the others: colour and texture may
change, the arrangement of parts may not.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gas_lightning.masks import box_to_grid
from gas_lightning.plan import Box


@dataclass
class CDSConfig:
    """PatchNCE settings (CDS defaults: 256 patches, sizes 1 and 2, temperature 0.07)."""

    weight: float = 3.0
    n_patches: int = 256
    patch_sizes: tuple[int, ...] = (1, 2)
    temperature: float = 0.07


class SelfAttentionCapture:
    """Forward hooks on the `attn1` modules of the UNet's up blocks, active only inside `capture()`."""

    def __init__(self, unet: nn.Module):
        self.modules = [m for name, m in unet.named_modules() if name.startswith("up_blocks") and name.endswith("attn1")]
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


def to_maps(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) attention tokens -> (B, C, h, w) at the resolution N implies for a height x width latent."""
    b, n, c = tokens.shape
    factor = math.sqrt(height * width / n)
    h, w = round(height / factor), round(width / factor)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def patch_nce(
    query: torch.Tensor, key: torch.Tensor, box: Box, cfg: CDSConfig, generator: torch.Generator
) -> torch.Tensor:
    """PatchNCE between two (C, h, w) feature maps inside `box`; positives share a position."""
    total = query.new_zeros(())
    count = 0
    for size in cfg.patch_sizes:
        q, k = query, key
        if size > 1:
            if min(q.shape[-2:]) < size:
                continue
            q = F.avg_pool2d(q[None], size, size)[0]
            k = F.avg_pool2d(k[None], size, size)[0]
        region = box_to_grid(box, q.shape[-2], q.shape[-1]).bool().to(q.device)
        qf = q[:, region].T  # (P, C)
        kf = k[:, region].T
        p = qf.shape[0]
        if p < 2:
            continue
        idx = torch.randperm(p, generator=generator)[: cfg.n_patches].to(q.device)
        qf = F.normalize(qf[idx].float(), dim=1)
        kf = F.normalize(kf[idx].float(), dim=1)
        logits = qf @ kf.T / cfg.temperature
        total = total + F.cross_entropy(logits, torch.arange(len(idx), device=q.device))
        count += 1
    return total / max(count, 1)
