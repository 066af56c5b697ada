"""The final outputs of an edit, written once by rank zero when fitting ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from gas_lightning.callbacks.previews import mask_overlay
from gas_lightning.pipeline import tensor_to_image


class EditOutputs(Callback):
    """edited.png, comparison.png (source | edited), masks.png and plan.json in `output_dir`."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        pl_module.plan.save(self.output_dir / "plan.json")

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = pl_module.decode(pl_module.z_src).cpu()
        edited = pl_module.decode().cpu()
        tensor_to_image(edited).save(self.output_dir / "edited.png")
        tensor_to_image(torch.cat([source, edited], dim=-1)).save(self.output_dir / "comparison.png")
        tensor_to_image(mask_overlay(source, pl_module.masks.subtasks.cpu())).save(self.output_dir / "masks.png")
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
