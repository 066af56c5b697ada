"""The flow solver's LightningModule: the DDS edit's module with FlowEdit's step in place of the DDS step.

Everything around the step is GroundAScoreEdit's: the latent is the only parameter, optimisation is manual,
checkpoints, resume, logging and the non-finite guard work unchanged. What differs is owned here: the number
of steps is the time grid's (flow.n_max), the loss scale is 1, and the optimiser is plain SGD whose learning
rate at step j is the grid's step t_i - t_{i+1} (`FlowStepSizes`, a scheduler checkpointed like any other),
so that SGD's z - lr * d is FlowEdit's Euler step z + (t_{i+1} - t_i) d with d the guidance's move.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch.optim.lr_scheduler import LRScheduler

from gas_lightning.backbone import to_device
from gas_lightning.errors import GasError
from gas_lightning.guidance import Term, TermLog
from gas_lightning.guidance.flow import GroundedFlowGuidance, check_term_masks
from gas_lightning.module import GroundAScoreEdit
from gas_lightning.plan import EditPlan


class FlowStepSizes(LRScheduler):
    """Learning rate = the time grid's step at each Trainer step (its state, the sizes included, is checkpointed)."""

    def __init__(self, optimizer: torch.optim.Optimizer, sizes: Sequence[float], last_epoch: int = -1):
        self.sizes = [float(s) for s in sizes]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        size = self.sizes[min(self.last_epoch, len(self.sizes) - 1)]
        return [size for _ in self.optimizer.param_groups]


class GroundedFlowEdit(GroundAScoreEdit):
    """One grounded FlowEdit run: `flow.n_max` Trainer steps from t_{n_max} down to t = 0.

    Schedules: `batched` moves all terms at once with shared noises (one model call per noise draw);
    `sequential` takes one SGD step per term, each at the latent the previous term left and with its own
    noises, all with the step's learning rate.
    """

    solver = "flow"

    def __init__(
        self,
        guidance: GroundedFlowGuidance,
        z_src: torch.Tensor,
        terms: Sequence[Term],
        plan: EditPlan,
        schedule: str = "batched",
        seed: int = 0,
    ):
        check_term_masks(terms, tuple(z_src.shape[-2:]))
        sizes = guidance.step_sizes()
        super().__init__(
            guidance,  # type: ignore[arg-type]  (the same duck type: to(), backbone, config)
            z_src,
            terms,
            plan,
            schedule=schedule,
            seed=seed,
            loss_scale=1.0,
            optimizer=partial(torch.optim.SGD, lr=sizes[0]),
            lr_scheduler=partial(FlowStepSizes, sizes=sizes),
        )

    def on_fit_start(self) -> None:
        n = self.guidance.config.n_max
        if self.trainer.max_steps != n:
            t0 = self.guidance.times(0)[0]
            raise GasError(
                f"the flow solver runs flow.n_max = {n} steps (FlowEdit's time grid from t = {t0:.3f} down to 0), "
                f"but trainer.max_steps is {self.trainer.max_steps}; set --trainer.max_steps {n}"
            )
        super().on_fit_start()

    def _noises(self, gen: torch.Generator) -> list[torch.Tensor]:
        shape = self.latent.shape
        return [to_device(torch.randn(shape, generator=gen), self.device) for _ in range(self.guidance.config.n_avg)]

    def _schedule_step(self, gen: torch.Generator, terms: Sequence[Term]) -> list[TermLog]:
        step = self.global_step
        if self.schedule == "batched":
            grad, logs = self.guidance.gradient(self.latent.detach(), self.z_src, terms, step, self._noises(gen))
            self._optimise(self._finite(grad), last=True)
            return logs
        logs = []
        for i, term in enumerate(terms):
            grad, (tlog,) = self.guidance.gradient(self.latent.detach(), self.z_src, [term], step, self._noises(gen))
            self._optimise(self._finite(grad), last=i == len(terms) - 1)
            logs.append(tlog)
        return logs
