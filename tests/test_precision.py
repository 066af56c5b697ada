"""Precision as the reference: CDS in float32 whatever the autocast around it, the SD VAE in float32,
and non-finite gradient entries counted, logged and, when a step has no finite entry, a clear stop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from PIL import Image

from gas_lightning.backbone import resolve_dtype
from gas_lightning.callbacks import NanGuard
from gas_lightning.errors import NonFiniteLatentError
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig
from gas_lightning.loading import vae_dtype
from gas_lightning.masks import EditMasks
from gas_lightning.pipeline import build_edit, build_terms
from gas_lightning.plan import EditPlan

PLAN = EditPlan.from_lists(
    ["a dog", "grass"], ["a cat", "snow"], boxes=[[0.1, 0.1, 0.6, 0.6], [0.0, 0.5, 1.0, 1.0]], preserve_form=[1, 0]
)


def test_auto_dtype_is_float32_weights_for_sd_and_float16_for_sdxl_on_cuda():
    assert resolve_dtype("auto", "cuda", "sd") == torch.float32  # the reference: fp32 weights, fp16 autocast for DDS
    assert resolve_dtype("auto", "cuda", "sdxl") == torch.float16
    assert resolve_dtype("auto", "cpu", "sdxl") == torch.float32
    assert resolve_dtype("float16", "cuda", "sd") == torch.float16  # an explicit choice is kept
    assert vae_dtype("sd", torch.float16) == torch.float32 and vae_dtype("sdxl", torch.float16) == torch.float32


def test_cds_runs_in_float32_inside_a_half_precision_autocast(backbone):
    """Under a bf16 autocast (the CPU's 16-bit autocast; 16-mixed on CUDA is the same mechanism) the DDS
    call runs in 16 bits and both CDS passes in float32, as the reference's CDS outside its autocast."""
    cfg = GuidanceConfig(full_prompt=False)
    guidance = GroundedScoreGuidance(backbone, cfg)
    terms = build_terms(backbone, PLAN, EditMasks.from_plan(PLAN, 16, 16), cfg)
    seen = []
    attn = [m for n, m in backbone.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")][0]
    handle = attn.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    z = torch.randn(1, 4, 16, 16)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grad, log = guidance.term_gradient(
                z, z.clone() + 0.1, terms[0], 300, torch.randn_like(z), torch.Generator().manual_seed(0)
            )
    finally:
        handle.remove()
    # one DDS call (no grad, 16 bits), the CDS source pass (no grad) and edited pass (grad), both float32
    assert seen == [(False, torch.bfloat16), (False, torch.float32), (True, torch.float32)], seen
    assert grad.dtype == torch.float32 and int(log.nonfinite_tensor) == 0


def _module(backbone, schedule):
    plan = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.1, 0.1, 0.6, 0.6]])
    return build_edit(
        backbone,
        Image.new("RGB", (32, 32), (90, 160, 60)),
        plan,
        guidance_config=GuidanceConfig(full_prompt=False),
        schedule=schedule,
    )


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_some_nonfinite_entries_are_counted_and_logged_and_the_step_goes_on(backbone, schedule, monkeypatch, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = _module(backbone, schedule)
    name = "batched_gradient" if schedule == "batched" else "term_gradient"
    real = getattr(module.guidance, name)

    def poisoned(*args, **kwargs):
        grad, logs = real(*args, **kwargs)
        grad = grad.clone()
        grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        for tl in logs if isinstance(logs, list) else [logs]:
            tl.add_nonfinite(grad)  # as the guidance counts its own parts
        return grad, logs

    monkeypatch.setattr(module.guidance, name, poisoned)
    logged = {}
    monkeypatch.setattr(type(module), "log", lambda self, key, value, **kw: logged.__setitem__(key, float(value)))
    before = module.latent.detach().clone()
    L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module)
    moved = module.latent.detach() - before
    assert torch.isfinite(module.latent).all()
    assert (moved.view(-1)[:3] == 0).all() and moved.view(-1)[3:].abs().sum() > 0  # only the bad entries held
    assert logged["subtask0_a-dog/nonfinite"] == 3.0, logged  # the last logged step: three entries


@pytest.mark.parametrize("guard", [True, False], ids=["nan_guard", "module_alone"])
def test_a_step_with_no_finite_entry_stops_naming_the_last_good_checkpoint(backbone, monkeypatch, tmp_path, guard):
    """With NanGuard the edit stops after that step, naming the checkpoint; without it, at the next logging
    step (the module reads the flag only where the host waits anyway). Either way the latent did not move."""
    from lightning.pytorch.loggers import CSVLogger

    module = _module(backbone, "batched")
    real = module.guidance.batched_gradient
    latents = []

    def broken(z, *args, **kwargs):
        grad, logs = real(z, *args, **kwargs)
        latents.append(z.clone())
        return (torch.full_like(grad, float("nan")) if len(latents) == 2 else grad), logs

    monkeypatch.setattr(module.guidance, "batched_gradient", broken)
    (tmp_path / "step=1.ckpt").write_bytes(b"")
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NanGuard(tmp_path)] if guard else [],
    )
    with pytest.raises(NonFiniteLatentError) as info:
        trainer.fit(module)
    message = str(info.value)
    assert "gradient became NaN or infinite at step 2 in every entry" in message
    assert (f"--resume {tmp_path / 'step=1.ckpt'}" in message) == guard
    assert len(latents) == (2 if guard else 3)  # NanGuard: right after step 2; alone: at logging step 3
    assert torch.equal(latents[-1] if not guard else module.latent.detach(), latents[1])  # step 2 moved nothing
