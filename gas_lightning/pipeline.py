"""From a grounded plan and an image to a ready-to-fit GroundAScoreEdit.

This is the one readable place where the stages meet (like a diffusers pipeline file):
image -> working size -> latent; plan -> prompt embeddings (computed once) -> masks -> terms.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from gas_lightning.backbone import Backbone
from gas_lightning.errors import GasError
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig, Term
from gas_lightning.masks import EditMasks
from gas_lightning.module import GroundAScoreEdit, OptimizerFactory, SchedulerFactory
from gas_lightning.plan import EditPlan

MAX_ASPECT = 2.0


def load_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise GasError(f"image {str(p)!r} does not exist; pass an existing file with --image")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise GasError(f"could not read image {str(p)!r} ({e}); use a PNG or JPEG file") from None


def working_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """Keep the aspect ratio: the short side becomes `resolution`, the long side at most twice that,
    both rounded to the UNet's size multiple. Normalised boxes stay valid because nothing is cropped."""
    aspect = min(max(width, height) / min(width, height), MAX_ASPECT)
    short, long = resolution, resolution * aspect
    rnd = lambda v: max(multiple, int(round(v / multiple)) * multiple)  # noqa: E731
    short, long = rnd(short), rnd(long)
    return (long, short) if width >= height else (short, long)


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1] at `size` (width, height), resized with Lanczos."""
    import numpy as np

    arr = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL."""
    arr = (x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def term_name(index: int, phrase: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")[:32]
    return f"subtask{index}_{slug}"


def build_terms(backbone: Backbone, plan: EditPlan, masks: EditMasks, config: GuidanceConfig | None = None) -> list[Term]:
    """One text-encoder call for every phrase and both sentences; then one Term per subtask (+ whole scene)."""
    cfg = config or GuidanceConfig()
    wide = cfg.wide_guidance_scale
    n = len(plan.subtasks)
    prompts = [s.source for s in plan.subtasks] + [s.target for s in plan.subtasks]
    prompts += [plan.source_prompt, plan.target_prompt]
    emb = backbone.encode_prompts(prompts)
    terms = [
        Term(
            name=term_name(i, s.source),
            src_emb=emb[i : i + 1],
            tgt_emb=emb[n + i : n + i + 1],
            mask=masks.subtasks[i].to(emb.device),
            weight=s.intensity,
            preserve_form=s.preserve_form,
            box=s.box,
            guidance_scale=wide if wide is not None and s.area >= cfg.wide_area else None,
        )
        for i, s in enumerate(plan.subtasks)
    ]
    if cfg.full_prompt or n == 0:
        terms.append(Term(name="full", src_emb=emb[2 * n : 2 * n + 1], tgt_emb=emb[2 * n + 1 : 2 * n + 2],
                          mask=masks.full.to(emb.device), weight=1.0, is_full=True))
    return terms


def build_edit(
    backbone: Backbone,
    image: Image.Image,
    plan: EditPlan,
    guidance_config: GuidanceConfig | None = None,
    resolution: int | None = None,
    schedule: str = "batched",
    seed: int = 0,
    loss_scale: float = 2000.0,
    optimizer: OptimizerFactory | None = None,
    lr_scheduler: SchedulerFactory | None = None,
) -> GroundAScoreEdit:
    """Everything the Trainer needs for one edit; the backbone is shared, not copied."""
    cfg = guidance_config or GuidanceConfig()
    if not 0 <= cfg.t_min <= cfg.t_max < backbone.num_train_timesteps:
        raise GasError(f"guidance t range [{cfg.t_min}, {cfg.t_max}] must lie in [0, {backbone.num_train_timesteps - 1}]")
    size = working_size(*image.size, resolution or backbone.default_resolution, backbone.size_multiple)
    pixels = image_to_tensor(image, size).to(backbone.device)
    z_src = backbone.codec.encode(pixels)
    if not 0.0 <= cfg.overlap_weight <= 1.0:
        raise GasError(f"guidance.overlap_weight must be in [0, 1], got {cfg.overlap_weight}")
    if not 0.0 < cfg.wide_area <= 1.0 or (cfg.wide_guidance_scale is not None and cfg.wide_guidance_scale < 0):
        raise GasError(f"guidance.wide_area must be in (0, 1] and guidance.wide_guidance_scale >= 0 (or null), "
                       f"got {cfg.wide_area} and {cfg.wide_guidance_scale}")
    masks = EditMasks.from_plan(plan, z_src.shape[-2], z_src.shape[-1], overlap_weight=cfg.overlap_weight)
    terms = build_terms(backbone, plan, masks, config=cfg)
    guidance = GroundedScoreGuidance(backbone, cfg, null_embedding=backbone.encode_prompts([""]))
    module = GroundAScoreEdit(guidance, z_src, terms, plan, schedule=schedule, seed=seed, loss_scale=loss_scale,
                              optimizer=optimizer, lr_scheduler=lr_scheduler)
    module.masks = masks
    return module
