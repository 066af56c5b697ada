"""What a model folder or a single checkpoint file yields before it becomes a Backbone, and the checks on
it that both loaders share: the family (SD 1/2 or SDXL, refused otherwise), the folder's components, the
VAE's dtype. Below loading.py and single_file.py, so neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gas_lightning.errors import ModelLoadError

SUPPORTED = (
    "gas-lightning loads Stable Diffusion 1.x/2.x and SDXL base models (a UNet with CLIP text encoders, "
    "epsilon or v-prediction)"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
CLIP_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclass
class Components:
    """What a model folder or a single file yields, before it becomes a Backbone."""

    family: str  # "sd" | "sdxl"
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    vae: nn.Module | None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True


def model_family(source: str, index: dict) -> str:
    """'sd' or 'sdxl' from model_index.json; anything else is refused before any weight is read."""
    name = index.get("_class_name") or "no _class_name"
    present = {k for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None}
    why = None
    if "transformer" in present:
        why = "a diffusion transformer, not a UNet (SD3, Flux and the like are trained with other objectives)"
    elif "unet" not in present:
        why = "it has no unet/"
    elif "text_encoder" not in present:
        why = "no first text encoder (the SDXL refiner and image-conditioned models are not text-to-image base models)"
    elif index["text_encoder"][1] not in CLIP_ENCODERS or (
        "text_encoder_2" in present and index["text_encoder_2"][1] not in CLIP_ENCODERS
    ):
        why = "its text encoder is not CLIP"
    if why is not None:
        raise ModelLoadError(
            f"{source!r} ({name}) is not supported: {why}. {SUPPORTED}; pass one of "
            "those with --model (a diffusers folder, a hub id, or a .safetensors file with --model_config)"
        )
    return "sdxl" if "text_encoder_2" in present else "sd"


def check_components(model: str, index: dict, flag: str = "--model") -> None:
    """A local folder must hold every component model_index.json names; say which are missing at once."""
    if not Path(model).is_dir():
        return
    needed = ["unet", "text_encoder", "tokenizer", "scheduler"]
    needed += [c for c in ("text_encoder_2", "tokenizer_2", "vae") if (index.get(c) or [None])[0] is not None]
    missing = [c for c in needed if not (Path(model) / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"the {flag} folder {model!r} lacks {', '.join(m + '/' for m in missing)}; copy the whole model "
            "(every folder model_index.json names), e.g. with `hf download MODEL_ID --local-dir FOLDER`"
        )


def vae_dtype(family: str, torch_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load the VAE in: float32 under float16 weights (see `settle_vae`), as the reference's VAE."""
    return torch.float32 if torch_dtype == torch.float16 else torch_dtype


def settle_vae(vae: nn.Module, torch_dtype: torch.dtype) -> nn.Module:
    """A VAE whose config asks for float32 (force_upcast: SDXL's overflows in float16, and diffusers' default
    for SD 1.x/2.x) stays in float32, as the reference runs its VAE. A VAE fixed for float16 (force_upcast
    false, e.g. madebyollin/sdxl-vae-fp16-fix) goes to float16."""
    if not getattr(vae.config, "force_upcast", True):
        vae.to(torch_dtype)
    return vae
