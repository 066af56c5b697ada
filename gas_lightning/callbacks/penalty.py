"""The null-text penalty as a callback: present means on (for small boxes), removed means off."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class NullTextPenalty(Callback):
    """Damp subtasks whose target text barely moves the prediction inside their box.

    Small objects are the ones a misread target prompt erodes, so by default a subtask gets
    the penalty when its box covers less than `area_threshold` of the image. `subtasks` adds
    chosen subtasks by index; a plan's per-subtask `penalty: true/false` overrides both.
    """

    def __init__(self, area_threshold: float = 0.15, coefficient: float = 5.0, subtasks: Sequence[int] = ()):
        self.area_threshold = float(area_threshold)
        self.coefficient = float(coefficient)
        if self.coefficient <= 0:
            raise ValueError(f"NullTextPenalty coefficient must be > 0 (got {self.coefficient})")
        self.subtasks = tuple(int(i) for i in subtasks)

    def flags(self, plan) -> list[bool]:
        out = []
        for i, s in enumerate(plan.subtasks):
            auto = not s.keep and (s.area < self.area_threshold or i in self.subtasks)  # keep terms: nothing to damp
            out.append(s.penalty if s.penalty is not None else auto)
        return out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        flags = self.flags(pl_module.plan)
        pl_module.set_penalty(flags, self.coefficient)
        on = [s.source for s, f in zip(pl_module.plan.subtasks, flags) if f]
        log.info("null-text penalty (c=%g) on for: %s", self.coefficient, ", ".join(on) if on else "no subtask")
