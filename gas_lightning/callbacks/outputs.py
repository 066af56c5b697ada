"""The final outputs of an edit, written once by rank zero when fitting ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from gas_lightning.callbacks.previews import mask_overlay
from gas_lightning.pipeline import tensor_to_image


def _viewable(image, min_side: int):
    """Integer nearest-neighbour upscale so that tiny (pixel-world) outputs can be looked at."""
    factor = max(1, -(-min_side // min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), resample=0)


class EditOutputs(Callback):
    """edited.png, comparison.png (source | edited), masks.png and plan.json in `output_dir`.

    edited.png is at the working size; comparison.png and masks.png are upscaled (nearest) to at
    least `min_view_side` pixels high, for viewing.
    """

    def __init__(self, output_dir: str | Path, min_view_side: int = 256):
        self.output_dir = Path(output_dir)
        self.min_view_side = int(min_view_side)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        pl_module.plan.save(self.output_dir / "plan.json")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = pl_module.decode(pl_module.z_src).cpu()
        edited = pl_module.decode().cpu()
        tensor_to_image(edited).save(self.output_dir / "edited.png")
        side = self.min_view_side
        _viewable(tensor_to_image(torch.cat([source, edited], dim=-1)), side).save(self.output_dir / "comparison.png")
        overlay = mask_overlay(source, pl_module.masks.subtasks.cpu())
        _viewable(tensor_to_image(overlay), side).save(self.output_dir / "masks.png")
        torch.save({"latent": pl_module.latent.detach().cpu(), "step": trainer.global_step}, self.output_dir / "latent.pt")


class FinalCheckpoint(Callback):
    """`last.ckpt` at the very end (ModelCheckpoint only saves on its interval) and `interrupted.ckpt`
    when the run dies or is stopped with Ctrl-C, so no optimisation step is lost.

    Lightning's OnExceptionCheckpoint is not used: its presence makes a plain `fit()` resume from
    "last" silently, and an edit must only resume when the user says `--resume`.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.dirpath / "last.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        trainer.save_checkpoint(self.dirpath / "interrupted.ckpt")
