"""The terminal's view of an edit: a bar that counts optimisation steps, and one line saying where it runs.

An edit is one endless "epoch" of dummy batches stopped by `max_steps`, so Lightning's own bars
read "Epoch 0/-2" and count batches of the current run only; a user thinks in edit steps, which
continue across a resume.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

log = logging.getLogger("gas_lightning")


class StepProgressBar(TQDMProgressBar):
    """`step 37/150 |███▌      | [00:31<01:40, 1.2step/s, edit/latent_change=0.403]`.

    The count is `trainer.global_step` (so a resumed edit starts where it stopped) out of
    `trainer.max_steps`. Before the bar starts, rank zero logs one line with the device,
    precision and output folder, in place of Lightning's "GPU available" lines. Arguments as
    TQDMProgressBar's.
    """

    BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar:24}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    @override
    def init_train_tqdm(self) -> Tqdm:
        """Made with the edit's total and its current step (a resumed edit's), so that no line ever
        reads `step 20/?`: Lightning's bar starts without a total and learns one at the epoch's start."""
        trainer = self.trainer
        return Tqdm(
            desc="",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
            unit="step",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._announce(trainer)
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Lightning's would reset the bar to the epoch's batch count: the bar of init_train_tqdm stays."""

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update_n(bar, step)  # one refresh per update: a log file gets one line per step, not two

    @rank_zero_only
    def _announce(self, trainer: L.Trainer) -> None:
        start = f" from step {trainer.global_step}" if trainer.global_step else ""
        log.info(
            "editing on %s (precision %s), %d steps%s; outputs in %s",
            trainer.strategy.root_device,
            trainer.precision,
            trainer.max_steps,
            start,
            trainer.default_root_dir,
        )


def step_progress_bar(trainer_cfg: Any) -> list[ProgressBar]:
    """[StepProgressBar()] for a Trainer configured as `trainer_cfg` (the parsed `trainer` section), or []
    where Lightning would refuse one: the bar is switched off, or the config names its own."""
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else lambda k, d=None: getattr(trainer_cfg, k, d)
    if get("enable_progress_bar") is False:
        return []
    for cb in get("callbacks") or []:
        path = cb.get("class_path") if hasattr(cb, "get") else getattr(cb, "class_path", None)
        if isinstance(cb, ProgressBar) or (path and _is_progress_bar(path)):
            return []
    return [StepProgressBar()]


def _is_progress_bar(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False  # the parser reports a bad class_path itself
    return isinstance(cls, type) and issubclass(cls, ProgressBar)
