"""From a grounded plan and an image to a ready-to-fit GroundAScoreEdit.

This is the one readable place where the stages meet (like a diffusers pipeline file):
image -> working size -> latent; plan -> prompt embeddings (computed once) -> masks -> terms.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gas_lightning.backbone import Backbone
from gas_lightning.errors import GasError
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig, Term
from gas_lightning.guidance.cds import check_preserve_form_boxes
from gas_lightning.masks import EditMasks, MaskLike
from gas_lightning.module import GroundAScoreEdit, OptimizerFactory, SchedulerFactory
from gas_lightning.plan import EditPlan

MAX_ASPECT = 2.0
MAX_SIDE = 4096  # larger inputs are reduced on load: no working size needs more, and memory stays bounded
SMALL_SIDE = 16  # below this an input is mostly upscaling; it is accepted with a warning

log = logging.getLogger(__name__)


def load_image(path: str | Path) -> Image.Image:
    """Any image PIL reads, as an upright 8-bit RGB picture at most MAX_SIDE pixels a side.

    The file is opened lazily, so its size is known before any pixel is decoded: PIL refuses
    decompression bombs (more than 2 x Image.MAX_IMAGE_PIXELS) and a large JPEG is decoded at a
    reduced scale (draft). EXIF orientation is applied, as every viewer does.
    """
    p = Path(path)
    if p.is_dir():
        raise GasError(f"--image {str(p)!r} is a folder; pass an image file (PNG, JPEG, WebP, ...)")
    if not p.is_file():
        raise GasError(f"image {str(p)!r} does not exist; pass an existing file with --image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", Image.DecompressionBombWarning
            )  # between 1x and 2x the limit: reduced below
            with Image.open(p) as im:
                width, height = im.size
                if max(width, height) > MAX_SIDE:
                    scale = MAX_SIDE / max(width, height)
                    im.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
                image = to_rgb(_reduce(ImageOps.exif_transpose(im)))
    except Image.DecompressionBombError as e:
        raise GasError(
            f"image {str(p)!r} is too large to edit safely ({e}); downscale it first, "
            f"e.g. to {MAX_SIDE} pixels on the long side"
        ) from None
    except PermissionError:
        raise GasError(
            f"image {str(p)!r} cannot be read: permission denied; make it readable (chmod a+r) "
            "or copy it somewhere you can read"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise GasError(f"could not read image {str(p)!r} ({e}); use a complete PNG or JPEG file") from None
    if image.size != (width, height):
        log.info("image %s is %dx%d; reduced to %dx%d on load", p, width, height, *image.size)
    if min(image.size) < SMALL_SIDE:
        log.warning(
            "image %s is only %dx%d pixels; it is upscaled to the working size, so expect a blurry edit", p, *image.size
        )
    return image


def _reduce(image: Image.Image) -> Image.Image:
    """Box-reduce an image larger than MAX_SIDE before any conversion, while its pixels are smallest."""
    factor = math.ceil(max(image.size) / MAX_SIDE)
    if factor <= 1:
        return image
    modes_reduce_lacks = {"1": "L", "P": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}
    if image.mode in modes_reduce_lacks:
        image = image.convert(modes_reduce_lacks[image.mode])
    return image.reduce(factor)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode. 16-bit, 32-bit and float greys are scaled (PIL's convert clips them
    to white), transparency is laid over white, CMYK and palettes go through PIL's convert."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if image.mode.startswith("I;16") or top > 255:
            scale = 65535.0
        else:
            scale = 1.0 if image.mode == "F" and top <= 1.0 else 255.0
        grey = np.clip(arr * (255.0 / scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


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
    arr = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL."""
    arr = (x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def term_name(index: int, phrase: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")[:32]
    return f"subtask{index}_{slug}"


def subtask_scale(cfg: GuidanceConfig, keep: bool, area: float) -> float | None:
    """A subtask's own CFG scale: keep subtasks' (keep_guidance_scale), else wide boxes'; None: the config's."""
    if keep and cfg.keep_guidance_scale is not None:
        return cfg.keep_guidance_scale
    if cfg.wide_guidance_scale is not None and area >= cfg.wide_area:
        return cfg.wide_guidance_scale
    return None


def build_terms(
    backbone: Backbone, plan: EditPlan, masks: EditMasks, config: GuidanceConfig | None = None
) -> list[Term]:
    """One text-encoder call for every phrase and both sentences; then one Term per subtask (+ whole scene)."""
    cfg = config or GuidanceConfig()
    n = len(plan.subtasks)
    prompts = [s.source for s in plan.subtasks] + [s.target for s in plan.subtasks]
    prompts += [plan.source_prompt, plan.target_prompt]
    emb = backbone.encode_prompts(prompts)  # a PromptEmbeddings: indexing keeps the batch axis
    terms = [
        Term(
            name=term_name(i, s.source),
            src_emb=emb[i],
            tgt_emb=emb[n + i],
            mask=masks.subtasks[i].to(emb.device),
            weight=s.intensity,
            preserve_form=s.preserve_form,
            keep=s.keep,
            box=s.box,
            region=None if masks.regions[i] is None else masks.regions[i].to(emb.device),
            guidance_scale=subtask_scale(cfg, s.keep, s.area),
        )
        for i, s in enumerate(plan.subtasks)
    ]
    if cfg.full_prompt or n == 0:
        terms.append(
            Term(
                name="full",
                src_emb=emb[2 * n],
                tgt_emb=emb[2 * n + 1],
                mask=masks.full.to(emb.device),
                weight=1.0,
                is_full=True,
            )
        )
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
    masks: Sequence[MaskLike | None] | None = None,
) -> GroundAScoreEdit:
    """Everything the Trainer needs for one edit; the backbone is shared, not copied.

    `masks`: in-memory masks (PIL, numpy, tensor), one per subtask, None where the plan's own
    mask or box applies; they are not written into the plan (use `masks.attach_masks` for that).
    """
    cfg = guidance_config or GuidanceConfig()
    if not 0 <= cfg.t_min <= cfg.t_max < backbone.num_train_timesteps:
        raise GasError(
            f"guidance t range [{cfg.t_min}, {cfg.t_max}] must lie in [0, {backbone.num_train_timesteps - 1}]"
        )
    size = working_size(*image.size, resolution or backbone.default_resolution, backbone.size_multiple)
    pixels = image_to_tensor(image, size).to(backbone.device)
    z_src = backbone.codec.encode(pixels)
    if not 0.0 <= cfg.overlap_weight <= 1.0:
        raise GasError(f"guidance.overlap_weight must be in [0, 1], got {cfg.overlap_weight}")
    if not 0.0 < cfg.wide_area <= 1.0 or (cfg.wide_guidance_scale is not None and cfg.wide_guidance_scale < 0):
        raise GasError(
            f"guidance.wide_area must be in (0, 1] and guidance.wide_guidance_scale >= 0 (or null), "
            f"got {cfg.wide_area} and {cfg.wide_guidance_scale}"
        )
    if cfg.keep_guidance_scale is not None and cfg.keep_guidance_scale < 0:
        raise GasError(f"guidance.keep_guidance_scale must be >= 0 (or null), got {cfg.keep_guidance_scale}")
    check_preserve_form_boxes(plan, tuple(z_src.shape[-2:]), backbone.unet, backbone.codec.downscale)
    region_masks = EditMasks.from_plan(
        plan, z_src.shape[-2], z_src.shape[-1], overlap_weight=cfg.overlap_weight, masks=masks, image_size=image.size
    )
    terms = build_terms(backbone, plan, region_masks, config=cfg)
    guidance = GroundedScoreGuidance(backbone, cfg, null_embedding=backbone.null_embeddings(), loss_scale=loss_scale)
    module = GroundAScoreEdit(
        guidance,
        z_src,
        terms,
        plan,
        schedule=schedule,
        seed=seed,
        loss_scale=loss_scale,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
    )
    module.masks = region_masks
    return module
