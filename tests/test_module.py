"""The LightningModule: the latent is the only parameter; one Trainer step = one iteration."""

import math

import lightning as L
import pytest
import torch
from PIL import Image

from gas_lightning.module import step_generator
from gas_lightning.pipeline import build_edit, working_size
from gas_lightning.plan import EditPlan

PLAN = EditPlan.from_lists(["a dog", "grass"], ["a cat", "snow"], boxes=[[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]])


def _fit(module, steps):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


def test_only_the_latent_is_trainable_and_saved(backbone):
    module = build_edit(backbone, Image.new("RGB", (32, 32)), PLAN)
    assert [n for n, _ in module.named_parameters()] == ["latent"]
    assert list(module.state_dict()) == ["latent"]
    assert list(module.children()) == []  # the frozen networks are not registered
    assert module.latent.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_one_trainer_step_is_one_iteration_over_all_terms(backbone, schedule):
    module = build_edit(backbone, Image.new("RGB", (32, 32)), PLAN, schedule=schedule)
    calls = []
    real = module.guidance.backbone.unet.forward
    module.guidance.backbone.unet.forward = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1]
    try:
        trainer = _fit(module, 2)
    finally:
        module.guidance.backbone.unet.forward = real
    assert trainer.global_step == 2
    # batched: one call of 2n+4 = 8 samples per step; sequential: n+1 = 3 calls of 4 samples per step.
    assert calls == ([8] * 2 if schedule == "batched" else [4] * 6)
    assert [log.t for log in module.last_logs] and len(module.last_logs) == 3  # every term logged


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_lr_scheduler_steps_once_per_trainer_step(backbone, schedule):
    """T_max counts Trainer steps in both schedules (sequential takes 3 optimiser steps per Trainer step)."""
    module = build_edit(
        backbone,
        Image.new("RGB", (32, 32)),
        PLAN,
        schedule=schedule,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    )
    trainer = _fit(module, 2)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 8)) / 2)


def test_intensity_zero_disables_a_subtask(backbone):
    plan = PLAN.replace_subtasks(
        [PLAN.subtasks[0], type(PLAN.subtasks[1])(source="grass", target="snow", box=(0, 0, 1, 1), intensity=0)]
    )
    module = build_edit(backbone, Image.new("RGB", (32, 32)), plan)
    assert [t.name for t in module.active_terms] == ["subtask0_a-dog", "full"]


def test_noise_depends_only_on_seed_step_and_rank():
    draw = lambda *key: torch.randn(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


@pytest.mark.parametrize(
    "size, expected",
    [((512, 512), (512, 512)), ((640, 480), (704, 512)), ((480, 640), (512, 704)), ((3000, 500), (1024, 512))],
)
def test_working_size_keeps_aspect_and_multiple(size, expected):
    assert working_size(*size, resolution=512, multiple=64) == expected


def test_keep_subtask_is_zero_at_the_source_and_acts_only_in_its_box(backbone):
    """A keep term's direction is exactly zero at the source; a drift makes it act, inside its box only.
    (That it pulls back is measured on the trained world model: tools/world/eval_world.py gas vs gas_no_keep.)"""
    from gas_lightning.callbacks import NullTextPenalty
    from gas_lightning.guidance import GuidanceConfig

    plan = PLAN.with_keep(["a ball"], [[0.6, 0.6, 0.9, 0.9]])
    module = build_edit(
        backbone, Image.new("RGB", (32, 32), (90, 120, 60)), plan, guidance_config=GuidanceConfig(overlap_weight=0.1)
    )
    keep = module.terms[2]
    assert keep.name.startswith("subtask2") and not keep.is_full
    assert NullTextPenalty().flags(plan) == [False, False, False]  # small boxes, but keep has none
    assert NullTextPenalty(area_threshold=0.5).flags(plan) == [True, False, False]
    # the background box holds both smaller boxes: lowered to overlap_weight there
    assert module.masks.subtasks[1].min().item() == pytest.approx(0.1)
    eps = torch.randn(module.latent.shape, generator=torch.Generator().manual_seed(0))
    z_src = module.z_src
    g0, _ = module.guidance.term_gradient(z_src, z_src, keep, 500, eps)
    assert g0.abs().max().item() == 0.0
    drift = z_src + 0.5 * keep.mask
    g1, _ = module.guidance.term_gradient(drift, z_src, keep, 500, eps)
    assert g1.abs().sum() > 0 and (g1 * (1 - keep.mask)).abs().max().item() == 0.0
