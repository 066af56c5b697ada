"""The final outputs of an edit, written once by rank zero when fitting ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from gas_lightning.callbacks.previews import mask_overlay, save_png
from gas_lightning.io import atomic_write
from gas_lightning.pipeline import tensor_to_image


def _viewable(image, min_side: int):
    """Integer nearest-neighbour upscale so that tiny (pixel-world) outputs can be looked at."""
    factor = max(1, -(-min_side // min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), resample=0)


class EditOutputs(Callback):
    """edited.png, comparison.png (source | edited), masks.png and plan.json in `output_dir`.

    edited.png is at the working size; comparison.png and masks.png are upscaled (nearest) to at
    least `min_view_side` pixels high, for viewing. latent.pt holds plain tensors and ints, so it
    loads with `torch.load(weights_only=True)`. Every file is written atomically (`atomic_write`).

    Args:
        output_dir: the edit's folder.
        min_view_side: the viewing pictures' least height.
        source_latent: the source shown in comparison.png and masks.png (default: the module's own
            reference; a refine pass, whose reference is the previous result, passes the user's source).
        save_plan: write plan.json (a refine pass's plan is not the user's and stays out of it).
    """

    def __init__(self, output_dir: str | Path, min_view_side: int = 256, source_latent=None, save_plan: bool = True):
        self.output_dir = Path(output_dir)
        self.min_view_side = int(min_view_side)
        self.source_latent = source_latent
        self.save_plan = save_plan

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_plan:
            pl_module.plan.save(self.output_dir / "plan.json")  # atomic, like every output here

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reference = pl_module.z_src if self.source_latent is None else self.source_latent.to(pl_module.z_src)
        source = pl_module.decode(reference).cpu()
        edited = pl_module.decode().cpu()
        save_png(tensor_to_image(edited), self.output_dir / "edited.png")
        side = self.min_view_side
        save_png(
            _viewable(tensor_to_image(torch.cat([source, edited], dim=-1)), side), self.output_dir / "comparison.png"
        )
        overlay = mask_overlay(source, pl_module.masks.subtasks.cpu())
        save_png(_viewable(tensor_to_image(overlay), side), self.output_dir / "masks.png")
        with atomic_write(self.output_dir / "latent.pt") as f:
            torch.save({"latent": pl_module.latent.detach().cpu(), "step": trainer.global_step}, f)


class FinalCheckpoint(Callback):
    """`last.ckpt` at the very end (ModelCheckpoint only saves on its interval) and `interrupted.ckpt`
    when the run dies or is stopped with Ctrl-C, so no optimisation step is lost.

    Lightning's OnExceptionCheckpoint is not used: its presence makes a plain `fit()` resume from
    "last" silently, and an edit must only resume when the user says `--resume`.

    `interrupted.ckpt` is only written once training has started: an error while restoring (a
    refused checkpoint, a resume with another plan) would otherwise replace a good
    `interrupted.ckpt` with the state of a run that never took a step.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self._training = False
        self.interrupted: Path | None = None  # where the steps of a stopped run were saved

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # weights_only=False: the full state (optimiser, scheduler, loops), said explicitly so
        # Lightning does not log that it defaulted.
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._training:
            trainer.save_checkpoint(self.dirpath / "interrupted.ckpt", weights_only=False)
            self.interrupted = self.dirpath / "interrupted.ckpt"
