"""The edit as a LightningModule: the image latent is the only parameter.

One Trainer step is one Ground-A-Score iteration over all terms, so `max_steps` means the
same in both schedules. The frozen networks live in a `GroundedScoreGuidance` held outside
the module tree: they are never registered children, never in `state_dict`, never in a
checkpoint and never wrapped by DDP. Optimisation is manual because the sequential schedule
takes one optimiser step per term inside a single Trainer step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from gas_lightning.backbone import to_device
from gas_lightning.errors import NonFiniteLatentError
from gas_lightning.guidance import GroundedScoreGuidance, Term, TermLog, shielded_term
from gas_lightning.plan import EditPlan

log = logging.getLogger(__name__)

SCHEDULES = ("batched", "sequential")
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, step, rank): resumed runs replay the same noise."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63)))


class _Ticks(IterableDataset):
    """An endless stream of dummy batches: the Trainer counts steps, the data is the latent."""

    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


class GroundAScoreEdit(L.LightningModule):
    solver = "dds"  # named in checkpoints: a resume under the other solver is refused

    def __init__(
        self,
        guidance: GroundedScoreGuidance,
        z_src: torch.Tensor,
        terms: Sequence[Term],
        plan: EditPlan,
        schedule: str = "batched",
        seed: int = 0,
        loss_scale: float = 2000.0,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.automatic_optimization = False
        self.latent = nn.Parameter(z_src.detach().clone().float())
        self.register_buffer("z_src", z_src.detach().clone().float(), persistent=False)
        # Plain attributes on purpose: not children, not buffers, not in checkpoints.
        self.__dict__["guidance"] = guidance
        self.terms: list[Term] = list(terms)
        self.plan = plan
        self.schedule = schedule
        self.seed = int(seed)
        self.loss_scale = float(loss_scale)
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        self.last_logs: list[TermLog] = []

    # set-up ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # The strategy has moved the registered tensors by now; the frozen networks and terms follow.
        self._move_frozen(self.device)

    def _move_frozen(self, device: torch.device) -> None:
        self.guidance.to(device)
        self.terms = [
            replace(t, src_emb=t.src_emb.to(device), tgt_emb=t.tgt_emb.to(device), mask=t.mask.to(device))
            for t in self.terms
        ]

    def set_penalty(self, flags: Sequence[bool], coefficient: float) -> None:
        """Switch the null-text penalty per subtask term (the whole-scene term never has it)."""
        subtask_terms = [t for t in self.terms if not t.is_full]
        if len(flags) != len(subtask_terms):
            raise ValueError(f"{len(flags)} penalty flags for {len(subtask_terms)} subtasks")
        it = iter(flags)
        self.terms = [t if t.is_full else replace(t, penalty=bool(next(it))) for t in self.terms]
        self.guidance.penalty_coefficient = float(coefficient)

    def configure_optimizers(self) -> Any:
        if self._optimizer_factory is None:
            opt = torch.optim.SGD([self.latent], lr=0.1)
        else:
            opt = self._optimizer_factory([self.latent])
        if self._scheduler_factory is None:
            return opt
        # Returned to Lightning so its state is checkpointed and restored on resume; stepped by hand
        # once per Trainer step (manual optimisation), so its step count is max_steps in both schedules.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler_factory(opt), "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=None)

    # the step ----------------------------------------------------------------------------------
    @property
    def active_terms(self) -> list[Term]:
        return [t for t in self.terms if t.weight > 0]

    def _draw(self, gen: torch.Generator) -> tuple[int, torch.Tensor]:
        """A timestep in [t_min, t_max] (inclusive) and noise."""
        cfg = self.guidance.config
        t = int(torch.randint(cfg.t_min, cfg.t_max + 1, (1,), generator=gen))
        eps = to_device(torch.randn(self.latent.shape, generator=gen), self.device)
        return t, eps

    def _finite(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with its NaN and infinite entries set to 0 (their count is logged per term).

        The reference asserts a finite gradient; here a step with some non-finite entries goes on
        without them, and a step with no finite entry at all (its gradient is then all zero) stops the
        edit at `check_gradient`. The first such step is kept on the device: reading it here would make
        every step wait for the accelerator.
        """
        finite = torch.isfinite(grad)
        failed = self.__dict__.get("_failed_at")
        if failed is None:
            failed = torch.zeros((), dtype=torch.long, device=grad.device)
        step = torch.full((), self.global_step + 1, dtype=torch.long, device=grad.device)
        self.__dict__["_failed_at"] = torch.where(~finite.any() & (failed == 0), step, failed)
        return torch.where(finite, grad, 0.0)

    def check_gradient(self) -> None:
        """Raise `NonFiniteLatentError` if a step so far had no finite gradient entry. Reads the device:
        called on logging steps and by `NanGuard` after every step, where the host waits anyway."""
        failed = self.__dict__.get("_failed_at")
        if failed is not None and int(failed) > 0:
            raise NonFiniteLatentError(
                f"the gradient became NaN or infinite at step {int(failed)} in every entry (terms: "
                f"{', '.join(t.name for t in self.active_terms)}), so that step did not move the latent"
            )

    def _optimise(self, grad: torch.Tensor, last: bool) -> None:
        """Turn a gradient into an optimiser step through the surrogate loss scale * <z, grad>."""
        opt = self.optimizers()
        opt.zero_grad()
        if last:
            self.manual_backward(self.loss_scale * (self.latent * grad.detach()).sum())
            opt.step()
            return
        # Inner steps of the sequential schedule: one backward per DDP forward is all DDP allows,
        # so these gradients are averaged across ranks by hand and applied by the raw optimiser.
        grad = self.trainer.strategy.reduce(grad.detach(), reduce_op="mean") if self.trainer.world_size > 1 else grad
        self.latent.grad = (self.loss_scale * grad).to(self.latent.dtype)
        opt.optimizer.step()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        gen = step_generator(self.seed, self.global_step, self.global_rank)
        terms = self.active_terms
        logs = self._schedule_step(gen, terms)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.last_logs = logs
        self._count_nonfinite(terms, logs)
        if self._should_log():
            self._log_terms(terms, logs)

    def _schedule_step(self, gen: torch.Generator, terms: Sequence[Term]) -> list[TermLog]:
        """The optimiser step(s) of one Trainer step under the schedule; the solver's part of the step."""
        z = self.latent.detach()
        if self.schedule == "batched":
            sampling = self.guidance.config.batched_noise
            if sampling != "shared":  # drawn in the sequential schedule's order
                draws = [self._draw(gen) for _ in terms]
                if sampling == "keep_aware":
                    draws = [draws[shielded_term(terms, i)] if tm.keep else draws[i] for i, tm in enumerate(terms)]
                t, eps = [d[0] for d in draws], [d[1] for d in draws]
            else:
                t, eps = self._draw(gen)
            grad, logs = self.guidance.batched_gradient(z, self.z_src, terms, t, eps, gen)
            self._optimise(self._finite(grad), last=True)
        else:
            logs = []
            for i, term in enumerate(terms):
                t, eps = self._draw(gen)
                grad, tlog = self.guidance.term_gradient(self.latent.detach(), self.z_src, term, t, eps, gen)
                self._optimise(self._finite(grad), last=i == len(terms) - 1)
                logs.append(tlog)
        return logs

    def _should_log(self) -> bool:
        """Whether the Trainer writes this step's metrics. Logging reads tensors as numbers, which
        waits for the accelerator, so the other steps log nothing and never stall it."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _count_nonfinite(self, terms: Sequence[Term], logs: Sequence[TermLog]) -> None:
        """Add up each term's non-finite gradient entries on the device (no wait) until the next logged step."""
        counts = self.__dict__.setdefault("_nonfinite", {})
        for term, tl in zip(terms, logs):
            if tl.nonfinite_tensor is not None:
                counts[term.name] = counts.get(term.name, 0) + tl.nonfinite_tensor

    def _log_terms(self, terms: Sequence[Term], logs: Sequence[TermLog]) -> None:
        self.check_gradient()
        counts = self.__dict__.pop("_nonfinite", {})
        for term, tl in zip(terms, logs):
            values = {"t": float(tl.t), "gamma": tl.gamma_tensor, "grad_norm": tl.grad_norm_tensor}
            if term.name in counts:  # entries set to 0 since the last logged step
                values["nonfinite"] = torch.as_tensor(counts[term.name], dtype=torch.float32)
            if tl.cds_loss_tensor is not None:
                values["cds_loss"] = tl.cds_loss_tensor
            for key, value in values.items():
                self.log(f"{term.name}/{key}", value, on_step=True, on_epoch=False, sync_dist=False)
        # On the CPU: Lightning reads progress-bar values as numbers after every step, logged this step or not.
        change = (self.latent.detach() - self.z_src).abs().mean().cpu()
        self.log("edit/latent_change", change, on_step=True, on_epoch=False, prog_bar=True)

    # outputs ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Image in [0, 1], shape (1, 3, H, W), of the current (or a given) latent."""
        z = self.latent.detach() if latent is None else latent
        return (self.guidance.backbone.codec.decode(z.to(self.guidance.backbone.device)) + 1) / 2

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What the latent belongs to, so a resume with a different plan or seed is refused.
        checkpoint["gas_lightning"] = {
            "plan": self.plan.to_dict(),
            "seed": self.seed,
            "schedule": self.schedule,
            "solver": self.solver,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("gas_lightning")
        if meta is None:
            return
        from gas_lightning.errors import GasError

        if meta["plan"] != self.plan.to_dict():
            raise GasError(
                "the checkpoint was made for a different edit plan; resume with the same --plan/--request/boxes "
                "(its plan.json is next to the checkpoints) or start a new run without --resume"
            )
        if meta.get("solver", "dds") != self.solver:
            raise GasError(
                f"the checkpoint was made by the {meta.get('solver', 'dds')} solver and this edit runs the "
                f"{self.solver} solver; resume with --solver {meta.get('solver', 'dds')} or start a new run"
            )
        if meta["seed"] != self.seed or meta["schedule"] != self.schedule:
            log.warning(
                "resuming with seed/schedule %s/%s; the checkpoint used %s/%s",
                self.seed,
                self.schedule,
                meta["seed"],
                meta["schedule"],
            )
