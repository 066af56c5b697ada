"""Previews of the edit while it runs: TensorBoard images and PNG files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from gas_lightning.io import atomic_write
from gas_lightning.pipeline import tensor_to_image

if TYPE_CHECKING:
    from PIL import Image


def save_png(image, path: Path) -> None:
    """A PIL image as PNG, atomically: a kill mid-write leaves the old file or none, never half a PNG."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def mask_overlay(source: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Source image (1, 3, H, W in [0, 1]) tinted red by the strongest subtask mask weight."""
    if masks.shape[0] == 0:
        return source
    heat = F.interpolate(masks.max(dim=0).values[None, None].float(), size=source.shape[-2:], mode="nearest")
    red = torch.tensor([1.0, 0.1, 0.1]).view(1, 3, 1, 1)
    return source * (1 - 0.5 * heat) + red * 0.5 * heat


class EditPreviews(Callback):
    """Every `every_n_steps`, the decoded current image to TensorBoard, to `<output_dir>/previews/`
    and to each sink added with `add_sink` (the web app's page), so every viewer sees the same pictures."""

    def __init__(self, every_n_steps: int = 50, save_png: bool = True):
        self.every_n_steps = int(every_n_steps)
        self.save_png = save_png
        self._sinks: list[Callable[[Image.Image, int], None]] = []

    def add_sink(self, sink: Callable[[Image.Image, int], None]) -> None:
        """Also hand each preview (a PIL image at the working size, and its step) to `sink`."""
        self._sinks.append(sink)

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "previews"

    def _log(self, trainer: L.Trainer, tag: str, image: torch.Tensor, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, image[0].clamp(0, 1).cpu(), global_step=step)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = pl_module.decode(pl_module.z_src).cpu()
        self._log(trainer, "inputs/source", source, 0)
        self._log(trainer, "inputs/masks", mask_overlay(source, pl_module.masks.subtasks.cpu()), 0)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        image = pl_module.decode().cpu()
        self._log(trainer, "edit/preview", image, step)
        if self.save_png or self._sinks:
            picture = tensor_to_image(image)
            if self.save_png:
                save_png(picture, self._dir(trainer) / f"step_{step:06d}.png")
            for sink in self._sinks:
                sink(picture, step)
