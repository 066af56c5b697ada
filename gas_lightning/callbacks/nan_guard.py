"""Stop an edit whose latent or gradient stops being finite, naming the last checkpoint worth resuming.

One NaN in the latent spreads to every pixel on the next step and every later checkpoint
holds it, so the edit is stopped at once, before the checkpoint callback saves that step
(Lightning runs checkpoint callbacks after the others).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gas_lightning.errors import NonFiniteLatentError

WHAT_TO_TRY = (
    "a smaller learning rate (--optimizer.lr), --trainer.precision 32, "
    "or --dtype float32 when the model runs in half precision"
)


class NanGuard(Callback):
    """Raise `NonFiniteLatentError` as soon as the latent holds NaN or infinity.

    Args:
        dirpath: the folder the edit's checkpoints are written to; the message names the newest
            one there (``interrupted.ckpt`` excluded: it is written after the failure).

    Raises:
        NonFiniteLatentError: at the start when the encoded source image is not finite, and
            after any step that leaves the latent not finite or whose whole gradient was not finite
            (the module's `check_gradient`); the message names the checkpoint to resume from.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint in `dirpath` other than interrupted.ckpt, or None."""
        saved = [p for p in self.dirpath.glob("*.ckpt") if p.name != "interrupted.ckpt"]
        return max(saved, key=lambda p: p.stat().st_mtime_ns, default=None)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not torch.isfinite(pl_module.latent).all():
            raise NonFiniteLatentError(
                "the model encoded the source image to NaN or infinity before the first step; its weights are "
                "broken or the dtype overflows: try --dtype float32, or another copy of the model"
            )

    def _resume(self) -> str:
        good = self.last_good_checkpoint()
        return (
            f"the last good checkpoint is {good}: continue from it with --resume {good} and {WHAT_TO_TRY}"
            if good is not None
            else f"no checkpoint was written before it; start again with {WHAT_TO_TRY}"
        )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        check = getattr(pl_module, "check_gradient", None)
        if check is not None:
            check()  # its error gets the checkpoint to resume from in on_exception
        if torch.isfinite(pl_module.latent).all():
            return
        raise NonFiniteLatentError(f"the latent became NaN or infinite at step {trainer.global_step}; {self._resume()}")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A step whose whole gradient was non-finite (the module's error): say which checkpoint to resume from."""
        if isinstance(exception, NonFiniteLatentError) and "checkpoint" not in str(exception):
            exception.args = (f"{exception.args[0]}; {self._resume()}", *exception.args[1:])
