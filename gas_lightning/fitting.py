"""The Trainer of one pass of an edit: its callbacks, logger, checkpoints and precision.

Shared by the first pass (runner.run_edit) and the refine passes (refine.py), so that every pass
writes its outputs, checkpoints and TensorBoard events the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gas_lightning.errors import EditInterrupted

log = logging.getLogger("gas_lightning")


def make_trainer(cfg, init, out: Path, ckpt_dir: Path, callbacks=(), events: str = "", source_latent=None):
    """(Trainer, FinalCheckpoint) for a pass; `events` names its TensorBoard folder under `out` ("" the first
    pass's); `source_latent`: what comparison.png shows as the source (default: the pass's own reference)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from gas_lightning.callbacks import EditOutputs, FinalCheckpoint, NanGuard
    from gas_lightning.io import with_atomic_io

    all_callbacks = list(init.trainer.callbacks or []) + list(callbacks)
    if not any(isinstance(c, ModelCheckpoint) for c in all_callbacks):
        all_callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.checkpoint_every,
                save_top_k=-1,
                save_last=True,
                enable_version_counter=False,
            )
        )
    final = FinalCheckpoint(ckpt_dir)
    first = source_latent is None
    all_callbacks += [NanGuard(ckpt_dir), final, EditOutputs(out, source_latent=source_latent, save_plan=first)]
    trainer_kwargs = {k: v for k, v in vars(init.trainer).items() if k != "callbacks"}
    if trainer_kwargs.get("logger") in (None, True):
        trainer_kwargs["logger"] = TensorBoardLogger(
            save_dir=str(out), name=events, version="", default_hp_metric=False
        )
    if trainer_kwargs.get("default_root_dir") is None:
        trainer_kwargs["default_root_dir"] = str(out)
    trainer_kwargs["plugins"] = with_atomic_io(trainer_kwargs.get("plugins"))  # kill-safe writes, data-only loads
    if trainer_kwargs.get("enable_model_summary") is None:  # one row, "other params": the latent
        trainer_kwargs["enable_model_summary"] = False
    cpu_precision(trainer_kwargs)
    return L.Trainer(callbacks=all_callbacks, **trainer_kwargs), final


def build_pass(backbone, image, plan, cfg, init):
    """The ready module of a pass from its config (`cfg`) and that config's instantiated objects (`init`)."""
    from gas_lightning.solvers import build_solver_edit

    return build_solver_edit(
        backbone,
        image,
        plan,
        solver=cfg.get("solver"),
        flow_config=init.get("flow"),
        guidance_config=init.guidance,
        resolution=cfg.resolution,
        schedule=cfg.schedule,
        seed=cfg.seed,
        loss_scale=cfg.loss_scale,
        optimizer=init.optimizer,
        lr_scheduler=init.lr_scheduler,
    )


def fit(trainer, module, final, out: Path, resume: str | None = None) -> None:
    """trainer.fit, with Ctrl-C turned into EditInterrupted naming the checkpoint that holds the steps."""
    try:
        trainer.fit(module, ckpt_path=resume, weights_only=True)
    except SystemExit:  # Lightning answers Ctrl-C with sys.exit(1) after its callbacks saved the state
        if trainer.interrupted:
            raise EditInterrupted(trainer.global_step, final.interrupted, out) from None
        raise


def cpu_precision(trainer_kwargs: dict[str, Any]) -> None:
    """16-mixed is CUDA's fp16 autocast. On the CPU Lightning swaps in bf16-mixed, which rounds the
    small differences DDS follows 8x more coarsely (docs/configuration.md, mixed precision): run 32-true there."""
    import torch

    accelerator = trainer_kwargs.get("accelerator") or "auto"
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if on_cpu and str(trainer_kwargs.get("precision")) in ("16-mixed", "16"):
        log.info("precision 16-mixed needs a GPU; on the CPU this edit runs in 32-true")
        trainer_kwargs["precision"] = "32-true"
